#!/usr/bin/env bash
# Sets up the virtualenv with what the demo needs (jdoptim, torch, and the optional progress bar and
# plot), then runs the demo: SGD vs JDSGD(UPGrad) on per-instance losses.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/_setup_venv.sh plot,progress
"${JDOPTIM_VENV:-.venv}/bin/python" examples/demo.py
