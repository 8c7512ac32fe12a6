"""Reduce on the device: one step's gradients -> a few device tensors, with a handful of fused operations per
tensor and no host synchronisation (the collector copies a whole step to the host at once). Sampling keeps
the work per tensor constant for the histograms and fractions.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from gradcheck_cli.series import HISTOGRAM_HIGH, HISTOGRAM_LOW

_FLOAT32_BIAS = 127


@dataclass
class GradientSample:
    """Device tensors for one parameter's gradient in one step (0-d unless noted)."""

    norm_sq: torch.Tensor  # squared L2 norm: squares add up across shards and calls
    max_abs: torch.Tensor
    zeros: torch.Tensor
    touched_rows: torch.Tensor | None  # bool per row (dim 0): any nonzero gradient in that row
    histogram_sample: torch.Tensor | None  # values to bin (a sample); None for an empty gradient
    histogram_scale: float = 1.0  # elements per sampled value: the sample's counts stand for all elements
    underflow: torch.Tensor | None = None  # sampled nonzero values below the AMP dtype's smallest normal
    sampled: int = 0  # how many values that count is over


def norm_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype norms are accumulated in: float32 (half-precision sums of squares overflow at 65504), or the
    tensor's own float64 (vector_norm refuses to narrow it)."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


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
SAMPLE_SIZE = 8192
SAMPLE_RUN = 16


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


@functools.cache  # a few tensor sizes per model, each sampled every step; emptied after each run
def _sample_index(numel: int, size: int, device: torch.device) -> torch.Tensor:
    """Positions of size // SAMPLE_RUN runs of SAMPLE_RUN values, chosen uniformly among the aligned runs."""
    generator = torch.Generator().manual_seed(numel)
    runs = torch.randperm(numel // SAMPLE_RUN, generator=generator)[: size // SAMPLE_RUN].sort().values
    return (runs[:, None] * SAMPLE_RUN + torch.arange(SAMPLE_RUN)).reshape(-1).to(device)


def on_device(values: Sequence[int | float], device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A small constant vector (segment lengths, indices, scales) on the device. On a GPU a copy from host
    memory waits for the device to finish its queued work, a host synchronisation each time: there these
    vectors, the same every step, are made once and kept (until the run ends). On a CPU they are made anew:
    a tensor kept from inside a step would fragment the heap (Collector.prepare says why)."""
    if device.type == "cpu":
        return torch.tensor(values, dtype=dtype)
    return _kept_on_device(tuple(values), device, dtype)


@functools.lru_cache(maxsize=1024)  # a few layouts per model; emptied after each run
def _kept_on_device(values: tuple[int | float, ...], device: torch.device, dtype: torch.dtype | None) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype).to(device)


@contextlib.contextmanager
def released_caches() -> Iterator[None]:
    """One run's sampling indices (512 KiB per distinct tensor size) and bin offsets live as long as the run: a
    notebook or a test session calling analyze() on many models must not keep every size it ever saw."""
    try:
        yield
    finally:
        _sample_index.cache_clear()
        _bin_offsets.cache_clear()
        _kept_on_device.cache_clear()


def prepare_sampling(tensors: Sequence[torch.Tensor], small: Sequence[int], device: torch.device) -> None:
    """Before the first step: the sampling indices and histogram bin offsets for tensors of these sizes (those
    reduced one by one, then the sizes of the small ones reduced together, in the order the steps bin them), so
    that the steps allocate nothing that outlives them (collect.Collector.prepare says why)."""
    sampled = [
        _sample_index(t.numel(), SAMPLE_SIZE, t.device).numel() if t.numel() > SAMPLE_SIZE else t.numel()
        for t in tensors
        if t.numel()
    ]
    if sampled or small:
        _bin_offsets((*sampled, *small), device)


def square_norm(tensor: torch.Tensor) -> torch.Tensor:
    """||x||^2. For a contiguous float32/float64 tensor as x . x, BLAS's dot: half the time of vector_norm on a
    CPU (4M values: 0.28 ms against 0.62), with the same float32 accumulation (an overflow
    to Inf happens where vector_norm's own float32 sum of squares overflows)."""
    if tensor.dtype in (torch.float32, torch.float64) and tensor.is_contiguous() and tensor.numel():
        flat = tensor.view(-1)
        square: torch.Tensor = torch.dot(flat, flat)
    else:
        square = torch.linalg.vector_norm(tensor, dtype=norm_dtype(tensor)).square()
    return square


# A unit (row of dL/dW) whose gradient is below this fraction of its layer's RMS row gets no usable gradient:
# it learns 1e5 times slower than the layer's typical unit, so where that unit moves 1e-3 of its norm per step it
# moves 1e-8, nothing in any run (the reasoning of Thresholds.role_error). ReLU's dead units are exactly 0 and
# pass any such test; the relative one also sees units behind activations that never reach exactly 0: GELU
# with pre-activations always below about -5 (derivative Phi(x) + x phi(x) < 1e-5), SiLU below about -15,
# saturated sigmoid/tanh.
STARVED_UNIT = 1e-5


def reduce_gradient(
    grad: torch.Tensor, want_rows: bool, tiny: float | None = None, starved: float = 0.0
) -> GradientSample:
    """Three passes over a dense gradient, no host sync, no gradient-sized temporaries:
    row norms (which give the norm and the rows that got a gradient: any, or above `starved` x the RMS row
    when that is given), min/max, and a count of nonzeros.

    Norms are accumulated in float32 (half-precision sums of squares overflow at 65504).
    """
    if grad.is_sparse:
        return _reduce_sparse(grad, want_rows)
    flat = grad.reshape(-1)
    with_rows = want_rows and grad.dim() >= 2
    if grad.device.type == "cpu" and grad.dtype in _BITS and grad.is_contiguous() and grad.numel() > BY_BITS:
        row_norms, norm_sq, max_abs, zeros = _by_blocks(grad, with_rows)
    else:
        row_norms = torch.linalg.vector_norm(grad.flatten(1), dim=1, dtype=norm_dtype(grad)) if with_rows else None
        norm_sq = row_norms.square().sum() if row_norms is not None else _norm_sq(flat)
        max_abs, zeros = _max_abs(flat), (flat.numel() - torch.count_nonzero(flat)).float()
    rows = None
    if row_norms is not None:  # (0, n): no rows
        floor = (norm_sq / row_norms.numel()).sqrt() * starved if starved else 0.0
        rows = ~(row_norms <= floor)  # a NaN row (or a NaN floor) got a gradient: the numeric rule's finding
    result = GradientSample(norm_sq, max_abs, zeros, rows, *_for_histogram(flat))
    if tiny is not None:
        values = sample(flat)
        result.underflow = count_subnormal(values, tiny)
        result.sampled = values.numel()
    return result


def _norm_sq(flat: torch.Tensor) -> torch.Tensor:
    norm: torch.Tensor = torch.linalg.vector_norm(flat, dtype=norm_dtype(flat))
    return norm.square()


# On a CPU, torch's count_nonzero on floats is a scalar loop taking 2-4x a norm (README: Overhead); on the same
# bits read as integers it takes half as long, and counts +0.0 only: -0.0 is the most negative integer, so the
# integers' minimum says whether any is there (then that block is counted as floats). The integers' maximum is
# the bits of the largest value (or, with no value >= 0, of the most negative one), and the floats' minimum the
# most negative value: max |g| from the two, NaN propagating as in aminmax. Gradients larger than a block go a
# block at a time (whole rows where there are rows), so the passes after the first read it from cache.
# reduce_gradient over the large gradients of the overhead benchmark's workloads, against the whole-tensor
# passes, interleaved in one process (median ratio of 61 rounds; `whole passes` in benchmarks/reductions.py):
# 10M MLP 0.81x, transformer 0.94x, CNN 0.96x, 100M MLP 0.83x (blocks of 4 Mi values; of 1 Mi the 100M MLP
# gained less). A value read back to choose is free on a CPU; on a GPU it would be a host synchronisation, so
# GPUs keep the three whole-tensor passes.
BLOCK = 1 << 22
BY_BITS = 1 << 19  # below, the one more pass (amin) costs what the count saves (equal at 288 Ki values)
_BITS = {torch.float32: (torch.int32, -(2**31)), torch.float64: (torch.int64, -(2**63))}


def _by_blocks(
    grad: torch.Tensor, with_rows: bool
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row norms or None, ||g||^2, max |g|, exact zeros) of a contiguous float32/float64 CPU gradient."""
    flat = grad.view(-1)
    width = flat.numel() // grad.shape[0] if with_rows else 1
    span = max(1, BLOCK // width) * width if width <= BLOCK else BLOCK
    if flat.numel() <= span:  # one block: no lists to join (a CNN has dozens of such gradients)
        row_norms = torch.linalg.vector_norm(grad.view(-1, width), dim=1, dtype=norm_dtype(grad)) if with_rows else None
        norm_sq = row_norms.square().sum() if row_norms is not None else square_norm(flat)
        high, low, nonzero = _extrema_and_nonzero(flat)
        return row_norms, norm_sq, torch.maximum(high, -low).abs().float(), (flat.numel() - nonzero).float()
    row_norms = None
    if with_rows and width > BLOCK:  # rows longer than a block: their norms in a pass of their own
        row_norms = torch.linalg.vector_norm(grad.view(-1, width), dim=1, dtype=norm_dtype(grad))
    norms, highs, lows, nonzeros = [], [], [], []
    for start in range(0, flat.numel(), span):
        block = flat[start : start + span]
        if row_norms is None:
            norms.append(
                torch.linalg.vector_norm(block.view(-1, width), dim=1, dtype=norm_dtype(grad))
                if with_rows
                else square_norm(block)
            )
        high, low, nonzero = _extrema_and_nonzero(block)
        highs.append(high)
        lows.append(low)
        nonzeros.append(nonzero)
    if with_rows:
        row_norms = torch.cat(norms) if row_norms is None else row_norms
        norm_sq = row_norms.square().sum()
    else:
        norm_sq = torch.stack(norms).sum()
    max_abs = torch.maximum(torch.stack(highs).amax(), -torch.stack(lows).amin()).abs().float()
    return row_norms, norm_sq, max_abs, (flat.numel() - torch.stack(nonzeros).sum()).float()


def _extrema_and_nonzero(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the largest value, or with none >= 0 the most negative; the most negative; the count of nonzeros) of a
    contiguous float32/float64 block, from its bits read as integers (BLOCK says how)."""
    int_dtype, negative_zero = _BITS[values.dtype]
    bits = values.view(int_dtype)
    least, most = torch.aminmax(bits)
    nonzero = torch.count_nonzero(values if int(least) == negative_zero else bits)
    return most.view(values.dtype), torch.amin(values), nonzero


# Tensors of at most this many elements are reduced together, concatenated (reduce_small): for them each
# operation's dispatch (microseconds) costs more than its arithmetic, and a CNN has hundreds of them (biases,
# norm scales), a model of many small layers thousands. The sample's bound, so that a small tensor's |g|
# histogram is over all of its values, as when it is reduced alone.
SMALL_TENSOR = SAMPLE_SIZE


@dataclass
class SmallBatch:
    """What reduce_gradient gives, for many small gradients at once: one device vector per statistic."""

    norm_sq: torch.Tensor  # (k,) float64
    zeros: torch.Tensor  # (k,)
    max_abs: torch.Tensor  # (k,)
    touched_rows: torch.Tensor  # bool per row of every tensor (a tensor without rows: one), as in GradientSample
    counts: list[int]  # rows per tensor in that vector
    values: torch.Tensor  # every value, float32: the |g| histograms' sample (all of them)
    sizes: list[int]
    underflow: torch.Tensor | None = None  # (k,), with tiny


def batchable(grad: torch.Tensor) -> bool:
    """Whether reduce_small can take this gradient (dense, small, nonempty, on a device with segment ops)."""
    return not grad.is_sparse and 0 < grad.numel() <= SMALL_TENSOR and grad.device.type in ("cpu", "cuda")


@dataclass(frozen=True)
class GroupLayout:
    """What reduce_small needs to know about its tensors besides their values: the same every step."""

    sizes: list[int]
    counts: list[int]  # rows per tensor in the row vector (a tensor without rows: one)
    row_lengths: list[int]  # elements per row, every row of every tensor
    starved: list[float]  # per tensor: the row test's floor (reduce_gradient's `starved`)

    @staticmethod
    def of(tensors: Sequence[torch.Tensor], rows: Sequence[bool], starved: Sequence[float]) -> GroupLayout:
        sizes = [t.numel() for t in tensors]
        counts = [t.shape[0] if want and t.dim() >= 2 else 1 for t, want in zip(tensors, rows, strict=True)]
        row_lengths = [n for size, count in zip(sizes, counts, strict=True) for n in [size // count] * count]
        return GroupLayout(sizes, counts, row_lengths, list(starved))


def reduce_small(
    grads: Sequence[torch.Tensor],
    rows: Sequence[bool] = (),
    starved: Sequence[float] = (),
    tiny: float | None = None,
    layout: GroupLayout | None = None,
) -> SmallBatch:
    """reduce_gradient for many small dense gradients of one dtype: concatenated once, then segment sums and
    maxima over the tensors (and over the rows of those with rows): about ten operations whatever their
    number. Sums of squares are taken in float64: exact to float32 precision at any segment length.
    `layout` (GroupLayout.of(grads, rows, starved)) can be given instead of rows and starved."""
    from torch._utils import _flatten_dense_tensors

    layout = layout or GroupLayout.of(grads, rows, starved)
    device = grads[0].device
    with torch.no_grad():  # a graph-free copy without a detach() per tensor (2-3 us each, 20,000 at 10,000 layers)
        flat = _flatten_dense_tensors(list(grads))
    lengths = on_device(layout.sizes, device)
    row_sq = torch.segment_reduce(flat.to(torch.float64).square(), "sum", lengths=on_device(layout.row_lengths, device))
    per_tensor = on_device(layout.counts, device)
    norm_sq = torch.segment_reduce(row_sq, "sum", lengths=per_tensor)
    values = flat.float()
    magnitude = values.abs()
    max_abs = torch.segment_reduce(magnitude, "max", lengths=lengths, initial=0.0)
    zeros = torch.segment_reduce((values == 0).float(), "sum", lengths=lengths)
    floor_sq = norm_sq / per_tensor * on_device(layout.starved, device, torch.float64).square()
    touched = ~(row_sq <= floor_sq.repeat_interleave(per_tensor, output_size=row_sq.numel()))
    result = SmallBatch(norm_sq, zeros, max_abs, touched, layout.counts, values, layout.sizes)
    if tiny is not None:
        below = ((magnitude < tiny) & (values != 0)).float()
        result.underflow = torch.segment_reduce(below, "sum", lengths=lengths)
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


def _for_histogram(flat: torch.Tensor) -> tuple[torch.Tensor | None, float]:
    if not flat.numel():
        return None, 1.0
    values = sample(flat.detach())
    return values, flat.numel() / values.numel()


def histograms_of(
    samples: Sequence[torch.Tensor], scales: Sequence[float], sizes: Sequence[int] | None = None
) -> torch.Tensor:
    """Counts of floor(log2 |g|) in the fixed bins, one row per sample, each scaled to the elements its sample
    stands for: every tensor at once (one concatenation, one bincount), since per-tensor calls cost more
    in dispatch than in arithmetic for the many small tensors of a CNN. `sizes` (default: each sample's size)
    splits the concatenated samples into rows otherwise (reduce_small's values hold many tensors). Exact zeros
    are not counted
    (zero_fraction has them); values below the range count in the first bin, above it in the last."""
    device = samples[0].device
    values = torch.cat([s.reshape(-1).to(torch.float32) for s in samples])
    width = _EXPONENT_BINS
    exponent = (values.view(torch.int32) >> 23) & 0xFF  # 0: zero or subnormal, 255: inf or nan
    exponent = torch.where(values == 0, width - 1, exponent)
    rows = tuple(sizes) if sizes is not None else tuple(s.numel() for s in samples)
    offsets = _bin_offsets(rows, device)
    counts = bin_counts(offsets + exponent, width * len(rows), device.type == "cpu").reshape(len(rows), width)
    low, high = _FLOAT32_BIAS + HISTOGRAM_LOW, _FLOAT32_BIAS + HISTOGRAM_HIGH
    result = counts[:, low:high].float()
    result[:, 0] += counts[:, :low].sum(dim=1)  # tiny values and subnormals
    result[:, -1] += counts[:, high:255].sum(dim=1)
    return result * on_device(scales, device).unsqueeze(1)


def bin_counts(bins: torch.Tensor, size: int, bincount: bool) -> torch.Tensor:
    """How many times each of `size` bins occurs: torch.bincount on a CPU; elsewhere an index_add, since a
    GPU's bincount reads the largest bin back to size its output, a host synchronisation."""
    if bincount:
        return torch.bincount(bins, minlength=size)
    return torch.zeros(size, dtype=torch.long, device=bins.device).index_add_(0, bins, torch.ones_like(bins))


_EXPONENT_BINS = 257  # 256 float32 exponents, and one more bin for exact zeros


@functools.lru_cache(maxsize=8)  # the same tensors are sampled every step: one entry per model, in practice
def _bin_offsets(sizes: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """For concatenated samples of these sizes, where each value's row of bins starts (sample i: i * width)."""
    owner = torch.arange(len(sizes), device=device).repeat_interleave(
        torch.tensor(sizes, device=device), output_size=sum(sizes)
    )
    return owner * _EXPONENT_BINS


def _reduce_sparse(grad: torch.Tensor, want_rows: bool) -> GradientSample:
    """Sparse gradients (nn.Embedding(sparse=True)): only the stored values exist; the rest are zeros."""
    coalesced = grad.coalesce()
    values = coalesced.values()
    flat = values.reshape(-1)
    norm_sq = _norm_sq(flat)
    zeros = (grad.numel() - torch.count_nonzero(flat)).float()
    rows = None
    if want_rows:
        rows = torch.zeros(grad.shape[0], dtype=torch.bool, device=grad.device)
        touched = values.reshape(values.shape[0], -1).ne(0).any(dim=1)
        rows[coalesced.indices()[0][touched]] = True
    return GradientSample(norm_sq, _max_abs(flat), zeros, rows, *_for_histogram(flat))


def shift_histogram(histogram: torch.Tensor, bins: int) -> torch.Tensor:
    """Move counts `bins` power-of-two bins down (dividing the values by 2^bins), piling what falls off the
    bottom into bin 0: how gradients measured at an AMP loss scale 2^k are reported unscaled. Along the last
    dimension: one histogram, or one per row."""
    if bins <= 0:
        return histogram
    shifted = torch.zeros_like(histogram)
    width = histogram.shape[-1]
    bins = min(bins, width)
    shifted[..., : width - bins] = histogram[..., bins:]
    shifted[..., 0] += histogram[..., :bins].sum(dim=-1)
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
