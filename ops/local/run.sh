#!/usr/bin/env bash
# Set everything up, then run the whole system locally (`deskvault up`) until Ctrl-C.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
bash ops/local/bootstrap.sh
exec .venv/bin/deskvault up "$@"
