"""``examples/ddp_iwrm.py`` under torchrun with 2 gloo processes (tests/test_docs.py leaves ``ddp_*`` examples to this test)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.distributed._launch import free_port

ROOT = Path(__file__).parents[2]
EXAMPLE = ROOT / "examples" / "ddp_iwrm.py"


def test_the_ddp_example_runs_on_two_processes_and_ends_with_identical_parameters() -> None:
    # This checkout's jdoptim first on the path, whatever copy the interpreter has installed.
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "JDOPTIM_SMALL": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(EXAMPLE),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 ranks, identical parameters: True" in result.stdout, result.stdout
