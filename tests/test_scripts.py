"""The scripts of scripts/ that the suite does not otherwise run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_on_the_cpu(tmp_path: Path) -> None:
    """scripts/gpu_check.sh, small and on the CPU: what a session lent a GPU runs in one call
    must not fail on a flag or an import (its device-only parts are tests/test_accelerator.py)."""
    env = {
        **os.environ,
        "OUT": str(tmp_path),
        "PYTHON": sys.executable,
        "JDOPTIM_TEST_DEVICE": "cpu",
        "QUICK": "1",
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    tests = (tmp_path / "cuda-tests.txt").read_text()
    assert " passed" in tests and "failed" not in tests
    assert "| random | float32 | 48 |" in (tmp_path / "dual-cone.txt").read_text()
    steps = (tmp_path / "steps.txt").read_text()
    assert "| resnet18-gn B=2 |" in steps and "fails" not in steps.split("| mlp B=8 |")[1]
