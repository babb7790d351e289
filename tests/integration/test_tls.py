"""AMQP over TLS and S3 over HTTPS, verified against a locally generated CA: deskvault works with a
server whose certificate that CA signed, and refuses one it did not sign.

S3: SeaweedFS's own HTTPS listener. AMQP: this machine's RabbitMQ has no TLS listener (adding one means
reconfiguring the system broker), so a TLS terminator stands in front of it, as a load balancer would.
"""

from __future__ import annotations

import subprocess
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlparse

import pytest
from support import TlsProxy, build_settings, deskvault_command, self_signed_cert, worker_context

from deskvault_core.config import load_settings
from deskvault_core.errors import ConfigError
from messages.events import AccountExpired
from producers.publisher import Publisher, PublishError
from workers.context import open_repository
from workers.queues import queue_depths
from workers.repository.errors import RepositoryError

pytestmark = pytest.mark.integration


@pytest.fixture
def certificates(tmp_path: Path) -> dict[str, tuple[Path, Path]]:
    """Two local CAs (each signing its own server certificate): the servers use 'local', and deskvault
    is given either 'local' or 'other', a CA that did not sign them."""
    made = {}
    for name in ("local", "other"):
        (tmp_path / name).mkdir()
        made[name] = self_signed_cert(tmp_path / name)
    return made


@pytest.fixture
def servers(certificates, rabbit_url: str, own_seaweedfs):
    """RabbitMQ behind a TLS terminator, and a SeaweedFS serving S3 over HTTPS, both with 'local'."""
    amqp = TlsProxy(urlparse(rabbit_url).port, *certificates["local"])
    plain = own_seaweedfs.start(https=certificates["local"])
    yield amqp.port, replace(plain, endpoint_url=f"https://127.0.0.1:{own_seaweedfs.https_port}")
    amqp.close()


def _tls_settings(tmp_path, key_file, rabbit_url, control_db_odbc, pg_target, servers, ca: Path):
    amqp_port, s3 = servers
    tenant = f"tls{uuid.uuid4().hex[:8]}"
    settings = build_settings(
        tmp_path,
        key_file,
        s3,
        f"amqps://guest:guest@127.0.0.1:{amqp_port}{urlparse(rabbit_url).path}",
        control_db_odbc,
        pg_target,
        extra=f'[tenants.{tenant}]\nplan = "paid"\ndatabase = "{tenant}"\ntarget = "main"\n',
    )
    text = Path(settings.source).read_text()
    text = text.replace("[broker]\n", f'[broker]\nca_bundle = "{ca}"\n', 1)
    text = text.replace("[repository]\n", f'[repository]\nca_bundle = "{ca}"\n', 1)
    Path(settings.source).write_text(text)
    return load_settings(settings.source, env={})


def test_with_servers_the_ca_signed_everything_works(
    tmp_path, key_file, rabbit_url, control_db_odbc, pg_target, certificates, servers
) -> None:
    ca = certificates["local"][0]
    settings = _tls_settings(tmp_path, key_file, rabbit_url, control_db_odbc, pg_target, servers, ca)
    tenant = next(iter(t for t in settings.tenants if t.startswith("tls")))
    # S3 over HTTPS: a stored object reads back
    repo = open_repository(settings)
    repo.store.ensure_bucket()
    repo.put_json("tls-check.json", {"ok": True})
    assert repo.get_json("tls-check.json") == {"ok": True}
    # AMQP over TLS: an event published, counted, and handled by a worker connected over TLS
    worker_context(settings)
    event = AccountExpired.new(tenant=tenant, plan="paid", expired_at=datetime.now(UTC) - timedelta(days=1))
    with Publisher(settings.broker.url, delivery_limit=settings.broker.delivery_limit) as publisher:
        publisher.publish(event)
    assert queue_depths(settings.broker.url, ("lifecycle",))["lifecycle"].ready >= 1
    worker = subprocess.run(
        deskvault_command(settings, "worker", "--pool", "lifecycle", "--burst", "--no-metrics"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert worker.returncode == 0, worker.stderr[-2000:]
    assert worker_context(settings).ledger.job(event.idempotency_key).state == "done"


def test_servers_the_ca_did_not_sign_are_refused(
    tmp_path, key_file, rabbit_url, control_db_odbc, pg_target, certificates, servers
) -> None:
    other = certificates["other"][0]
    settings = _tls_settings(tmp_path, key_file, rabbit_url, control_db_odbc, pg_target, servers, other)
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
        .replace("[broker]\n", f'[broker]\nca_bundle = "{certificates["local"][0]}"\n', 1)
    )
    Path(settings.source).write_text(text)
    with pytest.raises(ConfigError, match=r"broker\.ca_bundle: set, but broker\.url is not amqps://"):
        load_settings(settings.source, env={})
