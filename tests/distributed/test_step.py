"""Distributed steps on 2 and 3 gloo ranks (spawned, loopback) against single-process runs.

Each world size is launched once, running every scenario of ``_scenarios.py`` in one process
group; the tests below check the results. Time-bounded by ``_launch``'s timeouts.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from jdoptim import JDSGD
from jdoptim import _global_hooks as global_hooks
from jdoptim.aggregation import SDMGradWeighting
from tests.distributed import _scenarios as scenarios
from tests.distributed._launch import ok, rank_fixtures
from tests.distributed._scenarios import assert_every_rank_skipped_the_overflow, same

TOLERANCE = 1e-10


two_ranks, three_ranks, launch = rank_fixtures(scenarios.all_scenarios_rank, "ranks")


def _close(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, atol=TOLERANCE, rtol=0.0)


def test_instance_wise_steps_equal_one_process_on_the_global_batch(launch: Any) -> None:
    world, ranks = launch
    for method, sizes, ddp, batch_dim in scenarios.IWRM_CASES[world]:
        key = f"iwrm-{method}-{sizes}-ddp={ddp}-bd={batch_dim}"
        reference = scenarios.iwrm_reference(method, sizes, batch_dim)
        for rank in ranks:
            result = ok(rank[key])
            _close(result["params"], reference["params"])
            _close([result["losses"]], [reference["losses"]])
        for rank in ranks[1:]:  # bit-identical across ranks, not just close
            for a, b in zip(rank[key]["params"], ranks[0][key]["params"], strict=True):
                assert torch.equal(a, b), key


def test_a_rank_whose_terms_take_other_forms_still_equals_one_process(launch: Any) -> None:
    """One rank holds a single instance, for which the engine forms some layers' terms otherwise;
    the ranks agree on one form per parameter (per-row gradients where they differ)."""
    from tests.distributed._fsdp_scenarios import encoder_reference

    world, ranks = launch
    reference = encoder_reference(scenarios.ONE_INSTANCE_SIZES[world])
    for rank in ranks:
        result = ok(rank["encoder-one-instance"])
        _close(result["params"], reference["params"])
        _close([result["losses"]], [reference["losses"]])


@pytest.mark.parametrize(
    "kind",
    ["mtl", "tasks", "famo", "uw"],
    ids=[
        "multi-task mode (shared_params)",
        "task losses without batch_dim are means over ranks",
        "FAMO scalarizer, after_step re-evaluating the global losses",
        "UW scalarizer, whose parameters every rank differentiates whole",
    ],
)
def test_per_task_loss_steps_equal_one_process_on_the_global_batch(launch: Any, kind: str) -> None:
    world, ranks = launch
    reference = scenarios.task_losses_reference(kind, world, scenarios.MTL_BATCH[world])
    for rank in ranks:
        result = ok(rank[kind])
        _close(result["params"], reference["params"])
        _close([result["losses"]], [reference["losses"]])
        for a, b in zip(result["params"], ranks[0][kind]["params"], strict=True):
            assert torch.equal(a, b)


def test_a_failing_rank_makes_every_rank_raise_without_changing_parameters(launch: Any) -> None:
    world, ranks = launch
    for failure in scenarios.FAILURES[world]:
        outcomes = [ok(rank[f"failure-{failure}"]) for rank in ranks]
        for rank, outcome in enumerate(outcomes):
            assert outcome["error"] is not None, (failure, rank)
            assert outcome["unchanged"], (failure, rank)
            kind, message = outcome["error"]
            if failure == "shape":  # every rank sees the mismatch and says so
                assert kind == "ValueError" and "different numbers of dims" in message
            elif rank == 1:  # the failing rank raises its own error
                expected = "data loader broke" if failure == "raise" else "non-finite"
                assert expected in message.lower() or "nan" in message.lower(), message
            else:
                assert kind == "DistributedStepError", message
                assert "rank 1" in message, message


def test_a_failing_rank_in_multi_task_mode_makes_every_rank_raise(two_ranks: Any) -> None:
    _, ranks = two_ranks
    outcomes = [ok(rank["failure-mtl"]) for rank in ranks]
    assert outcomes[0]["error"] == ("RuntimeError", "rank 0 ran out of memory")
    kind, message = outcomes[1]["error"]
    assert kind == "DistributedStepError" and "rank 0: RuntimeError" in message
    assert all(outcome["unchanged"] for outcome in outcomes)


def _every_rank_raised(ranks: list[dict[str, Any]], key: str, words: str) -> None:
    """Every rank's scenario ``key`` returned a ValueError's message holding ``words``."""
    for rank in ranks:
        message = rank[key]
        assert isinstance(message, str) and words in message, message


def test_ranks_with_differently_built_optimizers_all_raise(two_ranks: Any) -> None:
    _every_rank_raised(two_ranks[1], "mismatched-methods", "different kinds of steps")


def test_ranks_whose_instances_take_different_branches_equal_one_process(two_ranks: Any) -> None:
    """Rank 0's instances go through one head, rank 1's through the other: each rank has terms for
    another parameter, which were paired by position (a wrong cross-rank Gramian, silently)."""
    _, ranks = two_ranks
    reference = scenarios.branch_per_rank_reference()
    for rank in ranks:
        _close(ok(rank["branch-per-rank"])["params"], reference["params"])


def test_ranks_with_different_gramian_weightings_all_raise(two_ranks: Any) -> None:
    """UPGrad on one rank, MGDA on the other: the same kind of step, so it went unnoticed and
    every rank applied rank 0's weights."""
    _every_rank_raised(two_ranks[1], "mismatched-gramian-methods", "different methods")


def test_another_ddp_model_trained_by_a_torch_optimizer_keeps_its_synchronisation(
    two_ranks: Any,
) -> None:
    _, ranks = two_ranks
    first, second = (ok(rank["second-ddp-model"])["params"] for rank in ranks)
    _close(first, second)
    assert any(float(p.abs().max()) > 0 for p in first)


def test_batch_norm_buffers_follow_rank_zero_as_under_plain_ddp(two_ranks: Any) -> None:
    _, ranks = two_ranks
    results = [ok(rank["batch-norm-buffers"]) for rank in ranks]
    for result in results:  # each rank's buffers as plain DDP leaves them
        _close(result["buffers"]["jdoptim"], result["buffers"]["plain"])
    first, second = (result["outputs"]["jdoptim"] for result in results)
    assert torch.equal(first, second)  # the eval forward broadcast rank 0's buffers


def test_a_plain_backward_before_the_optimizers_is_averaged_over_ranks(two_ranks: Any) -> None:
    _, ranks = two_ranks
    first, second = (ok(rank["plain-backward-first"])["params"] for rank in ranks)
    _close(first, second)


def test_a_sparse_embedding_trains_on_every_rank_alike(two_ranks: Any) -> None:
    _, ranks = two_ranks
    first, second = (ok(rank["sparse-table"])["params"] for rank in ranks)
    _close(first, second)


def test_a_static_graph_ddp_model_is_a_clear_error_on_every_rank(two_ranks: Any) -> None:
    _every_rank_raised(two_ranks[1], "static-graph", "static_graph=True")


def test_a_first_step_failing_after_the_forward_pass_raises_on_every_rank(two_ranks: Any) -> None:
    """The optimizer learns of the DDP model from the first forward pass; a closure failing after
    it raised on its rank alone, and the others waited in the step's exchanges."""
    _, ranks = two_ranks
    outcomes = [ok(rank["first-step-failure"])["outcomes"] for rank in ranks]
    assert outcomes[0][0] == "DistributedStepError" and outcomes[1][0] == "RuntimeError"
    for outcome in outcomes:
        assert outcome[1:] == [(6,)] * (scenarios.STEPS - 1)


def test_a_checkpoint_of_rank_zero_resumes_bit_identically(two_ranks: Any) -> None:
    _, ranks = two_ranks
    for rank in ranks:
        result = ok(rank["resume"])
        for a, b in zip(result["straight"], result["resumed"], strict=True):
            assert torch.equal(a, b)


@pytest.fixture
def single_rank_group() -> Iterator[None]:
    """A one-rank gloo group in this process (no network), destroyed after the test."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_a_process_group_must_be_a_process_group() -> None:
    model = scenarios.iwrm_model()
    with pytest.raises(TypeError, match="ProcessGroup"):
        JDSGD(model.parameters(), lr=0.1, process_group="world")  # type: ignore[arg-type]


def test_unsupported_methods_are_rejected_when_the_optimizer_is_built(
    single_rank_group: None,
) -> None:
    model = scenarios.iwrm_model()
    group = dist.group.WORLD
    with pytest.raises(ValueError, match="Cross-Gramian"):
        JDSGD(model.parameters(), lr=0.1, weighting=SDMGradWeighting(), process_group=group)


def test_a_grad_scaler_on_a_fully_shard_model_is_a_clear_error(single_rank_group: None) -> None:
    from torch.distributed.fsdp import fully_shard

    model = scenarios.iwrm_model()
    fully_shard(model)
    scaler = torch.amp.GradScaler("cpu")
    with pytest.raises(ValueError, match="grad_scaler is not supported on a fully_shard"):
        JDSGD(model.parameters(), lr=0.1, batch_dim=0, modules=model, grad_scaler=scaler)


def test_ddp_sync_stays_off_after_a_no_sync_block(single_rank_group: None) -> None:
    """The optimizer silenced the DDP model at its first forward only: a forward inside no_sync()
    (flag already off) was that first one, and leaving the block turned DDP's own reducer back on
    for good (extra all-reduces; with find_unused_parameters, a crash in DDP)."""
    model = torch.nn.parallel.DistributedDataParallel(scenarios.iwrm_model())
    optimizer = JDSGD(model.parameters(), lr=0.1, batch_dim=0)
    (x, y), *_ = scenarios.iwrm_batches(6)
    for step in range(2):
        with model.no_sync():
            optimizer.backward(scenarios.iwrm_losses(model, x[:3], y[:3]))
        optimizer.backward(scenarios.iwrm_losses(model, x[3:], y[3:]))
        assert model.require_backward_grad_sync is False, step
        optimizer.step()
        optimizer.zero_grad()


def test_one_rank_steps_equal_local_steps_and_count_bytes(single_rank_group: None) -> None:
    sizes = [5]
    for method in ["upgrad", "mean", "trimmed_mean", "geometric_mean"]:
        model = scenarios.iwrm_model()
        batches = scenarios.iwrm_batches(5)
        scenarios.train_iwrm(model, method, batches, slice(None), 0, process_group=dist.group.WORLD)
        reference = scenarios.iwrm_reference(method, sizes, 0)
        _close(scenarios.params_of(model), reference["params"])


@pytest.mark.parametrize(
    ("method", "mode"),
    [(m, f) for m, f, overflow in scenarios.SCALED_CASES if overflow == "none"],
)
def test_loss_scaled_ddp_steps_equal_one_process_with_the_same_scaler(
    two_ranks: Any, method: str, mode: str
) -> None:
    """A float16-style loop (GradScaler, its scale growing at every step) on a DDP model: the
    steps, and the scaler's state, equal those of one process on the concatenated batch."""
    _, ranks = two_ranks
    key = scenarios.scaled_key(method, mode, "none")
    reference = scenarios.scaled_reference(method, mode, "none")
    for rank in ranks:
        result = ok(rank[key])
        for got, expected in zip(result["history"], reference["history"], strict=True):
            _close(got["params"], expected["params"])
            assert got["scale"] == expected["scale"]
        _close([result["losses"]], [reference["losses"]])
        assert result["scaler"] == reference["scaler"]
    assert [h["scale"] for h in reference["history"]] == [2.0**11, 2.0**12, 2.0**13, 2.0**14]


@pytest.mark.parametrize("kind", ["mtl", "tasks", "famo", "uw"])
def test_loss_scaled_per_task_steps_equal_one_process_with_the_same_scaler(
    two_ranks: Any, kind: str
) -> None:
    _, ranks = two_ranks
    reference = scenarios.scaled_task_losses(kind, 2, slice(None))
    for rank in ranks:
        result = ok(rank[f"scaled-{kind}"])
        _close(result["params"], reference["params"])
        _close([result["losses"]], [reference["losses"]])
        assert result["scaler"] == reference["scaler"]
    assert reference["scaler"]["scale"] == 2.0**13


@pytest.mark.parametrize(
    ("method", "mode", "overflow"),
    [case for case in scenarios.SCALED_CASES if case[2] != "none"],
)
def test_an_overflow_on_one_rank_makes_every_rank_skip_the_step(
    two_ranks: Any, method: str, mode: str, overflow: str
) -> None:
    """Rank 1's losses (or their gradients) are infinite at one step: every rank skips it (the
    parameters stay, the same on every rank), every scaler halves its scale, and training goes on,
    as in one process whose global batch overflows alike."""
    _, ranks = two_ranks
    key = scenarios.scaled_key(method, mode, overflow)
    reference = scenarios.scaled_reference(method, mode, overflow)
    step = scenarios.OVERFLOW_STEP
    histories = [ok(rank[key])["history"] for rank in ranks]
    for history in histories:
        before, skipped, after = history[step - 1], history[step], history[step + 1]
        assert same(before["params"], skipped["params"])
        assert skipped["scale"] == before["scale"] / 2
        assert not same(skipped["params"], after["params"])
        for got, expected in zip(history, reference["history"], strict=True):
            _close(got["params"], expected["params"])
            assert got["scale"] == expected["scale"]
    for got, expected in zip(histories[1], histories[0], strict=True):
        assert same(got["params"], expected["params"])


def test_losses_that_overflow_on_one_rank_without_a_scaler_are_skipped_by_every_rank(
    launch: Any,
) -> None:
    """Backward-then-step treats non-finite losses as an overflow, scaler or not: every rank's
    backward skips the step and every rank's step() refuses it, then training goes on alike."""
    _, ranks = launch
    assert_every_rank_skipped_the_overflow(
        [ok(rank["unscaled-overflow"])["history"] for rank in ranks]
    )


def test_bytes_sent_per_step_are_the_factors_the_weights_and_one_gradient(two_ranks: Any) -> None:
    """Hand count for Linear(5, 6), LayerNorm(6), Linear(6, 1), 4 instances per rank, float64."""
    _, ranks = two_ranks
    # A bias's term shares its weight's output gradients, which travel once.
    factors = (
        4 * 6
        + 4 * 5  # first Linear: output gradients (weight and bias), inputs
        + 4 * 6
        + 4 * 6  # LayerNorm: weight rows, bias rows
        + 4 * 1
        + 4 * 6  # last Linear
    )
    parameters = 5 * 6 + 6 + 6 + 6 + 6 + 1
    for rank in ranks:
        sent = ok(rank["bytes"])
        assert sent["all_gather"] == factors * 8  # R - 1 = 1 copy of each factor
        # all-reduces send 2 (R - 1) / R = 1 copy; one more number carries the failure flag
        assert sent["gradients"] == (parameters + 1) * 8
        assert sent["weights"] == (8 + 8 + 1) * 8  # rank 0's weights and the global losses


def test_a_collected_optimizer_removes_its_watch_hooks_after_a_compile_under_way(
    single_rank_group: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The DDP/FSDP2 watch hooks of an optimizer collected while dynamo compiles (whose guards read
    torch's global hook table by key) stay in the table, inert, until the compile is over; at once
    otherwise."""
    table = nn.modules.module._global_forward_pre_hooks
    model = scenarios.iwrm_model()
    for during_a_compile in (True, False):
        before = set(table)
        optimizer = JDSGD(model.parameters(), lr=0.1, batch_dim=0)
        added = set(table) - before
        assert added  # the optimizer watches forward passes for DDP and fully_shard models
        monkeypatch.setattr(global_hooks, "compiling", lambda c=during_a_compile: c)
        del optimizer
        gc.collect()
        assert (added <= set(table)) if during_a_compile else not added & set(table)
        monkeypatch.setattr(global_hooks, "compiling", lambda: False)
        global_hooks.remove_deferred_hooks()
        assert not added & set(table)
