#!/usr/bin/env bash
# Runs the test suite, installing what it needs first (bash setup.sh).
#   bash test.sh                 # everything (CPU, offline, a few minutes)
#   bash test.sh -k answers -x   # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")"
bash setup.sh
exec .venv/bin/python -m pytest tests "$@"
