#!/usr/bin/env bash
# Creates (or reuses) the virtualenv at $JDOPTIM_VENV (default .venv) and installs jdoptim (editable)
# with the extras named in $1 (default: dev,bench,plot,progress,lightning,accelerate; bench is the
# peer, TorchJD, for cross-checks; lightning and accelerate let the trainer-integration tests run).
# torch is pinned by constraints.txt so pip takes the local CPU build.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${JDOPTIM_VENV:-.venv}"
extras="${1:-dev,bench,plot,progress,lightning,accelerate}"
if [ ! -x "$venv/bin/python" ]; then
    echo "Creating the virtualenv $venv ..."
    python3 -m venv "$venv"
fi
echo "Installing jdoptim[$extras] into $venv (torch pinned by constraints.txt) ..."
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[$extras]"
