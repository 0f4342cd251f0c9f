"""One training step of per-instance losses: jdoptim's autogram engine against the alternatives.

Side by side in one process, with interleaved repeats (every repeat runs each method once, in turn,
so a load change on the shared CPU hits all of them alike); medians and ratios to a plain SGD step
on the mean loss. Methods:

* ``sgd``: ``loss.mean().backward()`` and ``SGD.step()``, the baseline.
* ``jd-mean`` / ``jd-upgrad``: ``Engine.compute_gramian``, ``MeanWeighting`` / ``UPGradWeighting``,
  the fused ``Engine.backward(weights)``, ``SGD.step()``.
* ``jdsgd-upgrad``: the same through the optimizer, ``JDSGD(..., weighting=UPGradWeighting(),
  batch_dim=0).step(closure)`` (its checks and bookkeeping included).
* ``gramian``: the forward pass and jdoptim's ``compute_gramian``, nothing else (compare with
  ``sgd``, which is a forward pass, a backward pass and an update).
* ``peer-autogram``: TorchJD 0.18's ``Engine(model, batch_dim=0)``, its ``UPGradWeighting``,
  ``losses.backward(weights)`` (TorchJD's engine loop).
* ``peer-autojac``: TorchJD 0.18's ``autojac.backward`` + ``jac_to_grad`` with ``UPGrad``.
* ``func``: hand-written ``torch.func`` per-sample gradients (``vmap(grad(...))``), averaged.
* ``func-upgrad``: the same per-sample gradients as the rows of ``J``, ``UPGradWeighting`` on
  ``J Jᵀ``, ``.grad = wᵀ J``: the hand-written baseline of a Jacobian-descent step, which the
  engine must beat.
* ``before-jd-upgrad``, ``before-jdsgd-upgrad`` (with ``--before DIR``): ``jd-upgrad`` and
  ``jdsgd-upgrad`` run by another jdoptim, imported as ``jdoptim_before`` from ``DIR`` (a copy with
  the package renamed, see docs/performance.md), side by side with this one.

Every step sees a new batch (four batches in turn, drawn up front), as in training; the hand-written
UPGrad steps (``jd-upgrad``, ``func-upgrad``) start the weighting's solver cold at every step
(``reset()``), as jdoptim's optimizers do for per-instance losses: a warm start from another batch's
solutions only slows it down (docs/performance.md).

A method whose warm-up step takes over ``SLOW_SECONDS`` is timed once instead of ``repeats`` times
(its median is then that one step): enough to show a 100x gap, and the run stays short.

Peak memory: each (model, method) runs again in a fresh subprocess that resets the resident-set
high-water mark (``/proc/self/clear_refs``) after two warm-up steps and reports its growth over
three more steps: the transient memory of a step, on top of the model and optimizer. glibc is told
to map every block of 16 KiB or more on its own (``MALLOC_MMAP_THRESHOLD_``), so freed tensors leave
the resident set at once and the high-water mark follows live memory.

On CUDA (``--device cuda``) every step ends with ``torch.cuda.synchronize()``, the default cases
are the GPU targets' (batch 128, ResNet-18 with GroupNorm added), and the peak memory is measured in
process: the growth of ``torch.cuda.max_memory_allocated`` over three steps, above what was
allocated before them.

    python benchmarks/bench_autogram.py            # every model and batch size
    python benchmarks/bench_autogram.py --small    # MLP at batch 32 and the GRU: a quick run
    python benchmarks/bench_autogram.py --device cuda
    python benchmarks/bench_autogram.py --methods sgd jd-upgrad func-upgrad --before /tmp/bp
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from jdoptim import Stateful
from jdoptim.aggregation import MeanWeighting, UPGradWeighting
from jdoptim.autogram import Engine

Step = Callable[[], None]


class Batches:
    """Four batches of the shape of ``x`` (the first is ``x``), taken in turn: one per step."""

    def __init__(self, x: Tensor) -> None:
        generator = torch.Generator().manual_seed(1)
        self._batches = [
            (
                x if i == 0 else torch.randn(x.shape, generator=generator).to(x.device),
                torch.randint(0, 10, (x.shape[0],), generator=generator).to(x.device),
            )
            for i in range(4)
        ]
        self._index = 0

    @property
    def current(self) -> tuple[Tensor, Tensor]:
        return self._batches[self._index]

    def advance(self) -> None:
        self._index = (self._index + 1) % len(self._batches)


class GRUClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(32, 128, batch_first=True)
        self.head = nn.Linear(128, 10)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.gru(x)
        return self.head(out[:, -1])


class TransformerClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(128, 4, 256, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(128, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x).mean(dim=1))


class _BasicBlock(nn.Module):
    """Two 3x3 convolutions with GroupNorm and a residual connection (a 1x1 projection when the
    shape changes)."""

    def __init__(self, inputs: int, outputs: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.norm1 = nn.GroupNorm(32, outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.norm2 = nn.GroupNorm(32, outputs)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(
                nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.GroupNorm(32, outputs)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(self.norm2(self.conv2(out)) + self.shortcut(x))


def resnet18_gn() -> nn.Module:
    """ResNet-18 for 3x32x32 images (a 3x3 stem, no max pool), GroupNorm instead of BatchNorm
    (batch statistics would mix the instances): 11.2 M parameters."""
    layers: list[nn.Module] = [
        nn.Conv2d(3, 64, 3, 1, 1, bias=False),
        nn.GroupNorm(32, 64),
        nn.ReLU(),
    ]
    inputs = 64
    for outputs, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
        layers += [_BasicBlock(inputs, outputs, stride), _BasicBlock(outputs, outputs, 1)]
        inputs = outputs
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 10)]
    return nn.Sequential(*layers)


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 8 * 8, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


@dataclass(frozen=True)
class Case:
    name: str
    batch: int

    def build(self) -> tuple[nn.Module, Tensor]:
        """The model and a first batch, on :data:`DEVICE`."""
        model, x = self._build()
        return model.to(DEVICE), x.to(DEVICE)

    def _build(self) -> tuple[nn.Module, Tensor]:
        torch.manual_seed(0)
        if self.name == "mlp":
            model: nn.Module = nn.Sequential(
                nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
            )
            return model, torch.randn(self.batch, 784)
        if self.name == "cnn":
            return small_cnn(), torch.randn(self.batch, 3, 32, 32)
        if self.name == "transformer":
            return TransformerClassifier(), torch.randn(self.batch, 32, 128)
        if self.name == "resnet18-gn":
            return resnet18_gn(), torch.randn(self.batch, 3, 32, 32)
        if self.name == "gru":
            return GRUClassifier(), torch.randn(self.batch, 32, 32)
        raise ValueError(f"unknown model {self.name!r}: mlp, cnn, transformer, resnet18-gn or gru.")


CASES = [
    Case("mlp", 32),
    Case("mlp", 128),
    Case("mlp", 512),
    Case("cnn", 32),
    Case("cnn", 128),
    Case("transformer", 32),
    Case("gru", 32),
]
SMALL_CASES = [Case("mlp", 32), Case("gru", 32)]
# On CUDA: the cases of the GPU targets (docs/performance.md).
CUDA_CASES = [
    Case("mlp", 32),
    Case("mlp", 128),
    Case("mlp", 512),
    Case("cnn", 128),
    Case("transformer", 128),
    Case("resnet18-gn", 128),
    Case("gru", 32),
]
# Where models and batches live (``--device``); steps are timed to the device's completion.
DEVICE = torch.device("cpu")
# A method whose warm-up step takes longer than this is timed once, not ``repeats`` times.
SLOW_SECONDS = 2.0
METHODS = [
    "sgd",
    "gramian",
    "jd-mean",
    "jd-upgrad",
    "jdsgd-upgrad",
    "peer-autogram",
    "peer-autojac",
    "func",
    "func-upgrad",
]


def _engine_step(
    optimizer: torch.optim.Optimizer,
    losses: Callable[[], Tensor],
    engine: Any,
    weighting: Any,
    cold: bool = False,
) -> Step:
    """A step by hand on ``engine``: its Gramian, ``weighting``'s weights, the fused ``.grad``."""

    def step() -> None:
        optimizer.zero_grad()
        if cold and isinstance(weighting, Stateful):
            weighting.reset()
        weights = weighting(engine.compute_gramian(losses()))
        engine.backward(weights)
        optimizer.step()

    return step


def make_step(method: str, model: nn.Module, x: Tensor) -> Step:
    """One training step of ``method`` on ``model`` (raises if the method rejects the model)."""
    batches = Batches(x)
    step = _make_step(method, model, batches)

    def on_the_next_batch() -> None:
        batches.advance()
        step()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    return on_the_next_batch


def _make_step(method: str, model: nn.Module, batches: Batches) -> Step:
    criterion = nn.CrossEntropyLoss(reduction="none")
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)

    def losses() -> Tensor:
        inputs, targets = batches.current
        return criterion(model(inputs), targets)

    if method == "sgd":

        def sgd() -> None:
            optimizer.zero_grad()
            losses().mean().backward()
            optimizer.step()

        return sgd
    if method in ("gramian", "jd-mean", "jd-upgrad"):
        engine = Engine(model, batch_dim=0)
        weighting = MeanWeighting() if method == "jd-mean" else UPGradWeighting()
        if method == "gramian":

            def gramian() -> None:
                engine.compute_gramian(losses())

            return gramian

        return _engine_step(optimizer, losses, engine, weighting, cold=True)
    if method == "jdsgd-upgrad":
        from jdoptim import JDSGD

        jdsgd = JDSGD(model.parameters(), lr=1e-4, weighting=UPGradWeighting(), batch_dim=0)

        def closure() -> Tensor:
            jdsgd.zero_grad()
            return losses()

        def jdsgd_step() -> None:
            jdsgd.step(closure)

        return jdsgd_step
    if method == "peer-autogram":
        from torchjd.aggregation import UPGradWeighting as PeerUPGradWeighting
        from torchjd.autogram import Engine as PeerEngine

        peer = PeerEngine(*model.modules(), batch_dim=0)
        peer_weighting = PeerUPGradWeighting()

        def peer_autogram() -> None:
            optimizer.zero_grad()
            values = losses()
            weights = peer_weighting(peer.compute_gramian(values))
            values.backward(weights)
            optimizer.step()

        return peer_autogram
    if method == "peer-autojac":
        from torchjd.aggregation import UPGrad as PeerUPGrad
        from torchjd.autojac import backward as peer_backward
        from torchjd.autojac import jac_to_grad

        aggregator = PeerUPGrad()

        def peer_autojac() -> None:
            optimizer.zero_grad()
            peer_backward(losses())
            jac_to_grad(model.parameters(), aggregator)
            optimizer.step()

        return peer_autojac
    if method == "before-jd-upgrad":
        import importlib

        before_autogram = importlib.import_module("jdoptim_before.autogram")
        before_aggregation = importlib.import_module("jdoptim_before.aggregation")
        before_engine = before_autogram.Engine(model, batch_dim=0)
        before_weighting = before_aggregation.UPGradWeighting()

        return _engine_step(optimizer, losses, before_engine, before_weighting)
    if method == "before-jdsgd-upgrad":
        import importlib

        before = importlib.import_module("jdoptim_before")
        before_upgrad = importlib.import_module("jdoptim_before.aggregation").UPGradWeighting()
        before_jdsgd = before.JDSGD(
            model.parameters(), lr=1e-4, weighting=before_upgrad, batch_dim=0
        )

        def before_closure() -> Tensor:
            before_jdsgd.zero_grad()
            return losses()

        def before_jdsgd_step() -> None:
            before_jdsgd.step(before_closure)

        return before_jdsgd_step
    return _func_step(model, batches, criterion, optimizer, upgrad=method == "func-upgrad")


def _func_step(
    model: nn.Module,
    batches: Batches,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    upgrad: bool,
) -> Step:
    from torch.func import functional_call, grad, vmap

    names = [name for name, _ in model.named_parameters()]

    def one_loss(params: dict[str, Tensor], sample: Tensor, target: Tensor) -> Tensor:
        out = functional_call(model, params, (sample.unsqueeze(0),))
        loss: Tensor = criterion(out, target.unsqueeze(0)).squeeze(0)
        return loss

    per_sample = vmap(grad(one_loss), in_dims=(None, 0, 0))
    weighting = UPGradWeighting()

    def func_upgrad() -> None:
        x, targets = batches.current
        params = {name: p.detach() for name, p in model.named_parameters()}
        grads = per_sample(params, x, targets)
        rows = [grads[name].reshape(x.shape[0], -1) for name in names]
        gramian = sum(r @ r.T for r in rows)
        weighting.reset()
        weights = weighting((gramian + gramian.T) / 2)
        for name, p in zip(names, model.parameters(), strict=True):
            p.grad = torch.tensordot(weights, grads[name], dims=1)
        optimizer.step()

    if upgrad:
        return func_upgrad

    def func() -> None:
        x, targets = batches.current
        params = {name: p.detach() for name, p in model.named_parameters()}
        grads = per_sample(params, x, targets)
        for name, p in zip(names, model.parameters(), strict=True):
            p.grad = grads[name].mean(dim=0)
        optimizer.step()

    return func


def time_case(case: Case, repeats: int) -> dict[str, float | str]:
    steps: dict[str, Step] = {}
    result: dict[str, float | str] = {}
    slow: set[str] = set()
    for method in METHODS:
        model, x = case.build()  # one copy per method: the engines' hooks must not see the others
        try:
            step = make_step(method, model, x)
            start = time.perf_counter()
            step()  # warm-up; also tells whether the method accepts the model
            if time.perf_counter() - start > SLOW_SECONDS:
                slow.add(method)
            steps[method] = step
        except Exception as error:  # a rejected model is a result, not a crash
            result[method] = f"fails: {type(error).__name__}"
    times: dict[str, list[float]] = {method: [] for method in steps}
    for repeat in range(repeats):
        for method, step in steps.items():
            if method in slow and repeat > 0:
                continue  # one timed step is enough to show a method that is 100x slower
            start = time.perf_counter()
            step()
            times[method].append(time.perf_counter() - start)
    for method, samples in times.items():
        result[method] = statistics.median(samples)
    return result


def step_memory(case: Case, method: str) -> float | str:
    """Peak memory growth (MiB) of three steps: in process on CUDA, in a fresh subprocess on the
    CPU."""
    return cuda_peak_memory(case, method) if DEVICE.type == "cuda" else peak_memory(case, method)


def cuda_peak_memory(case: Case, method: str) -> float | str:
    """Peak CUDA memory growth (MiB) of three steps over what was allocated before them."""
    try:
        model, x = case.build()
        step = make_step(method, model, x)
        step()
        step()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        for _ in range(3):
            step()
        return (torch.cuda.max_memory_allocated() - baseline) / 2**20
    except Exception:  # a rejected model is a result, not a crash
        return "fails"
    finally:
        torch.cuda.empty_cache()


def peak_memory(case: Case, method: str) -> float | str:
    """Peak memory growth (MiB) of three steps, measured in a fresh subprocess."""
    command = [sys.executable, __file__, "--memory-of", case.name, str(case.batch), method]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "16384"}
    done = subprocess.run(
        command, capture_output=True, text=True, check=False, timeout=900, env=env
    )
    if done.returncode != 0:
        return "fails"
    value: float = json.loads(done.stdout.strip().splitlines()[-1])
    return value


def _rss_mib(field: str) -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _measure_memory(name: str, batch: int, method: str) -> None:
    model, x = Case(name, batch).build()
    step = make_step(method, model, x)
    step()
    step()
    baseline = _rss_mib("VmRSS")
    with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
        clear.write("5")  # resets VmHWM to the current resident set
    for _ in range(3):
        step()
    print(json.dumps(_rss_mib("VmHWM") - baseline))


def format_row(case: Case, result: dict[str, float | str], memory: dict[str, float | str]) -> str:
    base = result["sgd"]
    assert isinstance(base, float)
    cells = [f"{case.name} B={case.batch}", f"{base * 1e3:.1f} ms"]
    for method in METHODS[1:]:
        value = result[method]
        cell = f"{value / base:.2f}x" if isinstance(value, float) else str(value)
        mem = memory.get(method)
        if isinstance(mem, float):
            cell += f" / {mem:.0f} MiB"
        cells.append(cell)
    sgd_memory = memory.get("sgd")
    if isinstance(sgd_memory, float):
        cells[1] += f" / {sgd_memory:.0f} MiB"
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="MLP B=32 and GRU only, few repeats")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--no-timing", action="store_true", help="memory only (no timed steps)")
    parser.add_argument(
        "--cases", default=None, help="comma-separated model:batch, e.g. mlp:128,gru:32"
    )
    parser.add_argument("--memory-of", nargs=3, metavar=("MODEL", "BATCH", "METHOD"))
    parser.add_argument("--methods", nargs="*", default=None, help="a subset, sgd first")
    parser.add_argument(
        "--before", default=None, help="a folder holding jdoptim_before: adds the before-* methods"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    if args.before:
        sys.path.insert(0, args.before)
        os.environ["PYTHONPATH"] = os.pathsep.join(
            filter(None, [args.before, os.environ.get("PYTHONPATH")])
        )
    before = ["before-jd-upgrad", "before-jdsgd-upgrad"] if args.before else []
    if args.methods:
        METHODS[:] = list(args.methods)
    METHODS.extend(method for method in before if method not in METHODS)  # once each
    if args.memory_of:
        name, batch, method = args.memory_of
        _measure_memory(name, int(batch), method)
        return
    cases = SMALL_CASES if args.small else CUDA_CASES if DEVICE.type == "cuda" else CASES
    if args.cases:
        cases = [
            Case(name, int(batch)) for name, batch in (c.split(":") for c in args.cases.split(","))
        ]
    repeats = args.repeats or (3 if args.small else 9)
    where = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "CPU"
    print(
        f"torch {torch.__version__}, {where}, {torch.get_num_threads()} threads, repeats {repeats}"
    )
    print("cells: step time / SGD step time [ / peak memory growth over 3 steps ]")
    print("| model | sgd | " + " | ".join(METHODS[1:]) + " |")
    print("|---" * (len(METHODS) + 1) + "|")
    for case in cases:
        memory: dict[str, float | str] = {}
        if args.no_timing:
            for method in METHODS:
                memory[method] = step_memory(case, method)
            cells = [
                f"{method}: {value if isinstance(value, str) else f'{value:.0f} MiB'}"
                for method, value in memory.items()
            ]
            print(f"| {case.name} B={case.batch} | " + " | ".join(cells) + " |", flush=True)
            continue
        result = time_case(case, repeats)
        measurable = DEVICE.type == "cuda" or os.path.exists("/proc/self/clear_refs")
        if not args.no_memory and measurable:
            for method in METHODS:
                if isinstance(result.get(method), float):
                    memory[method] = step_memory(case, method)
        print(format_row(case, result, memory), flush=True)


if __name__ == "__main__":
    main()
