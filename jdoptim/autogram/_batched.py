"""The Gramian pass with a batch dim.

One backward pass gives the activation gradients of every recorded call (plus, for call signatures
not seen before, a probe row that establishes each call's batch dim); then each parameter takes the
cheapest exact route: a closed form, local per-instance VJPs of one call, or per-row autograd.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge

from jdoptim.autogram._assembly import instance_major_order
from jdoptim.autogram._attention import attention_terms
from jdoptim.autogram._graph import GraphPlan, closed_form_place, generic_place
from jdoptim.autogram._jacobian import batched_vjp, exact_terms
from jdoptim.autogram._records import CallRecord
from jdoptim.autogram._replay import replay_rows
from jdoptim.autogram._terms import MaterializedTerm, Route, Term

# A call output whose batch dim could not be established: its parameters take an exact path.
_UNVERIFIED = -1


class BatchedPass:
    """The Gramian pass with a batch dim: activation gradients, closed forms, exact leftovers."""

    def __init__(
        self,
        output: Tensor,
        batch_dim: int,
        covered: dict[int, Tensor],
        plan: GraphPlan,
        verified_dims: dict[tuple[object, ...], int | None],
    ) -> None:
        self.output = output
        self.verified_dims = verified_dims
        self.batch_dim = batch_dim
        self.covered = covered
        self.plan = plan
        self.shape = tuple(output.shape)
        self.batch = self.shape[batch_dim]
        self.tasks = math.prod(self.shape) // self.batch
        self.dtype = torch.promote_types(output.dtype, torch.float32)

    def terms(self) -> list[tuple[Tensor, Term]]:
        records = self.plan.records
        self._check_batch_size(records)
        edges = [edge for record in records for edge in record.reached_outputs]
        shapes = [shape for record in records for shape in record.output_shapes]
        keys = [self._signature(r, shape) for r in records for shape in r.output_shapes]
        probe = self.batch > 1 and any(key not in self.verified_dims for key in keys)
        gradients = self._activation_gradients(edges, shapes, probe) if edges else []
        probed: dict[tuple[object, ...], int] = {}
        if probe:
            for key, record, shape, gradient in zip(
                keys, _repeat_records(records), shapes, gradients, strict=True
            ):
                probed[key] = self._probed_dim(record, shape, gradient[-1])
                if bool(gradient[-1].any()):  # an all-zero probe proves nothing: ask again later
                    self.verified_dims[key] = probed[key]
        by_record: dict[int, list[tuple[Tensor, int | None]]] = {}
        position = 0
        for record in records:
            outputs = []
            for _ in record.output_shapes:
                key = keys[position]
                dim = (
                    probed.get(key, self.verified_dims.get(key, _UNVERIFIED))
                    if self.batch > 1
                    else None
                )
                outputs.append((gradients[position][: self.tasks], dim))
                position += 1
            by_record[id(record)] = outputs
        verified = {
            id(r): all(dim != _UNVERIFIED for _, dim in by_record[id(r)]) and _input_unchanged(r)
            for r in records
        }
        terms: list[tuple[Tensor, Term]] = []
        done: set[int] = set()
        terms += self._closed_form_terms(records, by_record, verified, done)
        terms += self._local_terms(records, by_record, verified, done)
        leftovers = [
            p for pid, p in self.covered.items() if pid in self.plan.places and pid not in done
        ]
        if leftovers:
            terms += exact_terms(
                self.output, leftovers, instance_major_order(self.shape, self.batch_dim)
            )
        return terms

    def _activation_gradients(
        self, edges: list[GradientEdge], shapes: list[tuple[int, ...]], probe: bool
    ) -> list[Tensor]:
        """``[T (+1 probe), *y.shape]`` per edge: each task's summed losses, then instance 0's."""
        dtype, device = self.output.dtype, self.output.device
        tasks = torch.eye(self.tasks, dtype=dtype, device=device)
        rows = tasks.unsqueeze(1).expand(self.tasks, self.batch, self.tasks)
        if probe:
            instance_zero = torch.zeros(1, self.batch, self.tasks, dtype=dtype, device=device)
            instance_zero[0, 0] = 1
            rows = torch.cat([rows, instance_zero])
        grad_outputs = self._from_moved(rows)
        result = batched_vjp([self.output], edges, [grad_outputs])
        return [
            g if g is not None else self.output.new_zeros(rows.shape[0], *shape)
            for g, shape in zip(result, shapes, strict=True)
        ]

    def _signature(self, record: CallRecord, shape: tuple[int, ...]) -> tuple[object, ...]:
        """What a call's batch dim depends on: the module, its input and output shapes, the batch."""
        x_shape = tuple(record.x.shape) if record.x is not None else None
        module = (id(record.module), type(record.module))
        return (module, record.rule, x_shape, shape, self.shape, self.batch_dim)

    def _from_moved(self, rows: Tensor) -> Tensor:
        """``[R, B, T]`` (instance-major) to ``[R, *output.shape]``."""
        moved = [self.batch, *(s for d, s in enumerate(self.shape) if d != self.batch_dim)]
        return rows.reshape(rows.shape[0], *moved).movedim(1, 1 + self.batch_dim)

    def _probed_dim(self, record: CallRecord, shape: tuple[int, ...], probe: Tensor) -> int:
        """The batch dim of one call output, or ``_UNVERIFIED``, from the probe row.

        The dim must be able to hold instances (:meth:`_candidates`), and instance 0's losses must
        have an exactly zero gradient on every other slice of it and a nonzero one on slice 0. The
        result is cached per call signature, so the probe row runs once per model structure.
        """
        passing = []
        for dim in self._candidates(record, shape):
            if bool(probe.narrow(dim, 1, self.batch - 1).any()):
                continue
            if bool(probe.narrow(dim, 0, 1).any()):
                passing.append(dim)
        return passing[0] if len(passing) == 1 else _UNVERIFIED

    def _candidates(self, record: CallRecord, shape: tuple[int, ...]) -> list[int]:
        """Dims of one call output that may hold the instances (right size, right role)."""
        if record.rule is not None:
            if record.x is None:
                return []
            dims = record.rule.batch_dims(record.module, shape)
        else:
            dims = list(range(len(shape)))
        return [dim for dim in dims if shape[dim] == self.batch]

    def _check_batch_size(self, records: list[CallRecord]) -> None:
        if not records or self.batch == 1:
            return
        if any(self._candidates(r, shape) for r in records for shape in r.output_shapes):
            return
        shapes = sorted({s for r in records for s in r.output_shapes})[:4]
        raise ValueError(
            f"output has batch size {self.batch} along batch_dim={self.batch_dim} (shape "
            f"{self.shape}), but no covered module processed a batch of that size (their outputs "
            f"have shapes such as {shapes}). Check batch_dim, or that output comes from this "
            "forward pass."
        )

    def _closed_form_terms(
        self,
        records: list[CallRecord],
        by_record: dict[int, list[tuple[Tensor, int | None]]],
        verified: dict[int, bool],
        done: set[int],
    ) -> list[tuple[Tensor, Term]]:
        modules: dict[int, list[CallRecord]] = {}
        for record in records:
            if record.rule is not None:
                modules.setdefault(id(record.module), []).append(record)
        terms: list[tuple[Tensor, Term]] = []
        for calls in modules.values():
            module = calls[0].module
            if not all(verified[id(r)] for r in calls):
                continue
            place = closed_form_place(module)
            names = {
                name: p
                for name, p in module.named_parameters(recurse=False)
                if id(p) in self.covered and self.plan.places.get(id(p)) == {place}
            }
            if not names:
                continue
            inputs = []
            for record in calls:
                for gradient, dim in by_record[id(record)]:
                    assert record.x is not None
                    inputs.append((record.x, gradient, dim))
            rule = calls[0].rule
            assert rule is not None
            with torch.autocast(self.output.device.type, enabled=False):
                built = rule.terms(module, inputs, self.dtype)
            for name, term in built.items():
                if name in names:
                    terms.append((names[name], term))
                    done.add(id(names[name]))
        return terms

    def _local_terms(
        self,
        records: list[CallRecord],
        by_record: dict[int, list[tuple[Tensor, int | None]]],
        verified: dict[int, bool],
        done: set[int],
    ) -> list[tuple[Tensor, Term]]:
        """Exact per-instance gradients of a generic call's parameters, from its own local graph."""
        terms: list[tuple[Tensor, Term]] = []
        for record in records:
            if record.rule is not None or not verified[id(record)]:
                continue
            place = generic_place(record)
            params = [
                p
                for p in self.plan.generic_params.get(id(record), [])
                if self.plan.places.get(id(p)) == {place} and id(p) not in done
            ]
            if not params:
                continue
            replayed = self._replayed_terms(record, by_record[id(record)], params)
            if replayed:
                terms += replayed
                done.update(id(p) for p in params)
                continue
            grad_outputs = [
                self._per_instance(gradient, dim) for gradient, dim in by_record[id(record)]
            ]
            jacobians = batched_vjp(record.reached_outputs, params, grad_outputs)
            for param, jacobian in zip(params, jacobians, strict=True):
                if jacobian is not None:
                    rows = jacobian.reshape(jacobian.shape[0], -1).to(self.dtype)
                    terms.append((param, MaterializedTerm(rows, tuple(param.shape), Route.LOCAL)))
                done.add(id(param))
        return terms

    def _replayed_terms(
        self,
        record: CallRecord,
        outputs: list[tuple[Tensor, int | None]],
        params: list[Tensor],
    ) -> list[tuple[Tensor, Term]]:
        if record.replay is None or len(outputs) != 1 or outputs[0][1] is None:
            return []
        gradient, dim = outputs[0]
        assert dim is not None
        names = {id(p): name for name, p in record.module.named_parameters()}
        with torch.autocast(self.output.device.type, enabled=False):
            factored = attention_terms(
                record.module, record.replay, gradient, dim, self.batch, self.dtype
            )
        if factored is not None and all(names.get(id(p)) in factored for p in params):
            return [(p, factored[names[id(p)]]) for p in params]
        rows = replay_rows(record.module, params, record.replay, gradient, dim, self.batch)
        if rows is None:
            return []
        return [
            (
                p,
                MaterializedTerm(
                    r.reshape(self.batch * self.tasks, -1).to(self.dtype),
                    tuple(p.shape),
                    Route.REPLAY,
                ),
            )
            for p, r in zip(params, rows, strict=True)
        ]

    def _per_instance(self, gradient: Tensor, dim: int | None) -> Tensor:
        """``[B * T, *y.shape]``: row ``(i, t)`` is task ``t``'s gradient restricted to slice ``i``."""
        if dim is None:
            return gradient
        moved = gradient.movedim(1 + dim, 1)  # [T, B, ...]
        rows = moved.new_zeros(self.batch, self.tasks, *moved.shape[1:])
        index = torch.arange(self.batch, device=moved.device)
        rows[index, :, index] = moved.transpose(0, 1)
        return rows.reshape(self.batch * self.tasks, *moved.shape[1:]).movedim(1, 1 + dim)


def _repeat_records(records: list[CallRecord]) -> list[CallRecord]:
    """Each record once per output, aligned with the flattened edges."""
    return [record for record in records for _ in record.output_shapes]


def _input_unchanged(record: CallRecord) -> bool:
    return record.x is None or record.x._version == record.x_version
