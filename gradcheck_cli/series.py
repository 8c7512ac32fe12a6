"""Host-side numbers: per-step series, medians, robust fits and the fixed histogram bins. No torch: the rules
and the text renderers use these too."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

# |g| histogram in powers of two: bin k counts 2^(LOW+k) <= |g| < 2^(LOW+k+1), read on the device straight
# from the float32 exponent bits (reduce.histograms_of). Fixed bins, so steps and layers add up and no range
# has to be found first (finding one would cost a host sync). 2^-40 (9e-13) .. 2^14 (16384) covers the
# gradients that matter; values outside are counted in the end bins; exact zeros are counted separately
# (zero_fraction) and NaN/Inf not at all (nonfinite).
HISTOGRAM_LOW = -40
HISTOGRAM_HIGH = 14
HISTOGRAM_BINS = HISTOGRAM_HIGH - HISTOGRAM_LOW


def histogram_edges() -> list[float]:
    """Bin edges of every histogram in a report, as log10 |g| (bin k spans [2^(LOW+k), 2^(LOW+k+1)))."""
    return [(HISTOGRAM_LOW + i) * math.log10(2.0) for i in range(HISTOGRAM_BINS + 1)]


def _middle(ordered: Sequence[float]) -> float | None:
    if not ordered:
        return None
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


def median(values: Iterable[float | None]) -> float | None:
    """Median of the finite values; None for none."""
    return _middle(sorted(v for v in values if v is not None and math.isfinite(v)))


def mean(values: Iterable[float | None]) -> float | None:
    """Mean of the values present; None for none."""
    got = [v for v in values if v is not None]
    return sum(got) / len(got) if got else None


@dataclass
class StepSeries:
    """Per-step host values of one quantity; None marks a step where it did not exist."""

    values: list[float | None] = field(default_factory=list)

    def add(self, value: float | None) -> None:
        self.values.append(value)

    def present(self) -> list[float]:
        return [v for v in self.values if v is not None]

    def mean(self) -> float | None:
        return mean(self.values)

    def median(self) -> float | None:
        """Median of the values present, infinities included, NaN sorted last."""
        return _middle(sorted(self.present(), key=_nan_last))

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


# Pairs beyond which the median slope is taken over a sample of pairs: n(n-1)/2 grows as n^2 (10,000 layers are
# 5e7 pairs, 8 s and 2 GB per fit). A uniform sample of 100,000 pairs puts the sample median within about
# +-0.3% of the pairs (in rank, one standard error 0.5/sqrt(K)) of the true one, far inside the ~29% of
# outlying points the estimator ignores; chains of up to 447 layers are fitted exactly.
MAX_PAIRS = 100_000


def _pairs(count: int) -> list[tuple[int, int]]:
    """Every pair i < j of `count` points, or a fixed uniform sample of MAX_PAIRS of them (seeded by count:
    the same chain always gets the same fit)."""
    total = count * (count - 1) // 2
    if total <= MAX_PAIRS:
        return [(i, j) for i in range(count) for j in range(i + 1, count)]
    import random

    generator = random.Random(count)
    pairs: list[tuple[int, int]] = []
    while len(pairs) < MAX_PAIRS:
        i, j = generator.randrange(count), generator.randrange(count)
        if i != j:
            pairs.append((min(i, j), max(i, j)))
    return pairs


def theil_sen_slope(xs: Sequence[float], ys: Sequence[float], groups: Sequence[object] | None = None) -> float | None:
    """Median of pairwise slopes: a line fit that ignores up to ~29% outlying points.

    Used for the per-layer gain of dL/dz, so that an output head or an embedding at either end of the chain
    (which legitimately differ from hidden layers) cannot fake a trend. With `groups`, each group of at least
    two points gives its own slope (its pairs only) and the result is the median of those: every group (a role
    at one resolution, see diagnose.signal) has one vote, however many layers it has.
    """
    if groups is None:
        slopes = [(ys[j] - ys[i]) / (xs[j] - xs[i]) for i, j in _pairs(len(xs)) if xs[j] != xs[i]]
        return _middle(sorted(slopes))
    members: dict[object, list[int]] = {}
    for index, group in enumerate(groups):
        members.setdefault(group, []).append(index)
    votes = [
        theil_sen_slope([xs[i] for i in indices], [ys[i] for i in indices])
        for indices in members.values()
        if len(indices) >= 2
    ]
    return _middle(sorted(v for v in votes if v is not None))
