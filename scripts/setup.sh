#!/usr/bin/env bash
# Set up deepcluster on a fresh Debian machine with Python 3.11: Debian's Fashion-MNIST
# (when apt is available), a virtual environment in .venv, the package with its test extras.
# Extra Debian packages can be named in DEEPCLUSTER_APT (e.g. "chromium" for the report test).
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  if [ ! -d /usr/share/datasets/fashion-mnist ] || [ -n "${DEEPCLUSTER_APT:-}" ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      dataset-fashion-mnist ${DEEPCLUSTER_APT:-} >/dev/null
  fi
elif [ ! -d /usr/share/datasets/fashion-mnist ]; then
  echo "note: install Debian's dataset-fashion-mnist (sudo apt-get install dataset-fashion-mnist)" \
       "or pass --data-root; without either, torchvision downloads Fashion-MNIST." >&2
fi
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test,tensorboard,parquet,cluster]"
.venv/bin/python -c "import torch, torchvision, faiss; print('deepcluster ready: torch', torch.__version__, \
'torchvision', torchvision.__version__, 'faiss', faiss.__version__)"
