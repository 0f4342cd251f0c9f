"""Jacobians through autograd: the exact path of Jacobian descent, for any graph and aggregator.

* :func:`jac`: the Jacobian of outputs with respect to inputs, like ``torch.autograd.grad``.
* :func:`backward`: adds that Jacobian to the inputs' ``.jac`` field, like ``.grad``.
* :func:`jac_to_grad`: aggregates the ``.jac`` fields into ``.grad`` with an aggregator.
* :func:`mtl_backward`: multi-task learning, with task heads' gradients and the shared trunk's
  Jacobian.
* :func:`reached_by`: which inputs the outputs' graph reaches (the others get no ``.grad``).
* :func:`reachable_leaves`: the leaves requiring grad that the outputs' graph reaches (those
  ``torch.autograd.backward`` fills).

Jacobian rows are batched backward passes (vmap), with a row-by-row fallback announced by a
:class:`VmapFallbackWarning`. The one-call form is :func:`jdoptim.backward`.
"""

from jdoptim.autojac._backward import backward
from jdoptim.autojac._graph import reachable_leaves, reached_by
from jdoptim.autojac._jac import jac
from jdoptim.autojac._jac_field import clear_jac
from jdoptim.autojac._jac_to_grad import jac_to_grad
from jdoptim.autojac._mtl_backward import mtl_backward
from jdoptim.autojac._vjp import VmapFallbackWarning

__all__ = [
    "VmapFallbackWarning",
    "backward",
    "clear_jac",
    "jac",
    "jac_to_grad",
    "mtl_backward",
    "reachable_leaves",
    "reached_by",
]
