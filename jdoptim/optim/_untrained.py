"""Leaves that a step's losses reach but the optimizer does not train.

``loss.backward()`` fills the ``.grad`` of every leaf requiring grad that the loss reaches; a
Jacobian-descent step fills its own parameters' (with the method's combination of the losses),
and a second optimizer (an auxiliary head under ``torch.optim.SGD``) or an input with
``requires_grad`` gets nothing from it, unless the path ran a plain backward pass. The optimizer
says so once, rather than let that optimizer step on a missing ``.grad`` without a word.
"""

from __future__ import annotations

from torch import Tensor

from jdoptim.autojac import reachable_leaves
from jdoptim.optim._window import GradSnapshot

#: Steps on which the check runs: it walks the losses' graph (~2 µs a node), and a model that
#: reaches leaves outside the optimizer does so from its first steps.
CHECKED_STEPS = 3


class UntrainedLeaves:
    """The leaves requiring grad that ``losses`` reach outside ``trained``, and their ``.grad``
    before the step."""

    def __init__(self, losses: Tensor, trained: list[Tensor]) -> None:
        ids = {id(param) for param in trained}
        self.leaves = [leaf for leaf in reachable_leaves([losses]) if id(leaf) not in ids]
        self._before = GradSnapshot(self.leaves)

    def left_alone(self) -> list[Tensor]:
        """Those whose ``.grad`` the step did not fill (neither replaced nor changed in place)."""
        return [
            leaf
            for index, leaf in enumerate(self.leaves)
            if leaf.grad is self._before.grads[index]
            and not self._before.edited_in_place(index, leaf)
        ]

    def message(self, name: str) -> str | None:
        """The warning for the leaves left alone, or ``None`` when there are none."""
        left = self.left_alone()
        if not left:
            return None
        shapes = ", ".join(str(tuple(leaf.shape)) for leaf in left[:3])
        more = f" and {len(left) - 3} more" if len(left) > 3 else ""
        return (
            f"The losses reach {len(left)} tensor(s) requiring grad that this {name} does not "
            f"train (shapes {shapes}{more}): their .grad is left as it was, where loss.backward() "
            "would have filled it, so an optimizer of their own (an auxiliary head under "
            "torch.optim.SGD) does not move them. If they should follow these losses, give them "
            "to this optimizer (add_param_group, with their own lr if need be); if they should "
            "not, call requires_grad_(False) on them or detach what they feed."
        )
