#!/usr/bin/env bash
# The whole check suite: lint, format, strict typing, tests. Sets up the virtualenv first (with the
# dev and bench extras, the plot and progress extras the demo's test exercises, and the lightning
# and accelerate extras the trainer-integration tests use).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/_setup_venv.sh dev,bench,plot,progress,lightning,accelerate
venv="${JDOPTIM_VENV:-.venv}"
"$venv/bin/ruff" check .
"$venv/bin/ruff" format --check .
"$venv/bin/mypy" --strict jdoptim
# pytest exits 5 when it collects no test: set -e turns that (and any failure) into a failed check.
"$venv/bin/python" -m pytest "$@"
