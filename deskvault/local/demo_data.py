"""A helpdesk database of generated tickets, replies, users and knowledge-base articles (demos, tests)."""

from __future__ import annotations

SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    id bigint PRIMARY KEY, email text NOT NULL UNIQUE, name text NOT NULL, is_agent boolean NOT NULL,
    created_at timestamptz NOT NULL);
CREATE TABLE IF NOT EXISTS tickets (
    id bigint PRIMARY KEY, subject text NOT NULL, body text NOT NULL, status text NOT NULL,
    priority int NOT NULL, requester_id bigint NOT NULL REFERENCES users(id),
    created_at timestamptz NOT NULL);
CREATE TABLE IF NOT EXISTS replies (
    id bigint PRIMARY KEY, ticket_id bigint NOT NULL REFERENCES tickets(id), author_id bigint NOT NULL
    REFERENCES users(id), body text NOT NULL, created_at timestamptz NOT NULL);
CREATE TABLE IF NOT EXISTS kb_articles (
    id bigint PRIMARY KEY, title text NOT NULL, body text NOT NULL, published boolean NOT NULL,
    updated_at timestamptz NOT NULL);
CREATE TABLE IF NOT EXISTS attachments (
    id bigint PRIMARY KEY, ticket_id bigint NOT NULL REFERENCES tickets(id), file_name text NOT NULL,
    content bytea NOT NULL);
"""

# Deterministic (derived from ids) so two runs build the same data; distinct md5 text per row compresses
# about as well as real ticket text does (2-3x), unlike repeated strings.
FILL = """
INSERT INTO users SELECT g, 'user' || g || '@{tenant}.example', 'User ' || g, g % 20 = 0,
    timestamptz '2024-01-01' + g * interval '37 minutes'
  FROM generate_series(1, {users}) g ON CONFLICT DO NOTHING;
INSERT INTO tickets SELECT g, 'Ticket ' || g || ': ' || md5(g::text),
    (SELECT string_agg(md5(g::text || ':' || i), ' ') FROM generate_series(1, 8 + g % 24) i),
    (ARRAY['open','pending','solved','closed'])[1 + g % 4], g % 5, 1 + g % {users},
    timestamptz '2024-01-01' + g * interval '11 minutes'
  FROM generate_series(1, {tickets}) g ON CONFLICT DO NOTHING;
INSERT INTO replies SELECT g, 1 + g % {tickets}, 1 + (g * 7) % {users},
    (SELECT string_agg(md5(g::text || '/' || i), ' ') FROM generate_series(1, 4 + g % 16) i),
    timestamptz '2024-01-02' + g * interval '5 minutes'
  FROM generate_series(1, {replies}) g ON CONFLICT DO NOTHING;
INSERT INTO kb_articles SELECT g, 'How to ' || md5(g::text),
    (SELECT string_agg(md5(g::text || '#' || i), ' ') FROM generate_series(1, 64) i),
    g % 3 <> 0, timestamptz '2024-02-01' + g * interval '1 day'
  FROM generate_series(1, {articles}) g ON CONFLICT DO NOTHING;
INSERT INTO attachments SELECT g, 1 + g % {tickets}, 'screenshot-' || g || '.png',
    (SELECT string_agg(decode(md5(g::text || '.' || i), 'hex'), ''::bytea) FROM generate_series(1, 32) i)
  FROM generate_series(1, {attachments}) g ON CONFLICT DO NOTHING;
"""


def helpdesk_sql(tenant: str, scale: int = 1) -> str:
    """SQL that creates and fills one tenant's helpdesk database (idempotent: re-running adds nothing)."""
    sizes = {
        "users": 200 * scale,
        "tickets": 2000 * scale,
        "replies": 6000 * scale,
        "articles": 50 * scale,
        "attachments": 300 * scale,
    }
    return SCHEMA + FILL.format(tenant=tenant, **sizes)


TABLES = ("users", "tickets", "replies", "kb_articles", "attachments")


def table_fingerprint_sql(table: str) -> str:
    """Row count and an order-independent checksum of a table's full contents."""
    return (
        f"SELECT count(*) || ':' || coalesce(md5(string_agg(md5(t::text), '' ORDER BY md5(t::text))), '-') "
        f"FROM {table} t"
    )
