"""Settings: TOML plus DESKVAULT_* overrides, validated with errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from deskvault_core.config import load_settings
from deskvault_core.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[2] / "deskvault.example.toml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_the_documented_example_file_loads() -> None:
    settings = load_settings(EXAMPLE, env={})
    assert settings.targets["main"].engine == "postgresql"
    assert settings.targets["main"].schedule.full == "0 1 * * 0"
    assert settings.servers["app1"].schedule == "0 3 * * *"


def test_environment_overrides_any_key_with_type_conversion() -> None:
    env = {
        "DESKVAULT_REPOSITORY__SECRET_KEY": "s3cr3t",
        "DESKVAULT_BROKER__MAX_RETRIES": "3",
        "DESKVAULT_TARGETS__MAIN__CONNINFO": "host=elsewhere",
        "DESKVAULT_TARGETS__EXTRA__ENGINE": "postgresql",
        "DESKVAULT_TARGETS__EXTRA__CONNINFO": "host=x",
    }
    settings = load_settings(EXAMPLE, env=env)
    assert settings.repository.secret_key == "s3cr3t"
    assert settings.broker.max_retries == 3
    assert settings.targets["main"].conninfo == "host=elsewhere"
    assert set(settings.targets) == {"main", "extra"}


def test_the_secret_key_never_shows_in_repr() -> None:
    settings = load_settings(EXAMPLE, env={"DESKVAULT_REPOSITORY__SECRET_KEY": "s3cr3t-value"})
    assert "s3cr3t-value" not in repr(settings)


def test_config_file_named_by_env_var(tmp_path: Path) -> None:
    path = write(tmp_path, '[repository]\nbucket = "b2"\n')
    assert load_settings(env={"DESKVAULT_CONFIG": str(path)}).repository.bucket == "b2"


@pytest.mark.parametrize(
    ("text", "env", "key"),
    [
        ("[brokr]\nurl='x'\n", {}, "brokr"),
        ("[broker]\nurll='x'\n", {}, "broker.urll"),
        ("[broker]\nmax_retries='many'\n", {}, "broker.max_retries"),
        ("[broker]\nmax_retries=true\n", {}, "broker.max_retries"),
        ("[broker]\nmax_retries=-1\n", {}, "broker.max_retries"),
        ("[repository]\nbucket=3\n", {}, "repository.bucket"),
        ("[targets.main]\nengine='postgresql'\n", {}, "targets.main.conninfo"),
        ("[targets.main]\nengine='oracle'\nconninfo='x'\n", {}, "targets.main.engine"),
        ("[targets.Main]\nengine='postgresql'\nconninfo='x'\n", {}, "targets.Main"),
        (
            "[targets.main]\nengine='postgresql'\nconninfo='x'\n[targets.main.schedule]\nfull='0 25 * * *'\n",
            {},
            "targets.main.schedule.full",
        ),
        ("[servers.app1]\nschedule='nope'\n", {}, "servers.app1.schedule"),
        ("", {"DESKVAULT_BROKER__DELIVERY_LIMIT": "five"}, "broker.delivery_limit"),
    ],
)
def test_invalid_settings_name_the_key(tmp_path: Path, text: str, env: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, text), env=env)
    assert str(caught.value).startswith(key + ":")


def test_missing_and_malformed_files_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist; pass --config"):
        load_settings(tmp_path / "nope.toml", env={})
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(write(tmp_path, "[broker\n"), env={})


def test_an_unknown_target_lists_the_configured_ones() -> None:
    settings = load_settings(EXAMPLE, env={})
    with pytest.raises(ConfigError, match=r"targets.nope: no such target .*\(configured: main\)"):
        settings.target("nope")


TARGET = "[targets.main]\nengine='postgresql'\nconninfo='x'\n"


def _tenant(name: str, database: str) -> str:
    return f"[tenants.{name}]\nplan='team'\ndatabase='{database}'\ntarget='main'\n"


@pytest.mark.parametrize(
    ("tenants", "key", "said"),
    [
        (_tenant("a", "shared") + _tenant("b", "shared"), "tenants.b.database", "is also tenant a's"),
        (_tenant("a", "postgres"), "tenants.a.database", "'postgres' is the server's own database"),
        (_tenant("a", "template0"), "tenants.a.database", "'template0' is the server's own database"),
        (_tenant("a", "deskvault"), "tenants.a.database", "'deskvault' is deskvault's control database"),
    ],
)
def test_a_tenant_never_names_another_tenants_or_the_servers_database(tmp_path, tenants, key, said) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, TARGET + tenants), env={})
    assert str(caught.value).startswith(key + ":") and said in str(caught.value)
