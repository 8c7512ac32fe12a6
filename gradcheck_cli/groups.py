"""Which gradients are reduced one by one and which together (reduce.reduce_small), planned once per run.

A model of many small layers has thousands of small tensors; everything about them that is the same every step
(their order, sizes, rows, where their row flags live) is worked out before the first step, so a step only
concatenates their gradients and reduces them. Their host values come back as columns (one list per
statistic and group, steps.Block.column) rather than one record per tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from gradcheck_cli.distributed import GRADIENT_MAX, GRADIENT_SUM, local
from gradcheck_cli.reduce import STARVED_UNIT, GroupLayout, SmallBatch, batchable, on_device, reduce_small
from gradcheck_cli.steps import Block, ParamInfo


@dataclass
class SmallGroup:
    """Small tensors of one dtype, reduced together every step."""

    name: str  # the columns' prefix
    infos: list[ParamInfo]
    layout: GroupLayout
    keep: list[int] = field(default_factory=list)  # entries of the group's row vector that are real rows
    positions: list[int] = field(default_factory=list)  # their places in Collector._rows_flat

    @property
    def indices(self) -> list[int]:
        return [info.index for info in self.infos]

    def gradients(self) -> list[torch.Tensor] | None:
        """This step's gradients, or None when one is missing (the step then needs a plan of its own)."""
        grads = [info.tensor.grad for info in self.infos]
        if any(grad is None for grad in grads):
            return None
        return [local(grad) for grad in grads if grad is not None]

    def reduce(self, grads: list[torch.Tensor], tiny: float | None) -> tuple[SmallBatch, list[Block]]:
        """The group's statistics, as blocks of columns for the step's transfer."""
        batch = reduce_small(grads, tiny=tiny, layout=self.layout)
        fields = [("norm_sq", batch.norm_sq, GRADIENT_SUM), ("zeros", batch.zeros, GRADIENT_SUM)]
        fields.append(("max_abs", batch.max_abs, GRADIENT_MAX))
        if batch.underflow is not None:
            sampled = on_device([float(n) for n in batch.sizes], batch.underflow.device)
            fields += [("underflow", batch.underflow, GRADIENT_SUM), ("sampled", sampled, GRADIENT_SUM)]
        return batch, [Block(policy, vector, column=f"{self.name}:{name}") for name, vector, policy in fields]


def starved(info: ParamInfo) -> float:
    """The row test's floor: an embedding's rows are tokens, one looked up rarely is not a unit that cannot learn."""
    return 0.0 if info.embedding else STARVED_UNIT


def plan(
    params: list[ParamInfo],
    tensor_of: Callable[[ParamInfo], torch.Tensor | None],
    row_start: dict[int, int],
    row_count: dict[int, int],
) -> tuple[list[ParamInfo], list[SmallGroup]]:
    """The tensors reduced one by one (large, sparse, embeddings) and the groups of small ones reduced together,
    one group per dtype, in parameter order; a parameter whose tensor is None is left out. `row_start` and
    `row_count`: where each tensor with rows keeps its row flags (Collector._rows_flat)."""
    large: list[ParamInfo] = []
    small: dict[torch.dtype, list[tuple[ParamInfo, torch.Tensor]]] = {}
    for info in params:
        tensor = tensor_of(info)
        if tensor is None:
            continue
        tensor = local(tensor)
        if batchable(tensor) and not info.embedding:
            small.setdefault(tensor.dtype, []).append((info, tensor))
        else:
            large.append(info)
    groups = []
    for number, members in enumerate(small.values()):
        infos = [info for info, _ in members]
        layout = GroupLayout.of([t for _, t in members], [i.rows for i in infos], [starved(i) for i in infos])
        group = SmallGroup(f"small{number}", infos, layout)
        at = 0
        for info, count in zip(infos, layout.counts, strict=True):
            start = row_start.get(info.index)
            if start is not None and count == row_count[info.index]:
                group.keep += range(at, at + count)
                group.positions += range(start, start + count)
            at += count
        groups.append(group)
    return large, groups
