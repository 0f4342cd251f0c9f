#!/usr/bin/env bash
# Sets up the virtualenv and runs the main demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/_setup_venv.sh
"${JDOPTIM_VENV:-.venv}/bin/python" examples/iwrm.py
