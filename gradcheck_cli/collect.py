"""Collect: each step's gradients and hook tape -> typed per-step records on the host -> series over the steps.

Device work per step: a few passes per gradient (reduce.py) and one stacked copy to the host (steps.transfer).
Across steps only per-step scalars (host) and small per-row masks and histograms (device) are kept: never a
copy of a gradient. `finish` hands everything to records.py, which builds the report's records.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import torch

from gradcheck_cli.distributed import Combiner, local
from gradcheck_cli.groups import SmallGroup, plan, starved
from gradcheck_cli.layers import LayerSpec
from gradcheck_cli.records import Finished, Measured, build_records
from gradcheck_cli.reduce import (
    dense_values,
    histograms_of,
    norm_dtype,
    on_device,
    prepare_sampling,
    reduce_gradient,
    shift_histogram,
    value_histogram,
)
from gradcheck_cli.report import Layer, ParameterRecord, ValueHistogram
from gradcheck_cli.series import HISTOGRAM_BINS, StepSeries
from gradcheck_cli.steps import (
    LayerSeries,
    LayerStep,
    ParamInfo,
    ParamSeries,
    ParamStep,
    Step,
    transfer,
    unique_params,
)
from gradcheck_cli.tape import COUNTS, StepTape

# Histogram rows merged by index_put_ up to this many (Collector._merge says why).
FEW_ROWS = 1024


class Collector:
    """Turns each step's gradients and hook tape into host numbers, then into Layer/ParameterRecord."""

    def __init__(
        self,
        layers: list[LayerSpec],
        combiner: Combiner | None = None,
        amp_tiny: float | None = None,
        want_value_histograms: bool = False,
    ) -> None:
        self.layers = layers
        self.want_value_histograms = want_value_histograms
        self.combiner = combiner or Combiner()
        self.amp_tiny = amp_tiny  # smallest normal of the AMP dtype: count gradients that underflow it
        self.params = unique_params(layers)
        self.param_series = [ParamSeries() for _ in self.params]
        self.layer_series = [LayerSeries() for _ in layers]
        self.loss = StepSeries()
        self.weight_norm: list[float] = []
        self.loss_scale: float | None = None
        self.skipped_steps = 0
        self._row_weight_sq: dict[int, torch.Tensor] = {}
        # Accumulators over steps, allocated before the first step and updated in place (see prepare()).
        self._rows_ever: dict[int, torch.Tensor] = {}
        self._rows_seen: set[int] = set()  # params whose rows got a gradient in some step
        self._rows_flat = torch.zeros(0, dtype=torch.bool)
        self._row_start: dict[int, int] = {}  # where each tensor's rows begin in _rows_flat
        # per group of small tensors (their indices): (rows of the group's vector to keep, where in _rows_flat)
        self._plan: tuple[list[ParamInfo], list[SmallGroup]] = ([], [])  # groups.plan, made in prepare()
        self._histograms: torch.Tensor | None = None  # (params, bins)
        self._binned: set[int] = set()
        # layer index -> (step, limit, counts) per step, on the device until finish()
        self._value_histograms: dict[int, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
        self.steps = 0
        self.device = next((p.tensor.device for p in self.params), torch.device("cpu"))

    def prepare(self) -> None:
        """Before the first step: weight norms, and every tensor kept across steps allocated now.

        Nothing the statistics allocate during a step may outlive it. On a CPU, glibc serves a step's
        tensors from one heap; a small block that survives the step (an accumulator re-allocated each step,
        a cached sampling index) pins the spot where it landed among the freed activations, and the next
        step's large blocks no longer fit in the holes around it: the heap grows. One surviving 0-d tensor
        raised a 7M-parameter transformer's peak RSS 14% over the bare passes. So accumulators are
        allocated here, while the heap is still small, and updated in place."""
        self.measure_weights()
        trainable = [info for info in self.params if info.tensor.requires_grad]
        # one flag per row of every tensor with rows, in one vector; self._rows_ever holds views of it
        with_rows = [info for info in trainable if info.rows]
        counts = [local(info.tensor.detach()).shape[0] for info in with_rows]
        self._rows_flat = torch.zeros(sum(counts), dtype=torch.bool, device=self.device)
        start = 0
        for info, count in zip(with_rows, counts, strict=True):
            self._rows_ever[info.index] = self._rows_flat[start : start + count]
            self._row_start[info.index] = start
            start += count
        self._histograms = torch.zeros(len(self.params), HISTOGRAM_BINS, device=self.device)
        self._plan = self._plan_for(trainable, lambda info: info.tensor.detach())
        large, small = self._plan
        prepare_sampling(
            [local(info.tensor.detach()) for info in large],
            [n for group in small for n in group.layout.sizes],
            self.device,
        )

    def _plan_for(
        self, params: list[ParamInfo], tensor_of: Callable[[ParamInfo], torch.Tensor | None]
    ) -> tuple[list[ParamInfo], list[SmallGroup]]:
        counts = {index: rows.numel() for index, rows in self._rows_ever.items()}
        return plan(params, tensor_of, self._row_start, counts)

    def measure_weights(self) -> None:
        """Weight norms (and per-row norms of embeddings), once: weights do not change while measuring."""
        squares = torch.stack([_norm_sq(local(p.tensor.detach())) for p in self.params])
        self.combiner.grads(squares)
        self.weight_norm = [math.sqrt(v) for v in squares.tolist()]
        for info in self.params:
            if info.embedding:
                weight = local(info.tensor.detach())
                self._row_weight_sq[info.index] = weight.float().square().reshape(weight.shape[0], -1).sum(1)

    def collect(
        self, tape: StepTape, loss: torch.Tensor, scale: float = 1.0, retry_overflow: bool = False
    ) -> float | None:
        """Reduce one step (after backward) and copy it to the host in one transfer.

        scale: the AMP loss scale the gradients carry (they are reported divided by it). With retry_overflow
        (fp16 AMP), a step whose gradients overflowed is not recorded and None is returned, as GradScaler
        skips such steps; the caller retries it at a lower scale. Otherwise returns the loss.
        """
        reduced = self._reduce(tape, loss)
        host = transfer(reduced.step, self.combiner, self.device)
        # Only the backward can be rescued by a smaller loss scale: a non-finite loss overflowed in the forward.
        overflow = math.isfinite(host.loss) and (
            any(p.norm_sq is not None and not math.isfinite(p.norm_sq) for p in host.params.values())
            or any(not math.isfinite(v) for name, c in host.columns.items() if name.endswith(":norm_sq") for v in c)
        )
        if retry_overflow and overflow:
            self.skipped_steps += 1
            return None
        self._unscale(host, scale)
        self._merge(reduced, scale)
        if self.want_value_histograms:
            self._add_value_histograms(scale)
        self._record(host, tape, reduced.groups)
        self.loss_scale = scale if scale != 1.0 else self.loss_scale
        self.steps += 1
        return host.loss

    def _reduce(self, tape: StepTape, loss: torch.Tensor) -> _Reduced:
        """The step on the device: per-parameter reductions (small tensors together, reduce_small), per-layer
        sums of what the hooks recorded, the rows that got a gradient and the |g| histograms (binned for every
        tensor at once)."""
        reduced = _Reduced(Step(loss=loss))
        step, rows = reduced.step, reduced.rows
        to_bin: list[tuple[list[int], torch.Tensor, list[float], list[int]]] = []  # indices, values, scales, sizes
        large, small = self._plan
        gradients = [group.gradients() for group in small]
        if any(grads is None for grads in gradients):  # a tensor got no gradient this step: plan this step alone
            large, small = self._plan_for(self.params, lambda info: info.tensor.grad)
            gradients = [group.gradients() for group in small]
        for info in large:
            if info.tensor.grad is None:
                continue
            grad = local(info.tensor.grad)
            sample = reduce_gradient(grad, info.rows, self.amp_tiny, starved(info))
            record = ParamStep(sample.norm_sq, sample.zeros, sample.max_abs)
            if sample.underflow is not None:
                record.underflow = sample.underflow
                record.sampled = torch.tensor(float(sample.sampled), device=sample.underflow.device)
            if sample.touched_rows is not None:
                rows[info.index] = sample.touched_rows
                if info.embedding:
                    record.touched_weight_sq = (self._row_weight_sq[info.index] * sample.touched_rows).sum()
            if sample.histogram_sample is not None:
                n = sample.histogram_sample.numel()
                to_bin.append(([info.index], sample.histogram_sample, [sample.histogram_scale], [n]))
            step.params[info.index] = record
        for group, grads in zip(small, gradients, strict=True):
            assert grads is not None
            batch, blocks = group.reduce(grads, self.amp_tiny)
            step.blocks += blocks
            reduced.groups.append(group)
            if group.keep:
                reduced.small_rows.append((batch.touched_rows, group.keep, group.positions))
                reduced.rows_seen.update(i for i in group.indices if i in self._row_start)
            to_bin.append((group.indices, batch.values, [1.0] * len(group.infos), batch.sizes))
        if to_bin:
            reduced.binned = histograms_of(
                [v for _, v, _, _ in to_bin],
                [c for _, _, scales, _ in to_bin for c in scales],
                [n for _, _, _, sizes in to_bin for n in sizes],
            )
            reduced.binned_order = [index for indices, _, _, _ in to_bin for index in indices]
        step.blocks += tape.blocks(self.device, counts=self.combiner.active)
        return reduced

    def _unscale(self, step: Step[float], scale: float) -> None:
        """Report gradients of the global mean loss, without the AMP loss scale.

        Every rank's loss is the mean over its slice, so the global loss is their mean: its dL/dz on rank r
        is dL_r/dz_r / world, and the per-rank losses average. Weights ("touched") carry no scale.
        """
        world = self.combiner.world_size
        step.loss /= world
        for param in step.params.values():
            if param.norm_sq is not None:
                param.norm_sq /= scale * scale
            if param.max_abs is not None:
                param.max_abs /= scale
        if scale != 1.0:
            for name, values in step.columns.items():
                divisor = scale * scale if name.endswith(":norm_sq") else scale if name.endswith(":max_abs") else 1.0
                step.columns[name] = [v / divisor for v in values]
        output_sq = step.keyed.get("output_sq", {})
        for layer, value in output_sq.items():
            output_sq[layer] = value / (scale * scale) / (world * world)

    def _merge(self, reduced: _Reduced, scale: float) -> None:
        """OR the step's rows into the accumulators, add its |g| histograms (each at once where batched)."""
        shift = round(math.log2(scale)) if scale > 1 else 0
        for index, touched in reduced.rows.items():
            self._rows_ever[index] |= touched  # prepared for every trainable tensor with rows
            self._rows_seen.add(index)
        for touched, keep, positions in reduced.small_rows:
            at = on_device(positions, self._rows_flat.device, torch.long)
            self._rows_flat[at] |= touched[on_device(keep, touched.device, torch.long)]
        self._rows_seen |= reduced.rows_seen
        if self._histograms is not None and reduced.binned is not None:
            order = on_device(reduced.binned_order, self._histograms.device, torch.long)
            binned = shift_histogram(reduced.binned, shift)
            if len(reduced.binned_order) <= FEW_ROWS:
                # On a CPU, index_add_ along the rows of a float matrix takes a parallel scatter path whose
                # thread hand-off costs 0.1-60 ms on a loaded 2-core machine however few the rows (8 rows: 11 us
                # to 62 ms from one run to the next); index_put_ with accumulate adds the same in ~5 us there, but
                # sorts its indices, 8 ms against index_add_'s 0.7 ms at 20,000 rows
                self._histograms.index_put_((order,), binned, accumulate=True)
            else:
                self._histograms.index_add_(0, order, binned)
            self._binned.update(reduced.binned_order)

    def _record(self, step: Step[float], tape: StepTape, groups: list[SmallGroup]) -> None:
        """The host step into the series. Column by column, with no record object per parameter or layer: a
        model of 10,000 layers records 20,000 parameters a step, and per-item objects cost 20 ms per 1,000."""
        self.loss.add(step.loss)
        grouped: set[int] = set()
        for group in groups:  # values in columns, one list per statistic
            absent = [None] * len(group.infos)
            columns = [step.columns.get(f"{group.name}:{name}") or absent for name in _COLUMNS]
            for info, *got in zip(group.infos, *columns, strict=True):
                self._record_param(info, *got)
            grouped.update(group.indices)
        for info in self.params:
            if info.index not in grouped:
                alone = step.params.get(info.index) or ParamStep()
                self._record_param(info, *(getattr(alone, name) for name in _COLUMNS))
        keyed = step.keyed
        device = [keyed.get(name, {}) for name in _LAYER_SUMS]
        counts = [keyed.get(name, {}) if self.combiner.active else getattr(tape, name) for name in COUNTS]
        calls = tape.calls
        for spec in self.layers:
            i = spec.index
            sums = [values.get(i) for values in device]
            host = [float(values[i]) if i in values else None for values in counts]
            _record_layer(self.layer_series[i], LayerStep(*sums, *host), calls.get(i, 0))

    def _record_param(
        self,
        info: ParamInfo,
        norm_sq: float | None,
        zeros: float | None,
        max_abs: float | None,
        touched_weight_sq: float | None,
        underflow: float | None,
        sampled: float | None,
    ) -> None:
        """One parameter's step (ParamStep's fields, in _COLUMNS order) into its series."""
        series = self.param_series[info.index]
        norm = math.sqrt(norm_sq) if norm_sq is not None and norm_sq >= 0 else norm_sq
        series.norm.values.append(norm)
        series.max_abs.values.append(max_abs)
        series.zeros.values.append(zeros)
        series.touched_weight_sq.values.append(touched_weight_sq)
        series.underflow.values.append(_fraction(underflow, sampled))
        nonfinite = self._nonfinite(info) if norm is not None and not math.isfinite(norm) else 0.0
        series.nonfinite.values.append(nonfinite if norm is not None else None)

    def _nonfinite(self, info: ParamInfo) -> float:
        """Failure path only: a second sync to count the NaN/Inf entries (summed over shards)."""
        grad = info.tensor.grad
        assert grad is not None
        values, _ = dense_values(local(grad))
        count = (~torch.isfinite(values)).sum().float().reshape(1)
        self.combiner.grads(count)
        return float(count.item())

    def finish(
        self,
        ever_active: dict[int, torch.Tensor],
        order: list[int],
        feeds_norm: set[int],
        used_as: dict[int, str] | None = None,
    ) -> tuple[list[Layer], list[ParameterRecord]]:
        """Build the records; one more sync for the accumulated masks and histograms."""
        mask_keys = [k for k in self._rows_ever if k in self._rows_seen]
        hist_keys = sorted(self._binned)
        active_keys = list(ever_active)
        untouched = [(~self._rows_ever[k]).float().sum() for k in mask_keys]
        totals = [torch.tensor(float(self._rows_ever[k].numel()), device=self.device) for k in mask_keys]
        grad_counts = torch.stack([*untouched, *totals]) if mask_keys else torch.zeros(0, device=self.device)
        self.combiner.grads(grad_counts)
        histograms = self._histograms[hist_keys] if hist_keys and self._histograms is not None else None
        if histograms is not None:
            self.combiner.grads(histograms)
        # Units are the same on every rank (activations are per rank): a unit is alive if alive anywhere.
        masks = [ever_active[k].float() for k in active_keys]
        alive = torch.zeros(0, device=self.device)
        if masks:
            flat = torch.cat(masks)
            self.combiner.locals(flat, "max")
            alive = torch.stack([m.mean() for m in flat.split([m.numel() for m in masks])])
        parts = [grad_counts, alive, histograms.reshape(-1) if histograms is not None else alive[:0]]
        host = torch.cat([p.to(self.device).float() for p in parts]).tolist()  # one transfer for all of it
        counts, host = host[: grad_counts.numel()], host[grad_counts.numel() :]
        alive_host, hist_flat = host[: alive.numel()], host[alive.numel() :]
        finished = Finished(
            zero_rows={
                k: counts[i] / counts[len(mask_keys) + i] for i, k in enumerate(mask_keys) if counts[len(mask_keys) + i]
            },
            dead={k: 1.0 - alive_host[i] for i, k in enumerate(active_keys)},
            units={k: mask.numel() for k, mask in zip(active_keys, masks, strict=True)},
            rows={k: self._rows_ever[k].numel() for k in mask_keys},
            histograms={
                k: [round(v) for v in hist_flat[i * HISTOGRAM_BINS : (i + 1) * HISTOGRAM_BINS]]
                for i, k in enumerate(hist_keys)
            },
            position={layer: i for i, layer in enumerate(order)},
            feeds_norm=feeds_norm,
            used_as=used_as or {},
            value_histograms=self._finish_value_histograms(),
        )
        measured = Measured(
            self.layers, self.params, self.param_series, self.layer_series, self.weight_norm, self.steps
        )
        return build_records(measured, finished)

    def _add_value_histograms(self, scale: float) -> None:
        """This step's signed-value histogram of each layer, unscaled, kept on the device. Under FSDP each rank
        bins its own shards: the picture (plots, TensorBoard only) is rank 0's share of the parameters."""
        for spec in self.layers:
            grads = [local(p.grad) for _, p in spec.params if p.requires_grad and p.grad is not None]
            if grads:
                limit, counts = value_histogram(grads)
                self._value_histograms.setdefault(spec.index, []).append((self.steps, limit / scale, counts))

    def _finish_value_histograms(self) -> dict[int, tuple[ValueHistogram, ...]]:
        """Every layer's per-step value histograms, copied to the host in one transfer."""
        entries = [
            (index, step, limit, counts)
            for index, rows in self._value_histograms.items()
            for step, limit, counts in rows
        ]
        if not entries:
            return {}
        rows = torch.stack([torch.cat([limit.float().reshape(1), counts]) for _, _, limit, counts in entries]).tolist()
        found: dict[int, list[ValueHistogram]] = {}
        for (index, step, _, _), row in zip(entries, rows, strict=True):
            found.setdefault(index, []).append(ValueHistogram(step, row[0], tuple(round(c) for c in row[1:])))
        return {index: tuple(histograms) for index, histograms in found.items()}

    def grads_finite(self, step: int) -> bool:
        """Whether every parameter's gradient norm was finite in this (recorded) step."""
        for series in self.param_series:
            norm = series.norm.values[step] if step < len(series.norm.values) else None
            if norm is not None and not math.isfinite(norm):
                return False
        return True


# the per-layer sums the tape gives as keyed columns (StepTape.blocks)
_LAYER_SUMS = ("output_sq", "output_underflow", "input_sq", "input_zero", "saturated", "bounded_numel")
# the column blocks of a small group (groups.SmallGroup.reduce), in ParamStep's field order
_COLUMNS = ("norm_sq", "zeros", "max_abs", "touched_weight_sq", "underflow", "sampled")
# Collector._record builds both records by position
assert tuple(f.name for f in fields(ParamStep)) == _COLUMNS
assert tuple(f.name for f in fields(LayerStep)) == (*_LAYER_SUMS, *COUNTS)


@dataclass
class _Reduced:
    """One step on the device, before its transfer: the records, and what the accumulators take from it."""

    step: Step[torch.Tensor]
    rows: dict[int, torch.Tensor] = field(default_factory=dict)  # rows that got a gradient, per large tensor
    # small groups': (bool per row of the group, which of those to keep, their places in Collector._rows_flat)
    small_rows: list[tuple[torch.Tensor, list[int], list[int]]] = field(default_factory=list)
    rows_seen: set[int] = field(default_factory=set)
    groups: list[SmallGroup] = field(default_factory=list)  # the small groups reduced, their values in columns
    binned: torch.Tensor | None = None  # |g| histograms, one row per tensor in binned_order
    binned_order: list[int] = field(default_factory=list)


def _record_layer(series: LayerSeries, got: LayerStep[float], calls: int) -> None:
    series.calls.add(float(calls))
    series.output_sq.add(got.output_sq)
    positions = got.output_positions
    output_sq = got.output_sq
    series.output_per_position.add(math.sqrt(output_sq / positions) if output_sq is not None and positions else None)
    series.output_positions.add(positions)
    series.output_underflow.add(_fraction(got.output_underflow, got.output_sampled))
    numel = got.input_numel
    if numel and got.input_sq is not None:
        series.input_rms.add(math.sqrt(got.input_sq / numel))
        series.input_zero.add((got.input_zero or 0.0) / numel)
    else:
        series.input_rms.add(None)
        series.input_zero.add(None)
    seen = (got.saturated_numel or 0.0) + (got.bounded_numel or 0.0)
    series.saturated.add(_fraction(got.saturated, seen))


def _fraction(count: float | None, total: float | None) -> float | None:
    return count / total if count is not None and total else None


def _norm_sq(tensor: torch.Tensor) -> torch.Tensor:
    norm: torch.Tensor = torch.linalg.vector_norm(tensor, dtype=norm_dtype(tensor))
    return norm.square().float()
