#!/usr/bin/env bash
# Second command of the README (and what CI runs): set up if needed, then run the test suite.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q tests "$@"
