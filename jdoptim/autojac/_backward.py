"""``backward``: accumulate the Jacobian into the ``.jac`` field of the inputs."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import Tensor, nn

from jdoptim.autojac._jac import jacobians_of_inputs
from jdoptim.autojac._jac_field import accumulate_jac


def backward(
    tensors: Tensor | Sequence[Tensor],
    inputs: Tensor | Iterable[Tensor] | None = None,
    *,
    jac_tensors: Tensor | Sequence[Tensor] | None = None,
    retain_graph: bool = False,
    parallel_chunk_size: int | None = None,
) -> None:
    """Adds the Jacobian of the elements of ``tensors`` to the ``.jac`` field of each input.

    The analogue of :func:`torch.autograd.backward` for a vector of ``m`` values: each input ``x``
    receives ``x.jac`` of shape ``[m, *x.shape]`` (summed with any ``.jac`` already there, like
    ``.grad``). Aggregate it into ``.grad`` with :func:`jac_to_grad`. Arguments and errors are those
    of :func:`jac`; ``inputs=None`` means every leaf requiring grad that ``tensors`` depend on.
    ``jac_tensors`` is the analogue of ``grad_tensors`` in :func:`torch.autograd.backward`: one
    ``[k, *tensor.shape]`` initial Jacobian per tensor (see ``jac_outputs`` of :func:`jac`), giving
    ``k`` rows instead of one per element.
    """
    if isinstance(inputs, nn.Module):  # TorchJD's backward(tensors, aggregator)
        raise TypeError(
            f"inputs must be tensors, got the {type(inputs).__name__} module: "
            "jdoptim.autojac.backward fills .jac (aggregate it with jac_to_grad(params, "
            "aggregator)); jdoptim.backward(tensors, aggregator) does both in one call."
        )
    input_list, results = jacobians_of_inputs(
        tensors,
        inputs,
        retain_graph=retain_graph,
        parallel_chunk_size=parallel_chunk_size,
        jac_tensors=jac_tensors,
    )
    accumulate_jac(input_list, results)
