"""What the hooks recorded in one step (`StepTape`), and its reduction to per-layer device vectors.

Hooks do as little as they can while the model runs: a forward hook keeps a small sample of the layer's input
(a copy, since the model may change its tensors in place afterwards), an activation hook a sample of the
activation's input, an output-gradient hook the norm of dL/dz. After backward, `StepTape.blocks` reduces all of
it at once: the samples concatenated, then segment sums and extrema over them, then sums per layer. About
thirty operations per step however many layers the model has, where statistics computed inside each hook cost
thirty per layer, and a hook's operations on a few thousand values cost more in dispatch than in arithmetic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from gradcheck_cli.distributed import LOCAL_SUM
from gradcheck_cli.layers import SIGMOID_SATURATED_HIGH, SIGMOID_SATURATED_LOW, TANH_SATURATED
from gradcheck_cli.reduce import on_device, sample
from gradcheck_cli.steps import Block

NO_LIMIT = float("inf")


@dataclass
class Sampled:
    """One sample a hook kept: whose input it was, and what else it is evidence for."""

    values: torch.Tensor  # float32, 1-D, a copy
    layer: int | None  # the layer whose input this is (its RMS and zero fraction); None for activation inputs
    squashed_for: int | None = None  # the layer before, whose output may have been squashed by a tanh/sigmoid
    saturated_for: int | None = None  # the layer an activation module's saturation is counted for
    limit: float = NO_LIMIT  # that activation's saturation limit


@dataclass
class StepTape:
    """What the hooks recorded during one step, appended as hooks fire."""

    calls: dict[int, int] = field(default_factory=dict)
    order: list[int] = field(default_factory=list)
    samples: list[Sampled] = field(default_factory=list)
    output_norms: list[torch.Tensor] = field(default_factory=list)  # ||dL/dz|| per call, 0-d
    output_layers: list[int] = field(default_factory=list)
    output_positions: dict[int, int] = field(default_factory=dict)
    output_underflow: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    output_sampled: dict[int, int] = field(default_factory=dict)
    input_numel: dict[int, int] = field(default_factory=dict)
    saturated_numel: dict[int, int] = field(default_factory=dict)

    def keep(self, values: torch.Tensor, **owners: int | float | None) -> None:
        """Keep a sample of `values` (reduce.sample, copied when it would alias them) for the step's end."""
        kept = sample(values.detach())
        if kept._is_view() or kept.dtype != torch.float32:
            kept = kept.to(torch.float32, copy=True)
        self.samples.append(Sampled(kept, **owners))  # type: ignore[arg-type]

    def release(self) -> None:
        """Drop the device tensors once they are read (the host counts and the call order stay): nothing
        allocated during a step may outlive it (Collector.prepare says why)."""
        self.samples.clear()
        self.output_norms.clear()
        self.output_layers.clear()
        self.output_underflow.clear()

    def blocks(self, device: torch.device) -> list[Block]:
        """The step's per-layer sums as device vectors: output_sq, input_sq, input_zero, saturated, bounded_numel."""
        blocks: list[Block] = []
        if self.output_norms:
            norms = self.output_norms
            same = all(n.dtype == norms[0].dtype for n in norms)
            stacked = torch.stack(norms) if same else torch.stack([n.double() for n in norms])
            squares = stacked.double().square()  # 1e20 squared: float64
            blocks.append(_per_layer(squares, self.output_layers, "output_sq"))
        if self.samples:
            blocks += _sample_blocks(self.samples, device)
        return blocks


def _sample_blocks(samples: list[Sampled], device: torch.device) -> list[Block]:
    """Every sample's statistics at once: sum of squares, exact zeros, extrema, counts beyond the saturation
    limits; then what they mean per layer (probe.py's rules for squashed inputs, written out as vectors)."""
    sizes = [s.values.numel() for s in samples]
    values = torch.cat([s.values for s in samples])
    lengths = on_device(sizes, device)
    numel = lengths.double()

    def total(mask_or_values: torch.Tensor) -> torch.Tensor:
        return torch.segment_reduce(mask_or_values.double(), "sum", lengths=lengths)

    magnitude = values.abs()
    squares, zeros = total(values.double().square()), total(values == 0)
    low = torch.segment_reduce(values, "min", lengths=lengths)
    high = torch.segment_reduce(values, "max", lengths=lengths)
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

    inputs = [i for i, s in enumerate(samples) if s.layer is not None]
    squash = [i for i, s in enumerate(samples) if s.squashed_for is not None]
    saturate = [i for i, s in enumerate(samples) if s.saturated_for is not None]
    blocks = []
    if inputs:
        at = on_device(inputs, device, torch.long)
        owners = [samples[i].layer for i in inputs]
        blocks += [_per_layer(squares[at], owners, "input_sq"), _per_layer(zeros[at], owners, "input_zero")]
    if squash or saturate:
        at_squash, at_saturate = (on_device(found, device, torch.long) for found in (squash, saturate))
        counts = squashed[at_squash]
        if saturate:  # activation modules' inputs beyond their limit (each its own)
            limits = on_device([s.limit for s in samples], device)
            beyond = total(magnitude > limits.repeat_interleave(lengths, output_size=values.numel()))
            counts = torch.cat([counts, beyond[at_saturate]])
        owners = [samples[i].squashed_for for i in squash] + [samples[i].saturated_for for i in saturate]
        blocks.append(_per_layer(counts, owners, "saturated"))
    if squash:
        blocks.append(_per_layer(bounded_numel[at_squash], [samples[i].squashed_for for i in squash], "bounded_numel"))
    return blocks


def _per_layer(values: torch.Tensor, owners: Sequence[int | None], name: str) -> Block:
    """Sum the values of each owner (a layer with several calls has several): one vector, one slot per layer."""
    slots: dict[int, int] = {}
    for owner in owners:
        assert owner is not None
        slots.setdefault(owner, len(slots))
    index = on_device([slots[owner] for owner in owners if owner is not None], values.device, torch.long)
    sums = torch.zeros(len(slots), dtype=values.dtype, device=values.device).index_add_(0, index, values)
    return Block(LOCAL_SUM, sums, [("layers", layer, name) for layer in slots])
