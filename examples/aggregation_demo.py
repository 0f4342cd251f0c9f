"""Two objectives that conflict: what averaging does, and what UPGrad, DualProj and MGDA do instead.

A step along -d decreases loss i, to first order, when gᵢ · d > 0, leaves it unchanged when
gᵢ · d = 0, and increases it when gᵢ · d < 0.

Run: .venv/bin/python examples/aggregation_demo.py   (.venv: made by the quick start)
"""

import torch

from jdoptim.aggregation import MGDA, DualProj, Mean, UPGrad

# Rows are the gradients of two losses; they disagree on the first coordinate.
jacobian = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
# Below this relative size (gᵢ · d / (‖gᵢ‖ ‖d‖)) a product counts as zero: the dual-cone solvers
# regularise the Gramian (reg_eps=1e-4), so a projection on the cone's boundary lands within ~1e-4.
TOLERANCE = 1e-3


def verdict(alignment: torch.Tensor, direction: torch.Tensor) -> str:
    cosines = alignment / (jacobian.norm(dim=1) * direction.norm())
    if (cosines < -TOLERANCE).any():
        return "increases a loss"
    if (cosines.abs() <= TOLERANCE).any():
        return "leaves a loss unchanged (on the cone's boundary), increases none"
    return "decreases every loss"


print("gradients:\n", jacobian)
for aggregator in (Mean(), UPGrad(), DualProj(), MGDA()):
    direction = aggregator(jacobian)
    alignment = jacobian @ direction
    print(
        f"{aggregator!s:>9}: d={[round(v, 3) for v in direction.tolist()]}, "
        f"gᵢ·d={[round(v, 3) for v in alignment.tolist()]}: {verdict(alignment, direction)}"
    )
print(
    "Mean increases the first loss to first order (g₁·d = -2). DualProj projects the mean onto the\n"
    "dual cone, so it lands on the boundary: g₁·d = 0 in exact arithmetic, -0.003 here from the\n"
    "solver's regularisation (DualProj(reg_eps=0.0) gives 0). UPGrad and MGDA decrease both losses."
)
