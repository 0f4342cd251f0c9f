"""jdoptim on an accelerator against the same computation on the CPU.

Skipped without CUDA (CI has none): run them with ``pytest -m cuda`` where a GPU is, or with
``JDOPTIM_TEST_DEVICE=cpu pytest -m cuda tests/test_accelerator.py`` to check the tests themselves
on the CPU (both sides then run there). Models are those of ``benchmarks/bench_autogram.py``, in
float64 so that only the device differs (CUDA convolutions default to TF32 in float32).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import Tensor, nn

from benchmarks.bench_autogram import Case
from benchmarks.count_ops import count, make_gramian
from jdoptim import JDSGD, JDAdam
from jdoptim.aggregation import UPGradWeighting
from jdoptim.autogram import Engine
from jdoptim.linalg import project_to_dual_cone

DEVICE = torch.device(os.environ.get("JDOPTIM_TEST_DEVICE", "cuda"))
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"
    ),
]

# Small batches of every benchmark model (the GRU runs cuDNN's fused kernel on CUDA).
MODELS = [("mlp", 6), ("cnn", 5), ("transformer", 4), ("gru", 5), ("resnet18-gn", 3)]
criterion = nn.CrossEntropyLoss(reduction="none")


def model_and_batch(name: str, batch: int) -> tuple[nn.Module, Tensor, Tensor]:
    model, inputs = Case(name, batch).build()  # on the CPU
    targets = torch.randint(0, 10, (batch,), generator=torch.Generator().manual_seed(3))
    return model.double(), inputs.double(), targets


def on_both(name: str, batch: int) -> list[tuple[nn.Module, Tensor, Tensor]]:
    """The model and a batch (float64), once on the CPU and once on the device."""
    model, inputs, targets = model_and_batch(name, batch)
    return [
        (copy.deepcopy(model).to(device), inputs.to(device), targets.to(device))
        for device in (torch.device("cpu"), DEVICE)
    ]


@pytest.mark.parametrize(("name", "batch"), MODELS)
def test_gramian_matches_the_cpu(name: str, batch: int) -> None:
    results = []
    for model, x, y in on_both(name, batch):
        gramian = Engine(model, batch_dim=0).compute_gramian(criterion(model(x), y))
        assert gramian.device == x.device
        results.append(gramian.cpu())
    torch.testing.assert_close(results[1], results[0], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(("name", "batch"), MODELS)
def test_jdsgd_step_matches_the_cpu(name: str, batch: int) -> None:
    updated = []
    for model, x, y in on_both(name, batch):
        optimizer = JDSGD(model.parameters(), lr=0.1, weighting=UPGradWeighting(), batch_dim=0)
        optimizer.step(lambda model=model, x=x, y=y: criterion(model(x), y))
        updated.append([p.detach().cpu() for p in model.parameters()])
    for on_device, on_cpu in zip(updated[1], updated[0], strict=True):
        torch.testing.assert_close(on_device, on_cpu, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("solver", ["auto", "batched", "active_set"])
@pytest.mark.parametrize("size", [16, 64, 200])
def test_dual_cone_solvers_match_quadprog(solver: str, size: int) -> None:
    gramian = make_gramian("random", size, dtype=torch.float64)
    bounds = torch.eye(size, dtype=torch.float64)
    reference = project_to_dual_cone(gramian, bounds, solver="quadprog")
    solution = project_to_dual_cone(
        gramian.to(DEVICE),
        bounds.to(DEVICE),
        solver=solver,  # type: ignore[arg-type]
    )
    assert solution.device.type == DEVICE.type
    scale = float(reference.abs().max())
    torch.testing.assert_close(solution.cpu(), reference, rtol=0, atol=1e-8 * scale)


def test_the_fixed_budget_solver_makes_three_host_reads() -> None:
    """The solver "auto" picks on CUDA for 32 < m ≤ 512: its operation count does not depend on
    the data (tests/aggregation/test_upgrad.py counts it on CPU tensors; here on the device)."""
    weighting = UPGradWeighting(solver="active_set")
    for kind in ("random", "low-rank", "near-duplicate"):
        gramian = make_gramian(kind, 128).to(DEVICE, torch.float32)
        counter = count(weighting, gramian)
        weighting.reset()
        assert counter.syncs <= 3
        assert counter.operations <= 300


def test_loss_scaling_forms_agree() -> None:
    """float16 autocast with a ``GradScaler``: ``step(closure)`` with ``grad_scaler=`` and torch's
    own scaler calls around backward-then-step give the same parameters."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 1)).to(DEVICE)
    x = torch.randn(64, 10, device=DEVICE)
    y = torch.randn(64, 1, device=DEVICE)
    closure_model, manual_model = copy.deepcopy(model), copy.deepcopy(model)

    scaler = torch.amp.GradScaler(DEVICE.type)
    optimizer = JDSGD(
        closure_model.parameters(),
        lr=0.01,
        weighting=UPGradWeighting(),
        batch_dim=0,
        grad_scaler=scaler,
    )

    def closure() -> Tensor:
        with torch.autocast(DEVICE.type, dtype=torch.float16):
            return ((closure_model(x) - y) ** 2).squeeze(1)

    for _ in range(3):
        optimizer.step(closure)

    manual_scaler = torch.amp.GradScaler(DEVICE.type)
    manual = JDSGD(manual_model.parameters(), lr=0.01, weighting=UPGradWeighting(), batch_dim=0)
    for _ in range(3):
        manual.zero_grad()
        with torch.autocast(DEVICE.type, dtype=torch.float16):
            losses = ((manual_model(x) - y) ** 2).squeeze(1)
        manual.backward(manual_scaler.scale(losses))
        manual_scaler.step(manual)
        manual_scaler.update()

    assert scaler.get_scale() == manual_scaler.get_scale()
    for a, b in zip(closure_model.parameters(), manual_model.parameters(), strict=True):
        assert bool(torch.isfinite(a).all())
        torch.testing.assert_close(a, b)


def test_optimizer_state_moves_between_devices() -> None:
    """A ``JDAdam`` checkpoint taken on the device resumes on the CPU, step for step."""
    (cpu_model, inputs, targets), (device_model, x, y) = on_both("mlp", 6)
    optimizer = JDAdam(device_model.parameters(), lr=1e-3, weighting=UPGradWeighting(), batch_dim=0)
    optimizer.step(lambda: criterion(device_model(x), y))
    state = copy.deepcopy(optimizer.state_dict())  # as torch.save would: no shared tensors

    cpu_model.load_state_dict(device_model.state_dict())
    resumed = JDAdam(cpu_model.parameters(), lr=1e-3, weighting=UPGradWeighting(), batch_dim=0)
    resumed.load_state_dict(state)
    for value in resumed.state.values():
        for tensor in value.values():
            if isinstance(tensor, Tensor) and tensor.ndim > 0:
                assert tensor.device.type == "cpu"
    optimizer.step(lambda: criterion(device_model(x), y))
    resumed.step(lambda: criterion(cpu_model(inputs), targets))
    for a, b in zip(device_model.parameters(), cpu_model.parameters(), strict=True):
        torch.testing.assert_close(a.detach().cpu(), b.detach(), rtol=1e-8, atol=1e-10)
