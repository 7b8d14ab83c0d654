#!/usr/bin/env bash
# First command of the README: set everything up (idempotent), then run the quickstart on built-in data.
# Extra arguments go to `lmforge quickstart` (e.g. --minutes 1 --no-finetune).
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
exec .venv/bin/lmforge quickstart "$@"
