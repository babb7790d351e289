#!/usr/bin/env bash
# Set everything up, then run the whole test suite (unit and integration) against real services.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
bash ops/local/bootstrap.sh
.venv/bin/ruff check --quiet .
exec .venv/bin/pytest "$@"
