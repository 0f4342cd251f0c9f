"""Runs a function on R gloo ranks over loopback, in fresh processes, bounded in time."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# A hung collective gives up after this many seconds (the group's timeout).
COLLECTIVE_TIMEOUT_S = 30
# The whole launch is killed after this many seconds.
LAUNCH_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# The fork server imports these once; every rank of every launch is then forked from it, so no
# rank pays for importing torch again.
_PRELOAD = ["torch", "torch.distributed", "jdoptim", "tests.distributed._scenarios"]


def run_ranks(fn: Callable[..., Any], world_size: int, out_dir: Path, *args: Any) -> list[Any]:
    """``fn(rank, world_size, *args)`` on each rank; returns each rank's result, rank order.

    A rank's exception is returned (as its formatted traceback, wrapped in ``RankError``) rather
    than raised, so tests can check that every rank failed.
    """
    port = free_port()
    mp.get_context("forkserver").set_forkserver_preload(_PRELOAD)
    context = mp.start_processes(
        _entry,
        args=(fn, world_size, port, str(out_dir), args),
        nprocs=world_size,
        join=False,
        start_method="forkserver",
    )
    try:
        deadline_steps = LAUNCH_TIMEOUT_S * 10
        for _ in range(deadline_steps):
            if context.join(timeout=0.1):
                break
        else:
            raise TimeoutError(f"The {world_size} ranks did not finish in {LAUNCH_TIMEOUT_S} s.")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return [
        torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)
    ]


class RankError:
    def __init__(self, kind: str, message: str) -> None:
        self.kind = kind
        self.message = message

    def __repr__(self) -> str:
        return f"RankError({self.kind}: {self.message})"


def _entry(
    rank: int,
    fn: Callable[..., Any],
    world_size: int,
    port: int,
    out_dir: str,
    args: tuple[Any, ...],
) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )
    try:
        try:
            result: Any = fn(rank, world_size, *args)
        except Exception as error:
            result = RankError(type(error).__name__, f"{error}\n{traceback.format_exc()}")
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


# gloo sometimes aborts a rank while the interpreter exits, after the script has finished (seen
# about 1 run in 10, with or without jdoptim's changes, as "terminate called without an active
# exception"): a teardown problem of torch, not a failed run. It is tolerated only there.
_TEARDOWN_ABORT = "terminate called without an active exception"


def run_example(script: Path, final_line: str, timeout: int = 120) -> str:
    """Runs ``script`` under torchrun on 2 gloo processes; returns rank 0's output.

    The run counts as passed when it exits cleanly, or when its only fault is the teardown abort
    above and rank 0 printed ``final_line`` (which it prints after a collective that every rank
    must reach, so every rank had finished its work).
    """
    root = Path(__file__).parents[2]
    # This checkout's jdoptim first on the path, whatever copy the interpreter has installed.
    path = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p)
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
        str(script),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    finished = final_line in result.stdout
    torn_down = _TEARDOWN_ABORT in result.stderr and finished
    assert result.returncode == 0 or torn_down, result.stdout[-2000:] + result.stderr[-3000:]
    assert finished, result.stdout
    return result.stdout


RankResults = tuple[int, list[Any]]


def rank_fixtures(scenarios_rank: Callable[..., Any], prefix: str) -> tuple[Any, Any, Any]:
    """The ``two_ranks``, ``three_ranks`` (module-scoped) and ``launch`` (both) fixtures.

    Each launch runs every scenario of ``scenarios_rank(rank, world, out_dir)`` once per world
    size; a test module binds the three to those names.
    """

    def launched(world: int, factory: pytest.TempPathFactory) -> RankResults:
        out_dir = factory.mktemp(f"{prefix}{world}")
        return world, run_ranks(scenarios_rank, world, out_dir, str(out_dir))

    @pytest.fixture(scope="module")
    def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> RankResults:
        return launched(2, tmp_path_factory)

    @pytest.fixture(scope="module")
    def three_ranks(tmp_path_factory: pytest.TempPathFactory) -> RankResults:
        return launched(3, tmp_path_factory)

    @pytest.fixture(params=["two_ranks", "three_ranks"])
    def launch(request: pytest.FixtureRequest) -> RankResults:
        result: RankResults = request.getfixturevalue(request.param)
        return result

    return two_ranks, three_ranks, launch


def ok(result: Any) -> dict[str, Any]:
    """A rank's scenario result, which must be a dict (an error comes back as a string)."""
    assert isinstance(result, dict), result
    return result
