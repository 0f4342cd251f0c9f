"""Per layer, the cheaper of two exact Gramian forms, and the report that says which was taken.

A factored layer term (``Linear``, convolutions) has its Gramian either pairwise from the factors
or from materialised per-instance gradients (the "mixed ghost" choice). Ground truth: ``J Jᵀ`` with
``J`` from ``torch.func.jacrev``, float64.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev

from jdoptim.autogram import Engine, RouteReport
from jdoptim.autogram._terms import OuterTerm


class SequenceLinear(nn.Module):
    """``Linear`` applied at every position of a sequence, one loss per instance."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(d_in, d_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x).tanh().pow(2).mean(dim=(1, 2))


class ConvLosses(nn.Module):
    def __init__(self, c_in: int, c_out: int, kernel: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x).sin().mean(dim=(1, 2, 3))


# (model, input, the form the cost rule must pick for the weight)
CASES = {
    # 3 instances x 2 positions, 64 x 64 weight: pairwise products are far cheaper.
    "linear_short_sequence": (lambda: SequenceLinear(64, 64), (3, 2, 64), "pairwise"),
    # 4 instances x 40 positions, 6 x 5 weight: 160² pairwise products cost more than 4 rows of 30.
    "linear_long_sequence": (lambda: SequenceLinear(6, 5), (4, 40, 6), "materialized"),
    # 3 instances x 2x2 pixels, 1x1 kernel, 48 -> 48 channels: pairwise.
    "conv_few_pixels": (lambda: ConvLosses(48, 48, 1), (3, 48, 2, 2), "pairwise"),
    # 3 instances x 8x8 pixels, 3x3 kernel, 2 -> 4 channels: materialised.
    "conv_many_pixels": (lambda: ConvLosses(2, 4, 3), (3, 2, 8, 8), "materialized"),
}


def _jacobian(model: nn.Module, inputs: Tensor) -> Tensor:
    params = {n: p.detach() for n, p in model.named_parameters()}
    jacobian = jacrev(lambda p: functional_call(model, p, (inputs,)))(params)
    return torch.cat([j.reshape(inputs.shape[0], -1) for j in jacobian.values()], dim=1)


def _build(case: str) -> tuple[nn.Module, Tensor, str]:
    make, shape, form = CASES[case]
    torch.manual_seed(0)
    return make().double(), torch.randn(shape, dtype=torch.float64), form


def _weight_report(engine: Engine) -> RouteReport:
    (report,) = [r for r in engine.route_report() if r.name.endswith("weight")]
    return report


@pytest.mark.parametrize("case", list(CASES))
def test_the_cost_rule_picks_the_expected_form_and_both_are_exact(case: str) -> None:
    model, x, expected_form = _build(case)
    jacobian = _jacobian(model, x)
    engine = Engine(model, batch_dim=0)
    gramian = engine.compute_gramian(model(x))
    report = _weight_report(engine)
    assert report.route == "closed_form" and report.form == expected_form
    assert report.pairwise_cost is not None and report.materialized_cost is not None
    cheaper = "pairwise" if report.pairwise_cost <= report.materialized_cost else "materialized"
    assert cheaper == expected_form
    torch.testing.assert_close(gramian, jacobian @ jacobian.T, atol=1e-12, rtol=0.0)

    # The fused .grad (from the cached per-instance gradients when materialised) is exact too.
    weights = torch.randn(x.shape[0], dtype=torch.float64)
    engine.backward(weights)
    fused = torch.cat([p.grad.reshape(-1) for p in model.parameters()])  # type: ignore[union-attr]
    torch.testing.assert_close(fused, weights @ jacobian, atol=1e-12, rtol=0.0)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("form", ["pairwise", "materialized"])
def test_either_form_gives_the_gramian(
    case: str, form: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Forcing the other form changes the cost, never the result."""
    monkeypatch.setattr(OuterTerm, "form", property(lambda self: form))
    model, x, _ = _build(case)
    jacobian = _jacobian(model, x)
    engine = Engine(model, batch_dim=0)
    gramian = engine.compute_gramian(model(x))
    assert _weight_report(engine).form == form
    torch.testing.assert_close(gramian, jacobian @ jacobian.T, atol=1e-12, rtol=0.0)
    weights = torch.randn(x.shape[0], dtype=torch.float64)
    engine.backward(weights)
    fused = torch.cat([p.grad.reshape(-1) for p in model.parameters()])  # type: ignore[union-attr]
    torch.testing.assert_close(fused, weights @ jacobian, atol=1e-12, rtol=0.0)


def _documented_costs(batch: int, positions: int, k: int, d: int) -> tuple[int, int]:
    """The costs of docs/autogram.md, one task: Gramian plus weighted gradient, multiply-adds."""
    pairwise = (batch * positions) ** 2 * (d + k) + batch * positions * k * (1 + d)
    materialized = batch * positions * k * d + batch**2 * k * d + batch * k * d
    return pairwise, materialized


def test_the_form_flips_where_the_costs_cross() -> None:
    batch, k, d = 8, 16, 12
    flips = []
    previous = None
    for positions in range(1, 40):
        term = OuterTerm(
            torch.zeros(1, batch, positions, k), torch.zeros(batch, positions, d), (k, d)
        )
        pairwise, materialized = _documented_costs(batch, positions, k, d)
        assert term.costs() == (pairwise, materialized)
        expected = "pairwise" if pairwise <= materialized else "materialized"
        assert term.form == expected
        if previous is not None and term.form != previous:
            flips.append(positions)
        previous = term.form
    # Pairwise for short sequences, materialised from the first length where it is dearer.
    crossing = next(
        s
        for s in range(1, 40)
        if _documented_costs(batch, s, k, d)[0] > _documented_costs(batch, s, k, d)[1]
    )
    assert flips == [crossing] and 1 < crossing < 39


def test_a_kernel_too_large_for_memory_is_never_pairwise(monkeypatch: pytest.MonkeyPatch) -> None:
    term = OuterTerm(torch.zeros(1, 4, 2, 64), torch.zeros(4, 2, 64), (64, 64))
    assert term.form == "pairwise"
    monkeypatch.setattr("jdoptim.autogram._terms._MAX_PAIRWISE_ELEMENTS", 8**2 - 1)
    assert term.form == "materialized"


def test_cached_rows_do_not_outlive_their_factors() -> None:
    """A term rebuilt around new factors (concatenation, exchange) recomputes its rows."""
    torch.manual_seed(0)
    term = OuterTerm(
        torch.randn(1, 3, 40, 5, dtype=torch.float64),
        torch.randn(3, 40, 6, dtype=torch.float64),
        (5, 6),
    )
    assert term.form == "materialized"
    term.gramian()  # caches the per-instance gradients
    weights = torch.randn(3, 1, dtype=torch.float64)
    doubled = term.with_factors([term.a * 2, term.b])
    torch.testing.assert_close(doubled.weighted_grad(weights), 2 * term.weighted_grad(weights))


def test_report_names_parameters_and_routes() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.GRU(3, 2, batch_first=True))
    engine = Engine(model, batch_dim=0)
    assert engine.route_report() == []
    output, _ = model(torch.randn(5, 6, 4))
    engine.compute_gramian(output.sum(dim=(1, 2)))
    reports = {r.name: r for r in engine.route_report()}
    assert set(reports) == {name for name, _ in model.named_parameters()}
    assert reports["0.weight"].module == "Linear" and reports["0.weight"].positions == 6
    assert reports["0.bias"].form == "rows" and reports["0.bias"].pairwise_cost is None
    # The GRU's weights: projections at each of the 6 steps (weight_hh) or on all of them at once.
    assert reports["1.weight_ih_l0"].route == "closed_form"
    assert reports["1.weight_hh_l0"].positions == 6 and reports["1.weight_ih_l0"].positions == 6

    by_parameters = Engine(batch_dim=0, parameters=model.parameters())
    with by_parameters.capture():
        output, _ = model(torch.randn(5, 6, 4))
    by_parameters.compute_gramian(output.sum(dim=(1, 2)))
    names = {r.name for r in by_parameters.route_report()}
    assert names == {f"parameters[{i}]" for i in range(len(list(model.parameters())))}


class TwoTaskSequence(nn.Module):
    """Two losses per instance from a ``Linear`` over a long sequence (materialised)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(6, 5)

    def forward(self, x: Tensor) -> Tensor:
        y = self.linear(x).tanh()
        return torch.stack([y.pow(2).mean(dim=(1, 2)), y.sin().mean(dim=(1, 2))], dim=1)


def test_kept_rows_follow_the_instance_major_order_of_several_tasks() -> None:
    torch.manual_seed(0)
    model = TwoTaskSequence().double()
    x = torch.randn(4, 40, 6, dtype=torch.float64)
    params = {n: p.detach() for n, p in model.named_parameters()}
    per_param = jacrev(lambda p: functional_call(model, p, (x,)))(params)
    jacobian = torch.cat([j.reshape(8, -1) for j in per_param.values()], dim=1)  # rows (i, t)
    engine = Engine(model, batch_dim=0)
    gramian = engine.compute_gramian(model(x))
    assert _weight_report(engine).form == "materialized"
    expected = (jacobian @ jacobian.T).reshape(4, 2, 4, 2).permute(0, 1, 3, 2)
    torch.testing.assert_close(gramian, expected, atol=1e-12, rtol=0.0)
    weights = torch.randn(4, 2, dtype=torch.float64)
    engine.backward(weights)
    fused = torch.cat([p.grad.reshape(-1) for p in model.parameters()])  # type: ignore[union-attr]
    torch.testing.assert_close(fused, weights.reshape(-1) @ jacobian, atol=1e-12, rtol=0.0)
