"""The import rules of docs/design.md's module map, enforced: which package may import which.

Every first-party import is read from the source (lazy imports inside functions too) and checked
against the rule of the most specific package that holds the importing module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FIRST_PARTY = ("deskvault", "deskvault_core", "messages", "producers", "workers")
ENGINE_FACE = ("workers.engines.base", "workers.engines.registry", "workers.engines.procstream")
CORE = "deskvault_core"

# package -> the first-party packages and modules it may import (its own always included).
MAY_IMPORT: dict[str, tuple[str, ...]] = {
    "deskvault_core": (),
    "messages": (CORE,),
    "producers": (CORE, "messages", "workers.ledger", "workers.tenants"),
    "workers.repository": (CORE,),
    "workers.ledger": (CORE,),
    "workers.engines": (CORE, "workers.repository", "workers.errors", "workers.metrics"),
    "workers.backups": (CORE, "workers.repository", "workers.ledger", *ENGINE_FACE),
    "workers.servers": (CORE, "workers.repository", "workers.errors"),
    "workers.tenants": (CORE, "workers.repository", "workers.context", "workers.errors", *ENGINE_FACE),
    "workers.handlers": (
        CORE,
        "messages",
        "producers.publisher",
        "workers.backups",
        "workers.context",
        "workers.errors",
        "workers.jobs",
        "workers.ledger",
        "workers.metrics",
        "workers.repository",
        "workers.servers",
        "workers.tenants",
        *ENGINE_FACE,
    ),
    # The pool machinery (actors, broker, runner, jobs, context, metrics, ...): all of workers but an
    # engine's own package.
    "workers": (CORE, "messages", "producers.publisher", "workers"),
    "deskvault.local": (CORE, "messages", "workers", "deskvault.local"),
    "deskvault": FIRST_PARTY,
}
# Who may import an engine's own package (workers/engines/<engine>/) besides that package itself: the
# registry, which builds engines from `targets.<name>.engine`, and the local demo (a PostgreSQL cluster).
ENGINE_PACKAGE_USERS = ("workers.engines.registry", "deskvault.local")
# The demo helpers are for `deskvault up` only.
LOCAL_USERS = ("deskvault.cli", "deskvault.local")


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports_of(module: str, source: str, *, is_package: bool = False) -> list[str]:
    """The first-party modules (or, for `from X import name`, X) that `source` imports."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                child = f"{base}.{alias.name}"
                found.append(child if _is_module(child) else base)
    return [name for name in found if name.split(".")[0] in FIRST_PARTY]


def engine_package(name: str) -> str | None:
    """`workers.engines.<engine>` if `name` lies inside an engine's own package."""
    parts = name.split(".")
    if len(parts) >= 3 and parts[:2] == ["workers", "engines"]:
        package = ".".join(parts[:3])
        if (ROOT.joinpath(*parts[:3]) / "__init__.py").is_file():
            return package
    return None


def violations(module: str, imported: list[str]) -> list[str]:
    """What `module` may not import, each as `module -> name: why`."""
    rule = max((p for p in MAY_IMPORT if _within(module, p)), key=len, default=None)
    if rule is None:
        return [f"{module}: no import rule covers it; add its package to MAY_IMPORT"]
    allowed = (rule, *MAY_IMPORT[rule])
    found = []
    for name in imported:
        if not any(_within(name, a) for a in allowed):
            found.append(f"{module} -> {name}: {rule} may import only {', '.join(allowed)}")
        engine = engine_package(name)
        if (
            engine
            and not _within(module, engine)
            and not any(_within(module, u) for u in ENGINE_PACKAGE_USERS)
        ):
            found.append(f"{module} -> {name}: only the engine registry reaches an engine's package")
        if _within(name, "deskvault.local") and not any(_within(module, u) for u in LOCAL_USERS):
            found.append(f"{module} -> {name}: the local demo helpers are for `deskvault up` and tests")
    return found


def _first_party_files() -> list[Path]:
    return sorted(p for top in FIRST_PARTY for p in (ROOT / top).rglob("*.py"))


def test_every_first_party_import_follows_the_rules() -> None:
    found = []
    for path in _first_party_files():
        module = _module_name(path)
        found += violations(
            module, imports_of(module, path.read_text(), is_package=path.name == "__init__.py")
        )
    assert found == []


def test_the_rules_name_only_packages_that_exist() -> None:
    named = set(MAY_IMPORT) | {n for names in MAY_IMPORT.values() for n in names}
    named |= set(ENGINE_PACKAGE_USERS) | set(LOCAL_USERS)
    assert sorted(n for n in named if not _is_module(n)) == []


@pytest.mark.parametrize(
    ("module", "source", "why"),
    [
        (
            "workers.handlers.backup",
            "from workers.engines.postgresql.basebackup import full_backup",
            "only the engine registry",
        ),
        ("workers.handlers.drill", "from deskvault.local.up import run_up", "may import only"),
        (
            "workers.backups.verify",
            "import workers.engines.postgresql.walarchive",
            "only the engine registry",
        ),
        ("workers.tenants.exports", "from deskvault.cli import main", "may import only"),
        ("producers.scheduler", "from workers.handlers.backup import handle_backup_due", "may import only"),
        ("messages.events", "from workers.errors import PermanentError", "may import only"),
        ("deskvault_core.config", "from messages.topology import POOLS", "may import only"),
        ("workers.repository.s3", "from workers.ledger.ledger import Ledger", "may import only"),
        ("workers.engines.postgresql.restore", "from workers.handlers import drill", "may import only"),
        ("deskvault.status", "from deskvault.local import seaweedfs", "the local demo helpers"),
        (
            "workers.jobs",
            "def f():\n    from workers.engines.postgresql import engine",
            "only the engine registry",
        ),
    ],
)
def test_a_forbidden_import_is_reported(module: str, source: str, why: str) -> None:
    found = violations(module, imports_of(module, source))
    assert any(why in v for v in found), found


def test_allowed_imports_pass() -> None:
    assert (
        violations(
            "workers.handlers.backup",
            imports_of("workers.handlers.backup", "from workers.engines.registry import engine_for"),
        )
        == []
    )
    assert (
        violations(
            "workers.engines.postgresql.engine",
            imports_of("workers.engines.postgresql.engine", "from . import restore"),
        )
        == []
    )
    assert violations("deskvault.local.up", ["workers.engines.postgresql.cluster"]) == []
