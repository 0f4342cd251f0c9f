"""Steps on ``fully_shard`` (FSDP2) models on 2 and 3 gloo ranks against single-process runs.

Each world size is launched once, running every scenario of ``_fsdp_scenarios.py`` in one
process group; the tests below check the results. Time-bounded by ``_launch``'s timeouts.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.distributed import _fsdp_scenarios as scenarios
from tests.distributed._launch import ok, rank_fixtures
from tests.distributed._scenarios import assert_every_rank_skipped_the_overflow

TOLERANCE = 1e-10


two_ranks, three_ranks, launch = rank_fixtures(scenarios.all_scenarios_rank, "fsdp")


def _equal_to_reference(ranks: list[Any], key: str, reference: dict[str, Any]) -> None:
    for rank in ranks:
        result = ok(rank[key])
        for actual, expected in zip(result["params"], reference["params"], strict=True):
            torch.testing.assert_close(actual, expected, atol=TOLERANCE, rtol=0.0)
        torch.testing.assert_close(result["losses"], reference["losses"], atol=TOLERANCE, rtol=0)
    for rank in ranks[1:]:  # bit-identical across ranks, not just close
        for a, b in zip(rank[key]["params"], ranks[0][key]["params"], strict=True):
            assert torch.equal(a, b), key


def test_instance_wise_upgrad_equals_one_process_on_the_global_batch(launch: Any) -> None:
    world, ranks = launch
    sizes = scenarios.IWRM_SIZES[world]
    _equal_to_reference(ranks, "iwrm", scenarios.iwrm_reference(sizes))


def test_modules_backward_then_step_accumulation_and_scalar_losses_equal_one_process(
    launch: Any,
) -> None:
    world, ranks = launch
    for how in scenarios.IWRM_VARIANTS[world]:
        equal = how in ("scalar", "accumulate")
        sizes = [4] * world if equal else scenarios.IWRM_SIZES[world]
        reference_how = "closure" if how == "accumulate" else how  # one batch, concatenated
        _equal_to_reference(ranks, f"iwrm-{how}", scenarios.iwrm_reference(sizes, reference_how))


@pytest.mark.parametrize("tasks", [False, True], ids=["geometric-mean-instances", "uw-tasks"])
def test_a_scalarizer_equals_one_process_on_the_global_batch(launch: Any, tasks: bool) -> None:
    """The scalarizer of the global losses (nonlinear: the geometric mean over every rank's
    instances; or UW's learnt weights of the per-task means, which every rank differentiates whole)."""
    world, ranks = launch
    key = "scalarized-tasks" if tasks else "scalarized-instances"
    _equal_to_reference(ranks, key, scenarios.scalarized_reference(world, tasks))


@pytest.mark.parametrize("how", scenarios.TRIMMED)
def test_a_coordinate_wise_aggregator_equals_one_process_on_the_global_batch(
    launch: Any, how: str
) -> None:
    """TrimmedMean of the global Jacobian, each rank aggregating its own columns."""
    world, ranks = launch
    _equal_to_reference(ranks, f"trimmed-{how}", scenarios.trimmed_reference(world, how))


def test_a_jacobian_aggregator_on_a_sharded_model_is_a_clear_error(two_ranks: Any) -> None:
    _, ranks = two_ranks
    for rank in ranks:
        message = rank["unsupported"]
        assert isinstance(message, str) and "not supported on a fully_shard model" in message
        assert "GradDrop" in message and "whole rows" in message
        message = rank["unsupported-tasks"]  # it used to be given the Gramian instead of J
        assert isinstance(message, str) and "ExcessMTLWeighting" in message, message


def test_per_task_losses_equal_one_process_on_the_global_batch(launch: Any) -> None:
    world, ranks = launch
    reference = scenarios.tasks_reference(world, scenarios.TASK_BATCH[world])
    _equal_to_reference(ranks, "tasks", reference)


def test_instance_and_task_losses_equal_one_process_on_the_global_batch(launch: Any) -> None:
    world, ranks = launch
    sizes = scenarios.IWRM_SIZES[world]
    _equal_to_reference(ranks, "instance-tasks", scenarios.instance_tasks_reference(sizes))


def test_a_transformer_encoder_layer_equals_one_process_on_the_global_batch(launch: Any) -> None:
    world, ranks = launch
    sizes = scenarios.ENCODER_SIZES[world]
    _equal_to_reference(ranks, "encoder", scenarios.encoder_reference(sizes))


def test_a_rank_with_one_instance_gives_the_others_its_terms_in_their_order(
    two_ranks: Any,
) -> None:
    """With one instance the attention layer runs other operations, and the engine lists its
    parameters' terms in another order; the ranks match terms by parameter, not by position (it
    was silently wrong by 1e-2 before)."""
    _, ranks = two_ranks
    _equal_to_reference(ranks, "encoder-one-instance", scenarios.encoder_reference([1, 3]))


def test_no_rank_holds_every_layer_unsharded_during_a_step(launch: Any) -> None:
    """Each layer is resharded after its forward, and the step's backward passes gather one layer
    at a time, though their number differs between ranks (a rank with one instance runs fewer)."""
    world, ranks = launch
    _check_deep(ranks, "deep", scenarios.DEEP_SIZES[world], checkpointed=False)


def test_activation_checkpointing_runs_layers_again_inside_the_passes(two_ranks: Any) -> None:
    """Each pass runs the checkpointed layers' forward again (a different number of times on each
    rank): those forwards find their layer gathered in a round, not by FSDP2."""
    _, ranks = two_ranks
    _check_deep(ranks, "deep-checkpointed", scenarios.DEEP_SIZES[2], checkpointed=True)
    forwards = [ok(rank["deep-checkpointed"])["seen"]["forward"] for rank in ranks]
    assert forwards[0] != forwards[1] and min(forwards) > 15, forwards  # 15: 3 steps of 5 layers


def _check_deep(ranks: list[Any], key: str, sizes: list[int], checkpointed: bool) -> None:
    _equal_to_reference(ranks, key, scenarios.deep_reference(sizes, checkpointed))
    passes = {ok(rank[key])["seen"]["backward"] for rank in ranks}
    assert len(passes) > 1, passes
    for rank in ranks:
        result = ok(rank[key])
        layers, peaks, seen = result["layers"], result["peaks"], result["seen"]
        assert len(layers) >= 3 and seen["forward"] > 0 and seen["backward"] > 0, result
        # Whole model: 4 * 72 + 9 parameters. One layer, and the next one FSDP2 gathers, at most.
        assert peaks["backward"] <= 2 * max(layers) < sum(layers), (peaks, layers)
        assert peaks["forward"] <= 2 * max(layers), (peaks, layers)


def test_the_engine_watches_the_first_forward_grads_are_sharded_evaluation_reshards(
    launch: Any,
) -> None:
    _, ranks = launch
    for rank in ranks:
        result = ok(rank["routes"])
        assert result["routes"] == [["closed_form"]] * scenarios.STEPS
        assert result["grad"] == "DTensor"
        assert result["sharded_after_evaluation"] == [True] * scenarios.STEPS


def test_a_failing_rank_makes_every_rank_raise_with_nothing_changed(launch: Any) -> None:
    world, ranks = launch
    for failure in scenarios.FAILURES[world]:
        key = f"failure-{failure}"
        outcomes = [ok(rank[key]) for rank in ranks]
        for rank, outcome in enumerate(outcomes):
            assert outcome["error"] is not None, (failure, rank)
            assert outcome["unchanged"], (failure, rank)
            assert outcome["later_errors"] == [], (failure, rank)  # the next steps run normally
            kind, message = outcome["error"]
            if failure == "shape":  # every rank sees the mismatch and says so
                assert kind == "ValueError" and "different numbers of dims" in message
            elif rank == 1:  # the failing rank raises its own error
                expected = "data loader broke" if failure == "raise" else "non-finite"
                assert expected in message.lower() or "nan" in message.lower(), message
            else:
                assert kind == "DistributedStepError", message
                assert "rank 1" in message, message
        for outcome in outcomes[1:]:
            for a, b in zip(outcome["params"], outcomes[0]["params"], strict=True):
                assert torch.equal(a, b), key


def test_losses_that_overflow_on_one_rank_make_every_rank_skip_the_step(launch: Any) -> None:
    """Backward-then-step, infinite losses on the last rank at the second step: every rank's
    backward gives a skipped step (no rank waits for the others' passes or exchanges), every
    rank's step() refuses it with nothing changed, and training goes on alike."""
    _, ranks = launch
    assert_every_rank_skipped_the_overflow([ok(rank["overflow"])["history"] for rank in ranks])


@pytest.mark.parametrize("how", ["dcp", "local"])
def test_a_checkpoint_resumes_bit_identically(two_ranks: Any, how: str) -> None:
    _, ranks = two_ranks
    for rank in ranks:
        result = ok(rank[f"resume-{how}"])
        for straight, resumed in zip(result["straight"], result["resumed"], strict=True):
            assert torch.equal(straight, resumed)


def test_bfloat16_parameters_train_close_to_float32_with_float32_sharded_grads(
    two_ranks: Any,
) -> None:
    _, ranks = two_ranks
    reference = scenarios.bfloat16_reference(2)
    for rank in ranks:
        result = ok(rank["bfloat16"])
        for actual, expected in zip(result["params"], reference["params"], strict=True):
            torch.testing.assert_close(actual, expected, atol=2e-3, rtol=0.0)
        assert {kind[:2] for kind in result["grad"]} == {("DTensor", torch.float32)}
    local_rows = [[kind[2][0] for kind in rank["bfloat16"]["grad"]] for rank in ranks]
    assert local_rows == [[8, 8, 1, 1], [8, 8, 0, 0]]  # dim 0 split in chunks of ceil(d0 / 2)


def test_bytes_per_step_follow_the_documented_formula(two_ranks: Any) -> None:
    _, ranks = two_ranks
    sent = ok(ranks[0]["bytes"])
    # 4 float64 parameters' worth of rows per layer, reduce-scattered: (R - 1) / R of each
    # padded tensor. Layers 5->6 (weight 6x5, bias 6), LayerNorm 6 (weight, bias), 6->1 (1x6, 1).
    padded = [6 * 5, 6, 6, 6, 2 * 6, 2]  # dim 0 padded to a multiple of R = 2
    assert sent["reduce_scatter"] == sum(p * 8 for p in padded) // 2
    assert "gradients" not in sent  # no all-reduce of full gradients
    # Each backward pass gathers the layers it runs through, whole: the last Linear (6 + 1) and
    # the root's LayerNorm (12), 19 float64 parameters, (R - 1) / R of them sent per gather.
    assert sent["layer_gathers"] > 0 and sent["layer_gathers"] % (19 * 8 // 2) == 0, sent
    assert sent["rounds"] > 0
