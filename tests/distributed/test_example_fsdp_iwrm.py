"""``examples/fsdp_iwrm.py`` under torchrun with 2 gloo processes (tests/test_docs.py leaves ``fsdp_*`` examples to this test)."""

from __future__ import annotations

from pathlib import Path

from tests.distributed._launch import run_example

EXAMPLE = Path(__file__).parents[2] / "examples" / "fsdp_iwrm.py"


def test_the_fsdp_example_trains_on_two_processes_and_resumes_from_its_checkpoint() -> None:
    output = run_example(EXAMPLE, "2 ranks, resumed from the checkpoint: True")
    assert "rank 0 holds (16, 10) of the (32, 10) weight" in output, output
