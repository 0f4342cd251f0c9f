"""``jdoptim.backward``: Jacobian descent's ``loss.backward()``, straight into ``.grad``."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import Tensor

from jdoptim.aggregation import Aggregator
from jdoptim.autojac._jac import jacobians_of_inputs
from jdoptim.autojac._jac_to_grad import aggregate_into_grads


def backward(
    tensors: Tensor | Sequence[Tensor],
    aggregator: Aggregator,
    inputs: Tensor | Iterable[Tensor] | None = None,
    *,
    retain_graph: bool = False,
    parallel_chunk_size: int | None = None,
) -> Tensor | None:
    """Adds the aggregated Jacobian of the elements of ``tensors`` to each input's ``.grad``.

    One call for :func:`jdoptim.autojac.backward` followed by :func:`jdoptim.autojac.jac_to_grad`,
    without going through ``.jac``: with ``losses`` of shape ``[m]`` and ``aggregator=UPGrad()``,
    ``jdoptim.backward(losses, aggregator)`` then ``optimizer.step()`` is a step of Jacobian descent.
    ``inputs=None`` means every leaf requiring grad that ``tensors`` depend on (like
    :func:`torch.autograd.backward`). Other arguments and errors are those of
    :func:`jdoptim.autojac.jac` and :func:`jdoptim.autojac.jac_to_grad`.

    Returns:
        the weights ``w ∈ R^m`` for a weighted aggregator (``d = wᵀ J``), else ``None``.
    """
    if not isinstance(aggregator, Aggregator):
        raise TypeError(
            f"aggregator must be a jdoptim.aggregation.Aggregator (such as UPGrad()), got "
            f"{type(aggregator).__name__}. For the Jacobian in .jac, use jdoptim.autojac.backward."
        )
    input_list, results = jacobians_of_inputs(
        tensors, inputs, retain_graph=retain_graph, parallel_chunk_size=parallel_chunk_size
    )
    # Inputs the tensors do not reach keep their .grad, as with torch.autograd.backward.
    used = [
        (tensor, jacobian)
        for tensor, jacobian in zip(input_list, results, strict=True)
        if jacobian is not None
    ]
    return aggregate_into_grads([t for t, _ in used], [j for _, j in used], aggregator)
