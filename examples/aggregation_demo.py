"""Two objectives that conflict: what averaging does, and what UPGrad does instead.

Run: python examples/aggregation_demo.py
"""

import torch

from jdoptim.aggregation import MGDA, DualProj, Mean, UPGrad

# Rows are the gradients of two losses; they disagree on the first coordinate.
jacobian = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])

print("gradients:\n", jacobian)
for aggregator in (Mean(), UPGrad(), DualProj(), MGDA()):
    direction = aggregator(jacobian)
    # A step along -direction decreases loss i (to first order) iff gᵢ · direction > 0.
    alignment = jacobian @ direction
    print(
        f"{aggregator!s:>9}: direction={[round(v, 3) for v in direction.tolist()]}, "
        f"gᵢ·d={[round(v, 3) for v in alignment.tolist()]}"
    )
print("Mean conflicts with the first loss (negative gᵢ·d); UPGrad, DualProj and MGDA do not.")
