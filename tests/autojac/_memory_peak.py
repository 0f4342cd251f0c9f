"""Peak memory of ``backward`` + ``jac_to_grad`` relative to the size of one Jacobian.

Not a test (no timing or memory assertions in unit tests): run it by hand,
``OMP_NUM_THREADS=1 python -m tests.autojac._memory_peak``. Each configuration runs in a fresh
subprocess; the peak resident set size (VmHWM) is reset just before the step through
``/proc/self/clear_refs``, so the extra peak is the step's own memory, Jacobian included.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

WIDTHS = (320, 1024, 512, 256, 1)  # 985,089 parameters
ROWS = 64


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _measure(config: str) -> dict[str, float]:
    import torch
    from torch import nn

    import jdoptim
    from jdoptim.aggregation import Aggregator, UPGrad
    from jdoptim.autojac import backward, jac_to_grad

    class ColumnMean(Aggregator):
        """Needs the concatenated Jacobian (not a weighted aggregator)."""

        def forward(self, matrix: torch.Tensor, /) -> torch.Tensor:
            return matrix.mean(dim=0)

    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for fan_in, fan_out in itertools.pairwise(WIDTHS):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    model = nn.Sequential(*layers[:-1])
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    x, y = torch.randn(ROWS, WIDTHS[0]), torch.randn(ROWS)
    losses = (model(x).squeeze(1) - y) ** 2
    jacobian_bytes = ROWS * n * 4

    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    if config.startswith("torchjd"):
        import torchjd.aggregation
        import torchjd.autojac

        torchjd.autojac.backward(losses)
        torchjd.autojac.jac_to_grad(
            params,
            torchjd.aggregation.UPGrad(),
            optimize_gramian_computation=config.endswith("optimized"),
        )
    elif config == "one-call":
        jdoptim.backward(losses, UPGrad())
    else:
        chunk = 16 if config == "upgrad-chunk16" else None
        aggregator = ColumnMean() if config == "concatenating" else UPGrad()
        backward(losses, parallel_chunk_size=chunk)
        jac_to_grad(params, aggregator)
    peak = _status_kib("VmHWM")
    return {
        "parameters": n,
        "jacobian_mib": jacobian_bytes / 2**20,
        "extra_peak_mib": (peak - before) / 1024,
        "ratio": (peak - before) * 1024 / jacobian_bytes,
    }


CONFIGS = (
    "upgrad",
    "upgrad-chunk16",
    "one-call",
    "concatenating",
    "torchjd",
    "torchjd-optimized",
)


def main() -> None:
    if len(sys.argv) == 2:
        print(json.dumps(_measure(sys.argv[1])))
        return
    for config in CONFIGS:
        result = subprocess.run(
            [sys.executable, "-m", "tests.autojac._memory_peak", config],
            capture_output=True,
            text=True,
            check=True,
        )
        row = json.loads(result.stdout)
        print(
            f"{config:18s} n={row['parameters']} J={row['jacobian_mib']:.0f} MiB "
            f"extra peak={row['extra_peak_mib']:.0f} MiB ratio={row['ratio']:.2f}"
        )


if __name__ == "__main__":
    main()
