"""What the hooks recorded in one step (`StepTape`), and its reduction to per-layer device vectors.

Hooks do as little as they can while the model runs: a forward hook keeps a small sample of the layer's input
(a copy, since the model may change its tensors in place afterwards), an activation hook a sample of the
activation's input, an output-gradient hook the norm of dL/dz. After backward, `StepTape.blocks` reduces all of
it at once: the samples concatenated, then segment sums and extrema over them, then sums per layer. About
thirty operations per step however many layers the model has, where statistics computed inside each hook cost
thirty per layer, and a hook's operations on a few thousand values cost more in dispatch than in arithmetic.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from gradcheck_cli.distributed import LOCAL_SUM
from gradcheck_cli.layers import SIGMOID_SATURATED_HIGH, SIGMOID_SATURATED_LOW, TANH_SATURATED
from gradcheck_cli.reduce import on_device, sample
from gradcheck_cli.steps import Block

NO_LIMIT = float("inf")
# the counts the tape keeps on the host, per layer (LayerStep's HOST_COUNT fields)
COUNTS = ("output_positions", "output_sampled", "input_numel", "saturated_numel")


@dataclass
class StepTape:
    """What the hooks recorded during one step, appended as hooks fire."""

    calls: dict[int, int] = field(default_factory=dict)
    order: list[int] = field(default_factory=list)
    # the samples the hooks kept (float32 copies, 1-D) and each one's saturation limit; and for each use of a
    # sample: which sample it reads, the layer whose input it is (its RMS and zero fraction; None for an
    # activation module's input), the layer before whose output may have been squashed by a tanh/sigmoid, the
    # layer an activation module's saturation counts for. Layers that read the same tensor (attention's
    # query/key/value projections, a network's branches, experts) share its sample.
    samples: list[torch.Tensor] = field(default_factory=list)
    limits: list[float] = field(default_factory=list)
    sample_of: list[int] = field(default_factory=list)
    sample_layer: list[int | None] = field(default_factory=list)
    squashed_for: list[int | None] = field(default_factory=list)
    saturated_for: list[int | None] = field(default_factory=list)
    output_squares: list[torch.Tensor] = field(default_factory=list)  # ||dL/dz||^2 per call, 0-d
    output_layers: list[int] = field(default_factory=list)
    output_positions: dict[int, int] = field(default_factory=dict)
    output_underflow: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    output_sampled: dict[int, int] = field(default_factory=dict)
    input_numel: dict[int, int] = field(default_factory=dict)
    saturated_numel: dict[int, int] = field(default_factory=dict)
    # (id, limit) of a tensor sampled this step -> (the tensor, weakly; its version then; its sample's index)
    _sampled: dict[tuple[int, float], tuple[weakref.ref[torch.Tensor], int, int]] = field(default_factory=dict)

    def keep(
        self,
        values: torch.Tensor,
        layer: int | None,
        squashed_for: int | None = None,
        saturated_for: int | None = None,
        limit: float = NO_LIMIT,
    ) -> int:
        """Keep a sample of `values` (reduce.sample, copied when it would alias them) for the step's end, or
        reuse the one kept of the same tensor, unchanged since (its version), for another reader; returns its
        size."""
        key = (id(values), limit)
        seen = self._sampled.get(key)
        if seen is not None and seen[0]() is values and seen[1] == values._version:
            index = seen[2]
        else:
            kept = sample(values.detach())
            if kept._is_view() or kept.dtype != torch.float32:
                kept = kept.to(torch.float32, copy=True)
            index = len(self.samples)
            self.samples.append(kept)
            self.limits.append(limit)
            self._sampled[key] = (weakref.ref(values), values._version, index)
        self.sample_of.append(index)
        self.sample_layer.append(layer)
        self.squashed_for.append(squashed_for)
        self.saturated_for.append(saturated_for)
        return self.samples[index].numel()

    def release(self) -> None:
        """Drop the device tensors once they are read (the host counts and the call order stay): nothing
        allocated during a step may outlive it (Collector.prepare says why)."""
        for kept in (
            self.samples,
            self.sample_of,
            self.sample_layer,
            self.squashed_for,
            self.saturated_for,
            self.limits,
        ):
            kept.clear()
        self._sampled.clear()
        self.output_squares.clear()
        self.output_layers.clear()
        self.output_underflow.clear()

    def blocks(self, device: torch.device, counts: bool = False) -> list[Block]:
        """The step's per-layer sums as device vectors, keyed by layer: output_sq, output_underflow, input_sq,
        input_zero, saturated, bounded_numel; with `counts` (several processes, whose counts add up) also the
        host counts (COUNTS), which a single process reads from the tape as they are."""
        blocks: list[Block] = []
        if self.output_underflow:
            owners = [layer for layer, found in self.output_underflow.items() for _ in found]
            found = torch.stack([v.float() for values in self.output_underflow.values() for v in values])
            blocks.append(_per_layer(found, owners, "output_underflow"))
        if counts:
            for name in COUNTS:
                values: dict[int, int] = getattr(self, name)
                if values:
                    vector = on_device([float(v) for v in values.values()], device)
                    blocks.append(Block(LOCAL_SUM, vector, column=name, keys=list(values)))
        if self.output_squares:
            squared = self.output_squares
            same = all(n.dtype == squared[0].dtype for n in squared)
            squares = (torch.stack(squared) if same else torch.stack([n.double() for n in squared])).double()
            blocks.append(_per_layer(squares, self.output_layers, "output_sq"))
        if self.samples:
            blocks += _sample_blocks(self, device)
        return blocks


def _sample_blocks(tape: StepTape, device: torch.device) -> list[Block]:
    """Every sample's statistics at once: sum of squares, exact zeros, extrema, counts beyond the saturation
    limits; then what they mean per layer (probe.py's rules for squashed inputs, written out as vectors)."""
    sizes = [kept.numel() for kept in tape.samples]
    values = torch.cat(tape.samples)
    lengths = on_device(sizes, device)
    numel = lengths.float()
    reduce = _segment_reducer(sizes, lengths)

    def total(mask: torch.Tensor) -> torch.Tensor:  # float32 counts: exact up to 2^24, and samples are 8192
        return reduce(mask.float(), "sum")

    magnitude = values.abs()
    squares = reduce(values.double().square(), "sum")  # 1e20 squared: float64
    zeros = total(values == 0)
    low = reduce(values, "min")
    high = reduce(values, "max")
    # A tanh's output spans most of [-1, 1]; a sigmoid's most of [0, 1], with few exact zeros (a ReLU's has
    # many; a sigmoid reaches exactly 0 only below -88). Spanning most of the range is required so that a small
    # raw output, bounded by chance in one batch, is not taken for an activation's.
    tanh_like = (low >= -1) & (high <= 1) & (low < -0.5) & (high > 0.5)
    sigmoid_like = (low >= 0) & (high <= 1) & (high - low > 0.5) & (zeros * 10 < numel)
    near_tanh = total(magnitude > TANH_SATURATED)
    near_sigmoid = total(((values < SIGMOID_SATURATED_LOW) & (values != 0)) | (values > SIGMOID_SATURATED_HIGH))
    bounded = tanh_like | sigmoid_like
    squashed = torch.where(bounded, torch.where(tanh_like, near_tanh, near_sigmoid), 0.0)
    bounded_numel = torch.where(bounded, numel, 0.0)

    # uses (a layer reading a sample), and the sample each reads: statistics above are per sample
    inputs = [i for i, layer in enumerate(tape.sample_layer) if layer is not None]
    squash = [i for i, layer in enumerate(tape.squashed_for) if layer is not None]
    saturate = [i for i, layer in enumerate(tape.saturated_for) if layer is not None]
    of = tape.sample_of
    blocks = []
    if inputs:
        at = on_device([of[i] for i in inputs], device, torch.long)
        owners = [tape.sample_layer[i] for i in inputs]
        blocks += [_per_layer(squares[at], owners, "input_sq"), _per_layer(zeros[at], owners, "input_zero")]
    if squash or saturate:
        at_squash, at_saturate = (on_device([of[i] for i in found], device, torch.long) for found in (squash, saturate))
        counts = squashed[at_squash]
        if saturate:  # activation modules' inputs beyond their limit (each its own: a sample is kept per limit)
            limits = on_device(tape.limits, device)
            beyond = total(magnitude > limits.repeat_interleave(lengths, output_size=values.numel()))
            counts = torch.cat([counts, beyond[at_saturate]])
        owners = [tape.squashed_for[i] for i in squash] + [tape.saturated_for[i] for i in saturate]
        blocks.append(_per_layer(counts, owners, "saturated"))
    if squash:
        blocks.append(_per_layer(bounded_numel[at_squash], [tape.squashed_for[i] for i in squash], "bounded_numel"))
    return blocks


def _segment_reducer(sizes: Sequence[int], lengths: torch.Tensor) -> Callable[[torch.Tensor, str], torch.Tensor]:
    """Sum, min or max over each sample of a concatenation. When every sample has the same size (the usual
    case: each holds SAMPLE_SIZE values of a larger tensor), along the rows of a matrix: on a CPU, 38 samples
    of 8192 take 9-13 us so against 150-900 us in torch.segment_reduce. Otherwise segment_reduce. Counts,
    minima and maxima are the same either way."""
    if sizes and sizes[0] > 0 and all(size == sizes[0] for size in sizes):
        shape = (len(sizes), sizes[0])

        def along_rows(x: torch.Tensor, op: str) -> torch.Tensor:
            rows = x.view(shape)
            return rows.sum(dim=1) if op == "sum" else rows.amin(dim=1) if op == "min" else rows.amax(dim=1)

        return along_rows
    return lambda x, op: torch.segment_reduce(x, op, lengths=lengths)


def _per_layer(values: torch.Tensor, owners: Sequence[int | None], name: str) -> Block:
    """Sum the values of each owner (a layer with several calls has several): one vector, one slot per layer."""
    slots: dict[int, int] = {}
    for owner in owners:
        assert owner is not None
        slots.setdefault(owner, len(slots))
    index = on_device([slots[owner] for owner in owners if owner is not None], values.device, torch.long)
    sums = torch.zeros(len(slots), dtype=values.dtype, device=values.device).index_add_(0, index, values)
    return Block(LOCAL_SUM, sums, column=name, keys=list(slots))
