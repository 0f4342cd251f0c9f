"""A random sweep of dual-cone problems: every torch solver against quadprog, and the KKT check.

Cases mix sizes m = 1 to 129, ``reg_eps`` in {1e-2, 1e-4, 1e-6}, row norms from 1e-6 to 1e6, opposite
and near-duplicate rows, and Gramians of condition number 1e12. For each solver it prints the
failures (exceptions), the largest relative difference from quadprog's solutions (UPGrad's rows
``pᵢ eᵢ``), and the largest relative KKT violation.

    python benchmarks/sweep_dual_cone.py                  # 400 cases
    python benchmarks/sweep_dual_cone.py --cases 40 --max-size 40
"""

from __future__ import annotations

import argparse

import torch
from torch import Tensor

from jdoptim.linalg import prepare_dual_cone_gramian, project_to_dual_cone

REG_EPS = (1e-2, 1e-4, 1e-6)


def sweep_case(index: int, max_size: int = 129) -> tuple[Tensor, Tensor, float]:
    """Case ``index``: a float64 Gramian, UPGrad's bounds ``diag(p)`` and a ``reg_eps``."""
    generator = torch.Generator().manual_seed(index)
    size = int(torch.randint(1, max_size + 1, (1,), generator=generator))
    reg_eps = REG_EPS[index % len(REG_EPS)]
    shape = index % 4
    if shape == 3:
        basis, _ = torch.linalg.qr(
            torch.randn(size, size, generator=generator, dtype=torch.float64)
        )
        jacobian = basis * torch.logspace(0, -6, size, dtype=torch.float64)  # cond(G) = 1e12
    else:
        columns = int(torch.randint(1, 2 * size + 2, (1,), generator=generator))
        jacobian = torch.randn(size, columns, generator=generator, dtype=torch.float64)
        if shape == 1 and size > 2:  # opposite rows
            jacobian[size // 2 :] = -jacobian[: size - size // 2]
        if shape == 2 and size > 2:  # near-duplicate rows
            noise = torch.randn(jacobian.shape, generator=generator, dtype=torch.float64)
            jacobian[size // 2 :] = jacobian[: size - size // 2] + 1e-6 * noise[size // 2 :]
    norms = 10 ** (12 * torch.rand(size, 1, generator=generator, dtype=torch.float64) - 6)
    jacobian = jacobian * norms
    preference = torch.rand(size, generator=generator, dtype=torch.float64) + 0.1
    return jacobian @ jacobian.T, torch.diag(preference), reg_eps


def kkt_violation(gramian: Tensor, bounds: Tensor, solution: Tensor, reg_eps: float) -> float:
    """Largest of ``max(u - v)``, ``max(-μ)`` and ``max |μ ⊙ (v - u)|``, relative to the sizes."""
    matrix = prepare_dual_cone_gramian(gramian, reg_eps)
    multiplier = solution @ matrix
    size = torch.maximum(solution.abs().amax(dim=1), bounds.abs().amax(dim=1)).clamp(min=1e-300)
    scale = float(matrix.abs().max()) * size
    slack = solution - bounds
    violations = [
        (-slack).clamp(min=0).amax(dim=1) / size,
        (-multiplier).clamp(min=0).amax(dim=1) / scale,
        (multiplier * slack).abs().amax(dim=1) / (scale * size),
    ]
    return float(torch.stack(violations).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=400)
    parser.add_argument("--max-size", type=int, default=129)
    parser.add_argument("--solvers", nargs="*", default=["auto", "active_set", "batched"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    failures = {name: 0 for name in args.solvers}
    difference = {name: 0.0 for name in args.solvers}
    violation = {name: 0.0 for name in args.solvers}
    for index in range(args.cases):
        gramian, bounds, reg_eps = sweep_case(index, args.max_size)
        reference = project_to_dual_cone(gramian, bounds, reg_eps=reg_eps, solver="quadprog")
        for name in args.solvers:
            try:
                solution = project_to_dual_cone(gramian, bounds, reg_eps=reg_eps, solver=name)  # type: ignore[arg-type]
            except RuntimeError:
                failures[name] += 1
                continue
            error = (solution - reference).abs().max() / reference.abs().max()
            difference[name] = max(difference[name], float(error))
            violation[name] = max(
                violation[name], kkt_violation(gramian, bounds, solution, reg_eps)
            )
    print("| solver | cases | failures | max rel. diff from quadprog | max rel. KKT violation |")
    print("|---|---|---|---|---|")
    for name in args.solvers:
        print(
            f"| {name} | {args.cases} | {failures[name]} | {difference[name]:.1e} | "
            f"{violation[name]:.1e} |"
        )


if __name__ == "__main__":
    main()
