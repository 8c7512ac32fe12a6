"""Statistics: gradients -> numbers, on the device, then over steps on the host.

Two halves:
- `GradientReducer` turns one step's parameter gradients into a few device tensors with a handful of fused
  operations per tensor and no host synchronisation; `Sampler` gathers every scalar of a step into one
  tensor and copies it to the host once (the step's single sync point).
- `StepSeries` keeps the per-step floats on the host and summarises them (mean, median, spread).
Nothing here prints or hooks; the probe calls in, the diagnosis reads out.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from gradcheck_cli.report import Layer, ParameterRecord, ValueHistogram

if TYPE_CHECKING:
    from gradcheck_cli.probe import LayerSpec, StepTape

# |g| histogram in powers of two: bin k counts 2^(LOW+k) <= |g| < 2^(LOW+k+1), read straight from the
# float32 exponent bits (a shift and a bincount: 7x cheaper than log10 + histc). Fixed bins, so steps and
# layers add up and no range has to be found first (finding one would cost a host sync). 2^-40 (9e-13) ..
# 2^14 (16384) covers the gradients that matter; values outside are counted in the end bins; exact zeros are
# counted separately (zero_fraction) and NaN/Inf not at all (nonfinite).
HISTOGRAM_LOW = -40
HISTOGRAM_HIGH = 14
HISTOGRAM_BINS = HISTOGRAM_HIGH - HISTOGRAM_LOW
_FLOAT32_BIAS = 127


def histogram_edges() -> list[float]:
    """Bin edges of every histogram in a report, as log10 |g| (bin k spans [2^(LOW+k), 2^(LOW+k+1)))."""
    return [(HISTOGRAM_LOW + i) * math.log10(2.0) for i in range(HISTOGRAM_BINS + 1)]


@dataclass
class GradientSample:
    """Device tensors for one parameter's gradient in one step (0-d unless noted)."""

    norm_sq: torch.Tensor  # squared L2 norm: squares add up across shards and calls
    max_abs: torch.Tensor
    zeros: torch.Tensor
    touched_rows: torch.Tensor | None  # bool per row (dim 0): any nonzero gradient in that row
    histogram_sample: torch.Tensor | None  # values to bin (stats.sample), when a histogram is wanted
    histogram_scale: float = 1.0  # elements per sampled value: the sample's counts stand for all elements
    underflow: torch.Tensor | None = None  # sampled nonzero values below the AMP dtype's smallest normal
    sampled: int = 0  # how many values that count is over


def dense_values(grad: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The stored values of a gradient and how many of its entries are implicit zeros (sparse grads)."""
    if grad.is_sparse:
        grad = grad.coalesce()
        values = grad.values()
        return values, grad.numel() - values.numel()
    return grad, 0


# Histograms and saturation are estimated from a sample of at most this many values per tensor and step:
# constant work however large the tensor (a full log10 histogram of a 16M-element gradient costs more than the
# matmul that produced it). The sample is made of runs of SAMPLE_RUN consecutive values, the runs drawn at
# random (a fixed seed per tensor size, so every step samples the same places): copying runs is cache-friendly,
# where a strided gather of single values touches a cache line per value (0.65 ms per tensor on a CPU, more
# than the statistics themselves), and random runs cannot alias with the tensor's rows the way evenly spaced
# ones do (spaced ~2 images apart, runs over MNIST batches all began near the top rows of an image).
SAMPLE_SIZE = 65536
SAMPLE_RUN = 128


def sample(values: torch.Tensor, size: int = SAMPLE_SIZE) -> torch.Tensor:
    """At most `size` values of a tensor, as a small contiguous 1-D copy (all of it when it is small), never
    copying more than `size` values: a non-contiguous tensor is sampled from its leading rows.

    The copy matters: torch.count_nonzero on a strided view of 56k values takes 8 ms on a CPU, on the same
    values contiguous 0.03 ms."""
    if values.numel() <= size:
        return values.reshape(-1)
    if not values.is_contiguous():
        rows = max(1, size // max(1, values[0].numel())) if values.dim() > 1 else size
        values = values[:rows]
        if values.numel() <= size:
            return values.reshape(-1)
        values = values.contiguous()
    flat = values.view(-1)
    return flat.index_select(0, _sample_index(flat.numel(), size, flat.device))


@functools.cache  # a few tensor sizes per model, each sampled every step
def _sample_index(numel: int, size: int, device: torch.device) -> torch.Tensor:
    """Positions of size // SAMPLE_RUN runs of SAMPLE_RUN values, chosen uniformly among the aligned runs."""
    generator = torch.Generator().manual_seed(numel)
    runs = torch.randperm(numel // SAMPLE_RUN, generator=generator)[: size // SAMPLE_RUN].sort().values
    return (runs[:, None] * SAMPLE_RUN + torch.arange(SAMPLE_RUN)).reshape(-1).to(device)


def reduce_gradient(
    grad: torch.Tensor, want_rows: bool, want_histogram: bool, tiny: float | None = None
) -> GradientSample:
    """Three passes over a dense gradient, no host sync, no gradient-sized temporaries:
    row norms (which give the norm and the rows that got any gradient), min/max, and a count of nonzeros.

    Norms are accumulated in float32 (half-precision sums of squares overflow at 65504).
    """
    if grad.is_sparse:
        return _reduce_sparse(grad, want_rows, want_histogram)
    flat = grad.reshape(-1)
    rows = None
    if want_rows and grad.dim() >= 2:
        row_norms = torch.linalg.vector_norm(grad.reshape(grad.shape[0], -1), dim=1, dtype=torch.float32)
        norm_sq = row_norms.square().sum()
        rows = row_norms != 0
    else:
        norm_sq = torch.linalg.vector_norm(flat, dtype=torch.float32).square()
    zeros = (flat.numel() - torch.count_nonzero(flat)).float()
    result = GradientSample(norm_sq, _max_abs(flat), zeros, rows, *_for_histogram(flat, want_histogram))
    if tiny is not None:
        values = sample(flat)
        result.underflow = count_subnormal(values, tiny)
        result.sampled = values.numel()
    return result


def count_subnormal(values: torch.Tensor, tiny: float) -> torch.Tensor:
    """Nonzero values below `tiny` (a dtype's smallest normal): they are, or would be, subnormal or flushed
    to zero in that dtype. Exact zeros are not counted: ReLU and sparse inputs make them by design."""
    magnitude = values.abs()
    return (torch.count_nonzero(magnitude < tiny) - (values.numel() - torch.count_nonzero(values))).float()


def _max_abs(flat: torch.Tensor) -> torch.Tensor:
    if not flat.numel():
        return torch.zeros((), device=flat.device)
    low, high = torch.aminmax(flat)
    return torch.maximum(high.abs(), low.abs()).float()


def _for_histogram(flat: torch.Tensor, wanted: bool) -> tuple[torch.Tensor | None, float]:
    if not wanted or not flat.numel():
        return None, 1.0
    values = sample(flat.detach())
    return values, flat.numel() / values.numel()


def histograms_of(samples: Sequence[torch.Tensor], scales: Sequence[float]) -> torch.Tensor:
    """Counts of floor(log2 |g|) in the fixed bins, one row per sample, each scaled to the elements its sample
    stands for: every tensor at once (one concatenation, one bincount), since per-tensor calls cost more
    in dispatch than in arithmetic for the many small tensors of a CNN. Exact zeros are not counted
    (zero_fraction has them); values below the range count in the first bin, above it in the last."""
    device = samples[0].device
    values = torch.cat([s.reshape(-1).to(torch.float32) for s in samples])
    width = _EXPONENT_BINS
    exponent = (values.view(torch.int32) >> 23) & 0xFF  # 0: zero or subnormal, 255: inf or nan
    exponent = torch.where(values == 0, width - 1, exponent)
    offsets = _bin_offsets(tuple(s.numel() for s in samples), device)
    counts = torch.bincount(offsets + exponent, minlength=width * len(samples)).reshape(len(samples), width)
    low, high = _FLOAT32_BIAS + HISTOGRAM_LOW, _FLOAT32_BIAS + HISTOGRAM_HIGH
    result = counts[:, low:high].float()
    result[:, 0] += counts[:, :low].sum(dim=1)  # tiny values and subnormals
    result[:, -1] += counts[:, high:255].sum(dim=1)
    return result * torch.tensor(scales, device=device).unsqueeze(1)


_EXPONENT_BINS = 257  # 256 float32 exponents, and one more bin for exact zeros


@functools.lru_cache(maxsize=8)  # the same tensors are sampled every step: one entry per model, in practice
def _bin_offsets(sizes: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """For concatenated samples of these sizes, where each value's row of bins starts (sample i: i * width)."""
    owner = torch.arange(len(sizes), device=device).repeat_interleave(
        torch.tensor(sizes, device=device), output_size=sum(sizes)
    )
    return owner * _EXPONENT_BINS


def _reduce_sparse(grad: torch.Tensor, want_rows: bool, want_histogram: bool) -> GradientSample:
    """Sparse gradients (nn.Embedding(sparse=True)): only the stored values exist; the rest are zeros."""
    coalesced = grad.coalesce()
    values = coalesced.values()
    flat = values.reshape(-1)
    norm_sq = torch.linalg.vector_norm(flat, dtype=torch.float32).square()
    zeros = (grad.numel() - torch.count_nonzero(flat)).float()
    rows = None
    if want_rows:
        rows = torch.zeros(grad.shape[0], dtype=torch.bool, device=grad.device)
        touched = values.reshape(values.shape[0], -1).ne(0).any(dim=1)
        rows[coalesced.indices()[0][touched]] = True
    return GradientSample(norm_sq, _max_abs(flat), zeros, rows, *_for_histogram(flat, want_histogram))


def shift_histogram(histogram: torch.Tensor, bins: int) -> torch.Tensor:
    """Move counts `bins` power-of-two bins down (dividing the values by 2^bins), piling what falls off the
    bottom into bin 0: how gradients measured at an AMP loss scale 2^k are reported unscaled."""
    if bins <= 0:
        return histogram
    shifted = torch.zeros_like(histogram)
    bins = min(bins, histogram.numel())
    shifted[: histogram.numel() - bins] = histogram[bins:]
    shifted[0] += histogram[:bins].sum()
    return shifted


# Signed-value histograms: the tutorial's picture (TensorBoard's histograms of gradient values). VALUE_BINS
# equal bins over [-limit, limit], limit = the largest |g| in the layer's samples that step: a range per layer
# and step, found on the device (values are divided by it and binned in [-1, 1]), so no host sync. Odd, so
# that 0 sits in the middle of the centre bin. Off by default: only --plot and --tensorboard ask for it.
VALUE_BINS = 65


def value_histogram(grads: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(limit, counts) of one layer's gradients in one step, no host sync: counts of g in VALUE_BINS equal bins
    over [-limit, limit], estimated from a sample of each tensor (`sample`) and scaled to all its elements."""
    parts = []
    for grad in grads:
        values, implicit_zeros = dense_values(grad.detach())
        flat = values.reshape(-1)
        if flat.numel():
            parts.append((sample(flat).float(), flat.numel(), implicit_zeros))
    device = grads[0].device if grads else torch.device("cpu")
    counts = torch.zeros(VALUE_BINS, device=device)
    if not parts:
        return torch.zeros((), device=device), counts
    limit = torch.stack([part.abs().amax() for part, _, _ in parts]).amax()
    scale = torch.where(limit > 0, limit, torch.ones_like(limit))  # an all-zero gradient: every count at 0
    for part, stored, implicit_zeros in parts:
        counts += torch.histc(part / scale, bins=VALUE_BINS, min=-1.0, max=1.0) * (stored / part.numel())
        if implicit_zeros:  # sparse gradients: the entries not stored are zeros
            counts[VALUE_BINS // 2] += implicit_zeros
    return limit, counts


def to_host(tensors: Sequence[torch.Tensor]) -> list[float]:
    """Copy many 0-d device tensors to Python floats with one transfer: the step's single sync point."""
    if not tensors:
        return []
    return torch.stack([t.detach().float().reshape(()) for t in tensors]).tolist()


@dataclass
class StepSeries:
    """Per-step host values of one quantity; None marks a step where it did not exist."""

    values: list[float | None] = field(default_factory=list)

    def add(self, value: float | None) -> None:
        self.values.append(value)

    def present(self) -> list[float]:
        return [v for v in self.values if v is not None]

    def mean(self) -> float | None:
        got = self.present()
        return sum(got) / len(got) if got else None

    def median(self) -> float | None:
        got = sorted(self.present(), key=_nan_last)
        if not got:
            return None
        mid = len(got) // 2
        return got[mid] if len(got) % 2 else 0.5 * (got[mid - 1] + got[mid])

    def spread(self) -> float | None:
        """max / min over the steps (1.0 when every batch agrees); None without two positive values."""
        got = [v for v in self.present() if math.isfinite(v) and v > 0]
        return max(got) / min(got) if len(got) >= 2 else None

    def max(self) -> float | None:
        got = self.present()
        return max(got) if got else None

    def as_tuple(self) -> tuple[float | None, ...]:
        return tuple(self.values)


def _nan_last(value: float) -> float:
    return math.inf if math.isnan(value) else value


def safe_ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, None when either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def theil_sen_slope(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Median of pairwise slopes: a line fit that ignores up to ~29% outlying points.

    Used for the per-layer gain of dL/dz, so that an output head or an embedding at either end of the chain
    (which legitimately differ from hidden layers) cannot fake a trend.
    """
    slopes = []
    for i in range(len(xs)):
        for j in range(i + 1, len(xs)):
            if xs[j] != xs[i]:
                slopes.append((ys[j] - ys[i]) / (xs[j] - xs[i]))
    if not slopes:
        return None
    slopes.sort()
    mid = len(slopes) // 2
    return slopes[mid] if len(slopes) % 2 else 0.5 * (slopes[mid - 1] + slopes[mid])


# -- one analysis: per-step collection and the final records ----------------------------------------------


@dataclass
class ParamInfo:
    """A unique tensor of the model and what the statistics need to know about it."""

    index: int
    name: str
    tensor: torch.Tensor
    layers: tuple[int, ...]  # indices of the layers owning it
    rows: bool  # track which rows (dim 0) ever get a gradient
    embedding: bool  # owned by an Embedding: compare gradients with the rows looked up only


@dataclass
class ParamSeries:
    norm: StepSeries = field(default_factory=StepSeries)
    max_abs: StepSeries = field(default_factory=StepSeries)
    zeros: StepSeries = field(default_factory=StepSeries)
    nonfinite: StepSeries = field(default_factory=StepSeries)
    touched_weight_sq: StepSeries = field(default_factory=StepSeries)
    underflow: StepSeries = field(default_factory=StepSeries)


@dataclass
class LayerSeries:
    output_sq: StepSeries = field(default_factory=StepSeries)
    output_per_position: StepSeries = field(default_factory=StepSeries)
    output_underflow: StepSeries = field(default_factory=StepSeries)
    calls: StepSeries = field(default_factory=StepSeries)
    input_rms: StepSeries = field(default_factory=StepSeries)
    input_zero: StepSeries = field(default_factory=StepSeries)
    saturated: StepSeries = field(default_factory=StepSeries)


class Combiner:
    """How one process's per-step numbers combine with the other processes' (nothing to do in one process).

    grad_sum: gradient sums (squared norms, zero counts, histograms): summed across ranks only when parameters
    are sharded (FSDP), since under DDP every rank already holds the whole averaged gradient.
    grad_max: maxima of gradients: max across ranks when sharded.
    local_sum: per-rank sums (loss, dL/dz, inputs, activation counts): always summed across ranks.
    """

    def __init__(self, world_size: int = 1, sharded: bool = False) -> None:
        self.world_size = world_size
        self.sharded = sharded

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def __call__(self, grad_sum: torch.Tensor, grad_max: torch.Tensor, local_sum: torch.Tensor) -> None:
        if not self.active:
            return
        from gradcheck_cli.distributed import all_reduce

        if self.sharded:
            all_reduce(grad_sum, "sum")
            all_reduce(grad_max, "max")
        all_reduce(local_sum, "sum")

    def grads(self, values: torch.Tensor, op: str = "sum") -> None:
        """Combine gradient-derived numbers outside a step (finish, weight norms)."""
        if self.active and self.sharded:
            from gradcheck_cli.distributed import all_reduce

            all_reduce(values, op)

    def locals(self, values: torch.Tensor, op: str = "sum") -> None:
        if self.active:
            from gradcheck_cli.distributed import all_reduce

            all_reduce(values, op)


class _Slots:
    """Named 0-d device tensors of one kind, gathered for one stacked transfer."""

    def __init__(self) -> None:
        self.keys: list[tuple[str, int]] = []
        self.values: list[torch.Tensor] = []

    def add(self, key: tuple[str, int], value: torch.Tensor) -> None:
        self.keys.append(key)
        self.values.append(value.detach().float().reshape(()))

    def stack(self, device: torch.device) -> torch.Tensor:
        return torch.stack(self.values) if self.values else torch.zeros(0, device=device)


class Collector:
    """Turns each step's gradients and hook tape into host numbers, then into Layer/ParameterRecord.

    Device work per step: three passes per gradient (reduce_gradient) and one stacked copy to the host.
    Across steps only per-step scalars (host) and small per-row masks and histograms (device) are kept: never
    a copy of a gradient.
    """

    def __init__(
        self,
        layers: list[LayerSpec],
        want_histograms: bool = True,
        combiner: Combiner | None = None,
        amp_tiny: float | None = None,
        want_value_histograms: bool = False,
    ) -> None:
        self.layers = layers
        self.want_histograms = want_histograms
        self.want_value_histograms = want_value_histograms
        self.combiner = combiner or Combiner()
        self.amp_tiny = amp_tiny  # smallest normal of the AMP dtype: count gradients that underflow it
        owners: dict[int, list[int]] = {}
        tensors: dict[int, tuple[str, torch.Tensor]] = {}  # id -> (qualified name, tensor)
        for spec in layers:
            for name, param in spec.params:
                tensor: torch.Tensor = param
                owners.setdefault(id(tensor), []).append(spec.index)
                tensors.setdefault(id(tensor), (name, tensor))
        self.params: list[ParamInfo] = []
        for key, (name, tensor) in tensors.items():
            owning = tuple(owners[key])
            embedding = any(layers[i].category == "embedding" for i in owning)
            rows = tensor.dim() >= 2 and any(_has_units(layers[i]) for i in owning)
            self.params.append(ParamInfo(len(self.params), name, tensor, owning, rows or embedding, embedding))
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
        from gradcheck_cli.distributed import local

        self.measure_weights()
        sampled: list[int] = []  # how many values each gradient's sample holds, in collect()'s order
        for info in self.params:
            if not info.tensor.requires_grad:
                continue
            weight = local(info.tensor.detach())
            if info.rows:
                self._rows_ever[info.index] = torch.zeros(weight.shape[0], dtype=torch.bool, device=weight.device)
            numel = weight.numel()
            if numel > SAMPLE_SIZE:
                sampled.append(_sample_index(numel, SAMPLE_SIZE, weight.device).numel())
            elif numel:
                sampled.append(numel)
        if self.want_histograms:
            self._histograms = torch.zeros(len(self.params), HISTOGRAM_BINS, device=self.device)
            if sampled:
                _bin_offsets(tuple(sampled), self.device)

    def measure_weights(self) -> None:
        """Weight norms (and per-row norms of embeddings), once: weights do not change while measuring."""
        from gradcheck_cli.distributed import local

        squares = torch.stack(
            [torch.linalg.vector_norm(local(p.tensor.detach()), dtype=torch.float32).square() for p in self.params]
        )
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
        from gradcheck_cli.distributed import local

        grad_sum, grad_max, local_sum = _Slots(), _Slots(), _Slots()
        local_sum.add(("loss", 0), loss)
        rows: dict[int, torch.Tensor] = {}
        histograms: dict[int, torch.Tensor] = {}
        to_bin: list[tuple[int, torch.Tensor, float]] = []
        for info in self.params:
            grad = info.tensor.grad
            if grad is None:
                continue
            sample = reduce_gradient(local(grad), info.rows, self.want_histograms, self.amp_tiny)
            grad_sum.add(("norm_sq", info.index), sample.norm_sq)
            grad_sum.add(("zeros", info.index), sample.zeros)
            grad_max.add(("max_abs", info.index), sample.max_abs)
            if sample.underflow is not None:
                grad_sum.add(("underflow", info.index), sample.underflow)
                grad_sum.add(
                    ("sampled", info.index), torch.tensor(float(sample.sampled), device=sample.underflow.device)
                )
            if sample.touched_rows is not None:
                rows[info.index] = sample.touched_rows
                if info.embedding:
                    grad_sum.add(("touched", info.index), (self._row_weight_sq[info.index] * sample.touched_rows).sum())
            if sample.histogram_sample is not None:
                to_bin.append((info.index, sample.histogram_sample, sample.histogram_scale))
        if to_bin:
            binned = histograms_of([v for _, v, _ in to_bin], [c for _, _, c in to_bin])
            histograms = {index: row for (index, _, _), row in zip(to_bin, binned.unbind(0), strict=True)}
        for index, values in tape.output_sq.items():
            local_sum.add(("output_sq", index), torch.stack(values).sum())
        for index, values in tape.output_underflow.items():
            local_sum.add(("output_underflow", index), torch.stack([v.float() for v in values]).sum())
        for index, values in tape.input_sq.items():
            local_sum.add(("input_sq", index), torch.stack(values).sum())
            local_sum.add(("input_zero", index), torch.stack([v.float() for v in tape.input_zero[index]]).sum())
        for index, values in tape.saturated.items():
            local_sum.add(("saturated", index), torch.stack([v.float() for v in values]).sum())
        counts = _host_counts(tape)
        if self.combiner.active:  # counts kept on the host differ per rank too: sum them with the rest
            for key, value in counts.items():
                local_sum.add(key, torch.tensor(value, device=self.device))
        vectors = [grad_sum.stack(self.device), grad_max.stack(self.device), local_sum.stack(self.device)]
        self.combiner(*vectors)
        host = torch.cat(vectors).tolist()  # the step's one host synchronisation
        got: dict[tuple[str, int], float] = dict(zip(grad_sum.keys + grad_max.keys + local_sum.keys, host, strict=True))
        if not self.combiner.active:
            got.update(counts)
        # Only the backward can be rescued by a smaller loss scale: a non-finite loss overflowed in the forward.
        overflow = math.isfinite(got[("loss", 0)]) and any(
            not math.isfinite(v) for k, v in got.items() if k[0] == "norm_sq"
        )
        if retry_overflow and overflow:
            self.skipped_steps += 1
            return None
        self._unscale(got, scale)
        self._merge(rows, histograms, scale)
        if self.want_value_histograms:
            self._add_value_histograms(scale)
        self._record(got, tape)
        self.loss_scale = scale if scale != 1.0 else self.loss_scale
        self.steps += 1
        return got[("loss", 0)]

    def _unscale(self, got: dict[tuple[str, int], float], scale: float) -> None:
        """Report gradients of the global mean loss, without the AMP loss scale.

        Every rank's loss is the mean over its slice, so the global loss is their mean: its dL/dz on rank r
        is dL_r/dz_r / world, and the per-rank losses average.
        """
        world = self.combiner.world_size
        got[("loss", 0)] /= world
        for key in list(got):
            kind = key[0]
            if kind in ("norm_sq", "output_sq"):  # gradients carry the loss scale; weights ("touched") do not
                got[key] /= scale * scale
            if kind == "output_sq":
                got[key] /= world * world
            elif kind == "max_abs":
                got[key] /= scale

    def _merge(self, rows: dict[int, torch.Tensor], histograms: dict[int, torch.Tensor], scale: float) -> None:
        shift = round(math.log2(scale)) if scale > 1 else 0
        for index, touched in rows.items():
            self._rows_ever[index] |= touched  # prepared for every trainable tensor with rows
            self._rows_seen.add(index)
        if self._histograms is not None:
            for index, histogram in histograms.items():
                self._histograms[index] += shift_histogram(histogram, shift)
                self._binned.add(index)

    def _record(self, got: dict[tuple[str, int], float], tape: StepTape) -> None:
        self.loss.add(got[("loss", 0)])
        for info in self.params:
            series = self.param_series[info.index]
            norm_sq = got.get(("norm_sq", info.index))
            norm = math.sqrt(norm_sq) if norm_sq is not None and norm_sq >= 0 else norm_sq
            series.norm.add(norm)
            series.max_abs.add(got.get(("max_abs", info.index)))
            series.zeros.add(got.get(("zeros", info.index)))
            series.touched_weight_sq.add(got.get(("touched", info.index)))
            sampled = got.get(("sampled", info.index))
            underflow = got.get(("underflow", info.index))
            series.underflow.add(underflow / sampled if underflow is not None and sampled else None)
            series.nonfinite.add(
                self._nonfinite(info)
                if norm is not None and not math.isfinite(norm)
                else (0.0 if norm is not None else None)
            )
        for spec in self.layers:
            series_l = self.layer_series[spec.index]
            series_l.calls.add(float(tape.calls.get(spec.index, 0)))
            output_sq = got.get(("output_sq", spec.index))
            series_l.output_sq.add(output_sq)
            positions = got.get(("output_positions", spec.index))
            series_l.output_per_position.add(
                math.sqrt(output_sq / positions) if output_sq is not None and positions else None
            )
            underflow = got.get(("output_underflow", spec.index))
            sampled = got.get(("output_sampled", spec.index))
            series_l.output_underflow.add(underflow / sampled if underflow is not None and sampled else None)
            numel = got.get(("input_numel", spec.index))
            input_sq = got.get(("input_sq", spec.index))
            if numel and input_sq is not None:
                series_l.input_rms.add(math.sqrt(input_sq / numel))
                series_l.input_zero.add(got[("input_zero", spec.index)] / numel)
            else:
                series_l.input_rms.add(None)
                series_l.input_zero.add(None)
            saturated_numel = got.get(("saturated_numel", spec.index))
            saturated = got.get(("saturated", spec.index))
            series_l.saturated.add(saturated / saturated_numel if saturated_numel and saturated is not None else None)

    def _nonfinite(self, info: ParamInfo) -> float:
        """Failure path only: a second sync to count the NaN/Inf entries (summed over shards)."""
        from gradcheck_cli.distributed import local

        grad = info.tensor.grad
        assert grad is not None
        values, _ = dense_values(local(grad))
        count = (~torch.isfinite(values)).sum().float().reshape(1)
        self.combiner.grads(count)
        return float(count.item())

    def finish(
        self, ever_active: dict[int, torch.Tensor], order: list[int], feeds_norm: set[int] | None = None
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
        zero_rows = {
            k: counts[i] / counts[len(mask_keys) + i] for i, k in enumerate(mask_keys) if counts[len(mask_keys) + i]
        }
        dead = {k: 1.0 - alive_host[i] for i, k in enumerate(active_keys)}
        histogram = {
            k: [round(v) for v in hist_flat[i * HISTOGRAM_BINS : (i + 1) * HISTOGRAM_BINS]]
            for i, k in enumerate(hist_keys)
        }
        value_histograms = self._finish_value_histograms()
        position = {layer: i for i, layer in enumerate(order)}
        params = [self._param_record(info) for info in self.params]
        normalised = feeds_norm or set()
        layers = [
            dataclasses.replace(
                self._layer_record(spec, params, zero_rows, dead, histogram, position),
                feeds_norm=spec.index in normalised,
                value_histograms=value_histograms.get(spec.index),
            )
            for spec in self.layers
        ]
        return layers, params

    def _add_value_histograms(self, scale: float) -> None:
        """This step's signed-value histogram of each layer, unscaled, kept on the device. Under FSDP each rank
        bins its own shards: the picture (plots, TensorBoard only) is rank 0's share of the parameters."""
        from gradcheck_cli.distributed import local

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

    def _param_record(self, info: ParamInfo) -> ParameterRecord:
        series = self.param_series[info.index]
        tensor = info.tensor
        numel = tensor.numel()
        weight_norm = self.weight_norm[info.index]
        grad_norm = series.norm.mean()
        zeros = series.zeros.mean()
        return ParameterRecord(
            name=info.name,
            shape=tuple(tensor.shape),
            requires_grad=bool(tensor.requires_grad),
            numel=numel,
            layers=tuple(self.layers[i].name for i in info.layers),
            grad_norm=grad_norm,
            grad_norm_steps=series.norm.as_tuple(),
            weight_norm=weight_norm,
            grad_to_weight=safe_ratio(grad_norm, weight_norm),
            rms=grad_norm / math.sqrt(numel) if grad_norm is not None and numel else None,
            max_abs=series.max_abs.max(),
            zero_fraction=zeros / numel if zeros is not None and numel else None,
            nonfinite=int(sum(series.nonfinite.present())),
        )

    def _layer_record(
        self,
        spec: LayerSpec,
        params: list[ParameterRecord],
        zero_rows: dict[int, float],
        dead: dict[int, float],
        histograms: dict[int, list[int]],
        position: dict[int, int],
    ) -> Layer:
        mine = [info for info in self.params if spec.index in info.layers]
        trainable = [info for info in mine if info.tensor.requires_grad]
        weights = [info for info in trainable if info.tensor.dim() >= 2] or trainable
        grad_steps: list[float | None] = []
        ratio_steps: list[float | None] = []
        for step in range(self.steps):
            norms = [self.param_series[i.index].norm.values[step] for i in trainable]
            got = [n for n in norms if n is not None]
            grad_steps.append(math.sqrt(sum(n * n for n in got)) if got else None)
            ratio_steps.append(self._ratio(weights, step, spec.category == "embedding"))
        grad = StepSeries(grad_steps)
        ratio = StepSeries(ratio_steps)
        layer_series = self.layer_series[spec.index]
        output = StepSeries([math.sqrt(v) if v is not None else None for v in layer_series.output_sq.values])
        numel = sum(info.tensor.numel() for info in trainable)
        grad_norm = grad.mean()
        zeros = [params[i.index].zero_fraction for i in trainable]
        zero_counts = [z * i.tensor.numel() for z, i in zip(zeros, trainable, strict=True) if z is not None]
        maxes = [m for m in (params[i.index].max_abs for i in trainable) if m is not None]
        unit_source = next((i for i in trainable if i.rows and not i.embedding), None)
        histogram = None
        for info in trainable:
            counts = histograms.get(info.index)
            if counts is not None:
                histogram = counts if histogram is None else [a + b for a, b in zip(histogram, counts, strict=True)]
        return Layer(
            name=spec.name,
            type=type(spec.module).__name__,
            category=spec.category,
            params=sum(info.tensor.numel() for info in mine),
            trainable_params=numel,
            parameters=tuple(info.name for info in mine),
            calls=layer_series.calls.median() or 0.0,
            forward_index=position.get(spec.index),
            grad_norm=grad_norm,
            grad_norm_median=grad.median(),
            grad_norm_steps=grad.as_tuple(),
            weight_norm=math.sqrt(sum(self.weight_norm[i.index] ** 2 for i in mine)),
            grad_to_weight=ratio.median(),
            grad_to_weight_steps=ratio.as_tuple(),
            output_grad_norm=output.mean(),
            output_grad_norm_median=output.median(),
            output_grad_norm_steps=output.as_tuple(),
            output_grad_per_position=layer_series.output_per_position.median(),
            output_grad_per_position_steps=layer_series.output_per_position.as_tuple(),
            grad_norm_spread=grad.spread(),
            output_grad_spread=output.spread(),
            rms=grad_norm / math.sqrt(numel) if grad_norm is not None and numel else None,
            max_abs=max(maxes) if maxes else None,
            zero_fraction=sum(zero_counts) / numel if zero_counts and numel else None,
            nonfinite=sum(params[i.index].nonfinite for i in trainable),
            input_rms=layer_series.input_rms.median(),
            input_zero_fraction=layer_series.input_zero.median(),
            dead_fraction=dead.get(spec.index),
            saturated_fraction=layer_series.saturated.median(),
            zero_grad_unit_fraction=zero_rows.get(unit_source.index) if unit_source is not None else None,
            histogram=tuple(histogram) if histogram is not None else None,
            underflow_fraction=_mean_of(self.param_series[i.index].underflow.median() for i in trainable),
            output_grad_underflow_fraction=layer_series.output_underflow.median(),
        )

    def _ratio(self, weights: list[ParamInfo], step: int, embedding: bool) -> float | None:
        """||g|| / ||W|| over the layer's weight tensors in one step; embeddings over the rows looked up."""
        grad_sq = 0.0
        weight_sq = 0.0
        seen = False
        for info in weights:
            series = self.param_series[info.index]
            norm = series.norm.values[step]
            if norm is None:
                continue
            seen = True
            grad_sq += norm * norm
            touched = series.touched_weight_sq.values[step] if embedding and info.embedding else None
            weight_sq += touched if touched is not None else self.weight_norm[info.index] ** 2
        if not seen or weight_sq <= 0:
            return None
        return math.sqrt(grad_sq) / math.sqrt(weight_sq)


def _mean_of(values: Iterator[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return sum(got) / len(got) if got else None


def _host_counts(tape: StepTape) -> dict[tuple[str, int], float]:
    """The per-step counts the hooks keep on the host (element counts behind each device sum)."""
    counts: dict[tuple[str, int], float] = {}
    for name, values in (
        ("output_positions", tape.output_positions),
        ("output_sampled", tape.output_sampled),
        ("input_numel", tape.input_numel),
        ("saturated_numel", tape.saturated_numel),
    ):
        for index, value in values.items():
            counts[(name, index)] = float(value)
    return counts


def _has_units(spec: LayerSpec) -> bool:
    """Layers whose weight rows (dim 0) are output units: a zero-gradient row is a unit that cannot learn."""
    if spec.category == "conv":
        return not getattr(spec.module, "transposed", False)
    return spec.category in ("linear", "recurrent")
