"""The Gramian pass with a batch dim.

One backward pass gives the activation gradients of every recorded call, plus probe rows that check
where the instances lie in each call's output and that the losses are independent across them (see
:mod:`jdoptim.autogram._independence`); then each parameter takes the cheapest exact route: a
closed form, local per-instance VJPs of one call, or per-row autograd.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge

from jdoptim._warnings import warn
from jdoptim.autogram._assembly import instance_major_order
from jdoptim.autogram._attention import attention_terms
from jdoptim.autogram._graph import GraphPlan, closed_form_place, generic_place
from jdoptim.autogram._independence import bit_masks, masked_dims, scaled_dims, scaling_weights
from jdoptim.autogram._jacobian import batched_vjp, exact_terms, runs_per_row
from jdoptim.autogram._projections import (
    Use,
    find_projections,
    output_shape,
    projection_terms,
    usable,
)
from jdoptim.autogram._records import CallRecord
from jdoptim.autogram._replay import replay_rows
from jdoptim.autogram._structure import Position, prove
from jdoptim.autogram._terms import MaterializedTerm, Route, Term

# A call output whose batch dim could not be established: its parameters take an exact path.
_UNVERIFIED = -1
# Activation gradients (elements, all outputs) above which, when the rows run one backward pass
# each anyway, the task and probe rows are requested in two calls instead of stacked into one
# tensor: the copy then costs more than the second call (on this CPU at B = 32: the CNN's pass 9%
# to 13% faster split, the MLP's 10% slower).
_SPLIT_ELEMENTS = 2**18


class BatchedPass:
    """The Gramian pass with a batch dim: activation gradients, closed forms, exact leftovers."""

    def __init__(
        self,
        output: Tensor,
        batch_dim: int,
        covered: dict[int, Tensor],
        plan: GraphPlan,
        generator: torch.Generator,
    ) -> None:
        self.output = output
        self.generator = generator
        self.batch_dim = batch_dim
        self.covered = covered
        self.plan = plan
        self.shape = tuple(output.shape)
        self.batch = self.shape[batch_dim]
        self.tasks = math.prod(self.shape) // self.batch
        self.dtype = torch.promote_types(output.dtype, torch.float32)
        # Per generic call (by record id): the terms of its linear projections, where the
        # structural proof covered them (:mod:`jdoptim.autogram._projections`).
        self.projected: dict[int, list[tuple[Tensor, Term]]] = {}

    def terms(self) -> list[tuple[Tensor, Term]]:
        records = self.plan.records
        if not self._batch_size_seen(records):
            return self._exact_terms(set())
        edges = [edge for record in records for edge in record.reached_outputs]
        shapes = [shape for record in records for shape in record.output_shapes]
        gradients, dims = self._verified_gradients(records, edges, shapes)
        by_record: dict[int, list[tuple[Tensor, int | None]]] = {}
        position = 0
        for record in records:
            outputs = []
            for _ in record.output_shapes:
                outputs.append((gradients[position], dims[position]))
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
        return terms + self._exact_terms(done)

    def _exact_terms(self, done: set[int]) -> list[tuple[Tensor, Term]]:
        """The exact route's terms for the covered parameters the graph reaches, but ``done``."""
        leftovers = [
            p for pid, p in self.covered.items() if pid in self.plan.places and pid not in done
        ]
        if not leftovers:
            return []
        return exact_terms(self.output, leftovers, instance_major_order(self.shape, self.batch_dim))

    def _verified_gradients(
        self,
        records: list[CallRecord],
        edges: list[GradientEdge],
        shapes: list[tuple[int, ...]],
    ) -> tuple[list[Tensor], list[int | None]]:
        """Each output's task gradients ``[T, *y.shape]`` and its instance dim, checked this pass.

        The dim is ``None`` for batch size 1 and ``_UNVERIFIED`` where no candidate dim passes the
        independence checks (see :mod:`jdoptim.autogram._independence`).
        """
        if not edges:
            return [], []
        tasks = self.tasks
        if self.batch == 1:
            rows = self._task_rows()
            return self._activation_gradients(edges, shapes, rows), [None] * len(edges)
        candidates = [
            self._candidates(record, shape)
            for record, shape in zip(_repeat_records(records), shapes, strict=True)
        ]
        proven = self._proven_gradients(records, edges, shapes, candidates)
        if proven is not None:
            return proven
        half = self.output.dtype == torch.float16 or any(r.half_precision for r in records)
        weights = scaling_weights(self.batch, half, self.generator)
        probe = self._probe_rows(weights)
        task_rows = self._task_rows()
        large = sum(math.prod(shape) for shape in shapes) >= _SPLIT_ELEMENTS
        if large and runs_per_row(task_rows.shape[0] + probe.shape[0], self.output.device):
            # One plain backward pass per row either way: two calls, without stacking their rows.
            task_grads = self._activation_gradients(edges, shapes, task_rows)
            probe_grads = self._activation_gradients(edges, shapes, probe)
        else:
            gradients = self._activation_gradients(edges, shapes, torch.cat([task_rows, probe]))
            task_grads = [g[:tasks] for g in gradients]
            probe_grads = [g[tasks:] for g in gradients]
        dims = scaled_dims(task_grads, probe_grads, weights, candidates)
        unsure = [k for k, dim in enumerate(dims) if dim is None and candidates[k]]
        if unsure:
            masks = bit_masks(self.batch)
            rows = masks.to(self.output.dtype)[:, :, None].expand(-1, -1, tasks)
            masked = self._activation_gradients(
                [edges[k] for k in unsure], [shapes[k] for k in unsure], rows
            )
            for k, dim in zip(
                unsure, masked_dims(masked, masks, [candidates[k] for k in unsure]), strict=True
            ):
                dims[k] = dim
        return task_grads, [_UNVERIFIED if dim is None else dim for dim in dims]

    def _proven_gradients(
        self,
        records: list[CallRecord],
        edges: list[GradientEdge],
        shapes: list[tuple[int, ...]],
        candidates: list[list[int]],
    ) -> tuple[list[Tensor], list[int | None]] | None:
        """Where the graph's structure proves the independence (:mod:`._structure`): the task
        gradients and instance dims without probe rows, and the gradients of the linear
        projections found inside generic calls (kept in ``self.projected``); else ``None``."""
        found: dict[int, list[Use]] = {}
        for record in records:
            if record.rule is None:
                uses = find_projections(record, self._generic_params(record))
                if uses:
                    found[id(record)] = uses
        extra = [use.edge for uses in found.values() for use in uses]
        proof = prove(self.output, self.batch_dim, edges, extra)
        if proof is None:
            return None
        proven = [proof.batch_dim(k, shape) for k, shape in enumerate(shapes)]
        if not all(
            dim in allowed for dim, allowed in zip(proven, candidates, strict=True) if allowed
        ):
            return None
        placed: dict[int, tuple[list[Use], list[Position]]] = {}
        first = len(edges)
        for key, uses in found.items():
            positions = usable(uses, proof, first)
            if positions is not None:
                placed[key] = (uses, positions)
            first += len(uses)
        kept = [use for uses, _ in placed.values() for use in uses]
        gradients = self._activation_gradients(
            edges + [use.edge for use in kept],
            shapes + [output_shape(use) for use in kept],
            self._task_rows(),
        )
        rest = iter(gradients[len(edges) :])
        self.projected = {
            key: projection_terms(
                uses, [next(rest) for _ in uses], positions, self.batch, self.dtype
            )
            for key, (uses, positions) in placed.items()
        }
        dims: list[int | None] = [
            dim if allowed and dim is not None else _UNVERIFIED
            for dim, allowed in zip(proven, candidates, strict=True)
        ]
        return gradients[: len(edges)], dims

    def _generic_params(self, record: CallRecord) -> list[Tensor]:
        """The covered parameters that only ``record``'s call uses (its local route's)."""
        place = generic_place(record)
        return [
            p
            for p in self.plan.generic_params.get(id(record), [])
            if self.plan.places.get(id(p)) == {place}
        ]

    def _task_rows(self) -> Tensor:
        """``[T, B, T]``: row ``t`` is task ``t``'s losses of every instance."""
        eye = torch.eye(self.tasks, dtype=self.output.dtype)
        return eye.unsqueeze(1).expand(self.tasks, self.batch, self.tasks)

    def _probe_rows(self, weights: Tensor) -> Tensor:
        """``[P * T, B, T]``: row ``p * T + t`` is task ``t``'s losses weighted by ``weights[p]``."""
        eye = torch.eye(self.tasks, dtype=self.output.dtype)
        rows = weights.to(self.output.dtype)[:, None, :, None] * eye[None, :, None, :]
        return rows.reshape(-1, self.batch, self.tasks)

    def _activation_gradients(
        self, edges: list[GradientEdge], shapes: list[tuple[int, ...]], rows: Tensor
    ) -> list[Tensor]:
        """``[R, *y.shape]`` per edge, for cotangent rows ``[R, B, T]`` on the losses."""
        grad_outputs = self._from_moved(rows.to(self.output.device))
        result = batched_vjp([self.output], edges, [grad_outputs])
        return [
            g if g is not None else self.output.new_zeros(rows.shape[0], *shape)
            for g, shape in zip(result, shapes, strict=True)
        ]

    def _from_moved(self, rows: Tensor) -> Tensor:
        """``[R, B, T]`` (instance-major) to ``[R, *output.shape]``."""
        moved = [self.batch, *(s for d, s in enumerate(self.shape) if d != self.batch_dim)]
        return rows.reshape(rows.shape[0], *moved).movedim(1, 1 + self.batch_dim)

    def _candidates(self, record: CallRecord, shape: tuple[int, ...]) -> list[int]:
        """Dims of one call output that may hold the instances (right size, right role)."""
        if record.rule is not None:
            if record.x is None:
                return []
            dims = record.rule.batch_dims(record.module, shape)
        else:
            dims = list(range(len(shape)))
        return [dim for dim in dims if shape[dim] == self.batch]

    def _batch_size_seen(self, records: list[CallRecord]) -> bool:
        """Whether some covered call processed a batch of the output's size. If none did, every
        parameter takes the exact route (correct for any ``batch_dim``), with a warning: the layers
        may see the instances flattened with other dims (``[B·S, d]`` rows), or ``output`` may join
        several forward passes, or ``batch_dim`` may be wrong."""
        if not records or self.batch == 1:
            return True
        if any(self._candidates(r, shape) for r in records for shape in r.output_shapes):
            return True
        shapes = sorted({s for r in records for s in r.output_shapes})[:4]
        warn(
            f"output has batch size {self.batch} along batch_dim={self.batch_dim} (shape "
            f"{self.shape}), but no covered module processed a batch of that size (their outputs "
            f"have shapes such as {shapes}): every parameter takes the exact route, correct but "
            "slower. Expected when the layers see the instances flattened with other dims "
            "([B*S, d] rows) or when output joins several forward passes; otherwise check "
            "batch_dim: per-task losses (each over the whole batch) take batch_dim=None, as the "
            "optimizers join micro-batches and ranks along batch_dim instead of summing them."
        )
        return False

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
                for name, p in calls[0].params.items()
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
            params = [p for p in self._generic_params(record) if id(p) not in done]
            if not params:
                continue
            projected = self.projected.get(id(record))
            if projected is not None and {id(p) for p, _ in projected} == {id(p) for p in params}:
                terms += projected
                done.update(id(p) for p in params)
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
        if any(id(p) not in names for p in params):
            # The module holds other tensors than during its call (fully_shard swapped its sharded
            # parameters back in): replaying it would use those; the local route reads the graph.
            return []
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
