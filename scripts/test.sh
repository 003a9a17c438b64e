#!/usr/bin/env bash
# Command (2) of the README: set up, then run the whole test suite (slow and
# reliability suites included). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
DEEPCLUSTER_APT="${DEEPCLUSTER_APT-chromium}" bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
