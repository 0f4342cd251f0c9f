"""``examples/fsdp_iwrm.py`` under torchrun with 2 gloo processes (tests/test_docs.py leaves ``fsdp_*`` examples to this test)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.distributed._launch import free_port

ROOT = Path(__file__).parents[2]
EXAMPLE = ROOT / "examples" / "fsdp_iwrm.py"


def test_the_fsdp_example_trains_on_two_processes_and_resumes_from_its_checkpoint() -> None:
    # This checkout's jdoptim, whatever the environment has installed.
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
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
    assert "rank 0 holds (16, 10) of the (32, 10) weight" in result.stdout, result.stdout
    assert "2 ranks, resumed from the checkpoint: True" in result.stdout, result.stdout
