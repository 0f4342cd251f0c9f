#!/usr/bin/env bash
# Creates (or reuses) the virtualenv at $JDOPTIM_VENV (default .venv) and installs jdoptim with its
# dev and bench extras (bench: the peer, TorchJD, for cross-checks) and the trainer integrations'
# extras (lightning, accelerate), so their tests run. torch is pinned by constraints.txt so pip takes the local CPU build.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${JDOPTIM_VENV:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev,bench,lightning,accelerate]"
