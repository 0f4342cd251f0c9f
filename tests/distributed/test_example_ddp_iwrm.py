"""``examples/ddp_iwrm.py`` under torchrun with 2 gloo processes (tests/test_docs.py leaves ``ddp_*`` examples to this test)."""

from __future__ import annotations

from pathlib import Path

from tests.distributed._launch import run_example

EXAMPLE = Path(__file__).parents[2] / "examples" / "ddp_iwrm.py"


def test_the_ddp_example_runs_on_two_processes_and_ends_with_identical_parameters() -> None:
    run_example(EXAMPLE, "2 ranks, identical parameters: True")
