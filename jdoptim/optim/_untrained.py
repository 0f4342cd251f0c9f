"""Parameters that a step's losses reach but the optimizer does not train.

``loss.backward()`` fills the ``.grad`` of every leaf requiring grad that the loss reaches; a
Jacobian-descent step fills its own parameters' (with the method's combination of the losses),
and a second optimizer's parameters (an auxiliary head under ``torch.optim.SGD``) get nothing
from it, unless the path ran a plain backward pass. The optimizer says so once, rather than let
that optimizer step on a missing ``.grad`` without a word. Inputs with ``requires_grad`` are not
parameters: no optimizer moves them, and they are not named.
"""

from __future__ import annotations

from torch import Tensor, nn

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
        # Parameters only: an input with requires_grad (a physics-informed network's du/dx, the
        # embedding outputs of PEFT's enable_input_require_grads) is no optimizer's to move.
        self.leaves: list[Tensor] = [
            leaf
            for leaf in reachable_leaves([losses])
            if isinstance(leaf, nn.Parameter) and id(leaf) not in ids
        ]
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
            f"The losses reach {len(left)} parameter(s) that this {name} does not train (shapes "
            f"{shapes}{more}): their .grad is left as it was, where loss.backward() would have "
            "filled it. If another optimizer should move them with these losses (an auxiliary "
            "head), give them to this optimizer instead (add_param_group, with their own lr if "
            "need be). If they belong to another optimizer with its own losses (a GAN's "
            "discriminator), nothing is wrong: silence this with "
            "warnings.filterwarnings('ignore', 'The losses reach')."
        )
