"""AMQP over TLS and S3 over HTTPS, verified against a locally generated CA: deskvault works through a
server whose certificate that CA signed, and refuses one it did not sign."""

from __future__ import annotations

import subprocess
import sys
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlparse

import pytest
from support import TlsProxy, build_settings, self_signed_cert, worker_context

from deskvault.config import load_settings
from deskvault.errors import ConfigError
from messages.events import AccountExpired
from producers.publisher import Publisher, PublishError
from workers.context import open_repository
from workers.queues import queue_depths
from workers.repository.errors import RepositoryError

pytestmark = pytest.mark.integration


@pytest.fixture
def certificates(tmp_path: Path) -> dict[str, tuple[Path, Path]]:
    """'trusted': signed by the CA deskvault is given; 'rogue': by a CA it has never seen."""
    made = {}
    for name in ("trusted", "rogue"):
        (tmp_path / name).mkdir()
        made[name] = self_signed_cert(tmp_path / name)
    return made


@pytest.fixture
def proxies(certificates, rabbit_url: str, s3_endpoint):
    made = {
        (service, name): TlsProxy(upstream, *certificates[name])
        for service, upstream in (
            ("amqp", urlparse(rabbit_url).port),
            ("s3", urlparse(s3_endpoint.endpoint_url).port),
        )
        for name in ("trusted", "rogue")
    }
    yield {key: proxy.port for key, proxy in made.items()}
    for proxy in made.values():
        proxy.close()


def _tls_settings(
    tmp_path, key_file, s3_endpoint, rabbit_url, control_db_odbc, pg_target, ca: Path, amqp, s3
):
    vhost = urlparse(rabbit_url).path
    s3_tls = replace(s3_endpoint, endpoint_url=f"https://127.0.0.1:{s3}")
    settings = build_settings(
        tmp_path,
        key_file,
        s3_tls,
        f"amqps://guest:guest@127.0.0.1:{amqp}{vhost}",
        control_db_odbc,
        pg_target,
        extra=f'[tenants.tls{uuid.uuid4().hex[:8]}]\nplan = "paid"\ndatabase = "acme"\ntarget = "main"\n',
    )
    text = Path(settings.source).read_text()
    text = text.replace("[broker]\n", f'[broker]\nca_bundle = "{ca}"\n', 1)
    text = text.replace("[repository]\n", f'[repository]\nca_bundle = "{ca}"\n', 1)
    Path(settings.source).write_text(text)
    return load_settings(settings.source, env={})


def test_through_servers_the_ca_signed_everything_works(
    tmp_path, key_file, s3_endpoint, rabbit_url, control_db_odbc, pg_target, certificates, proxies
) -> None:
    ca = certificates["trusted"][0]
    settings = _tls_settings(
        tmp_path,
        key_file,
        s3_endpoint,
        rabbit_url,
        control_db_odbc,
        pg_target,
        ca,
        proxies[("amqp", "trusted")],
        proxies[("s3", "trusted")],
    )
    tenant = next(iter(t for t in settings.tenants if t.startswith("tls")))
    # S3 over HTTPS: a stored object reads back
    repo = open_repository(settings)
    repo.store.ensure_bucket()
    repo.put_json("tls-check.json", {"ok": True})
    assert repo.get_json("tls-check.json") == {"ok": True}
    # AMQP over TLS: an event published, counted, and handled by a worker connected through TLS
    worker_context(settings)
    event = AccountExpired.new(tenant=tenant, plan="paid", expired_at=datetime.now(UTC) - timedelta(days=1))
    with Publisher(settings.broker.url, delivery_limit=settings.broker.delivery_limit) as publisher:
        publisher.publish(event)
    assert queue_depths(settings.broker.url, ("lifecycle",))["lifecycle"].ready >= 1
    worker = subprocess.run(
        [
            sys.executable,
            "-m",
            "deskvault.cli",
            "--config",
            str(settings.source),
            "worker",
            "--pool",
            "lifecycle",
            "--burst",
            "--no-metrics",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert worker.returncode == 0, worker.stderr[-2000:]
    assert worker_context(settings).ledger.job(event.idempotency_key).state == "done"


def test_servers_the_ca_did_not_sign_are_refused(
    tmp_path, key_file, s3_endpoint, rabbit_url, control_db_odbc, pg_target, certificates, proxies
) -> None:
    settings = _tls_settings(
        tmp_path,
        key_file,
        s3_endpoint,
        rabbit_url,
        control_db_odbc,
        pg_target,
        certificates["trusted"][0],
        proxies[("amqp", "rogue")],
        proxies[("s3", "rogue")],
    )
    with pytest.raises(RepositoryError, match=r"(?i)certificate"):
        open_repository(settings).store.ensure_bucket()
    with (
        pytest.raises(PublishError, match=r"cannot reach RabbitMQ .*SSLCertVerificationError"),
        Publisher(settings.broker.url, delivery_limit=settings.broker.delivery_limit) as publisher,
    ):
        publisher._open()


def test_a_ca_bundle_without_tls_is_a_configuration_error(tmp_path, make_settings, certificates) -> None:
    settings = make_settings()
    text = (
        Path(settings.source)
        .read_text()
        .replace("[broker]\n", f'[broker]\nca_bundle = "{certificates["trusted"][0]}"\n', 1)
    )
    Path(settings.source).write_text(text)
    with pytest.raises(ConfigError, match=r"broker\.ca_bundle: set, but broker\.url is not amqps://"):
        load_settings(settings.source, env={})
