"""The training view: what the watched optimizer steps (--train-steps, watch.py) showed over time, each finding
with the step where it happened.

- divergence: the step whose loss or gradients were NaN/Inf, and where that started (nan);
- spikes: a step whose loss or global gradient norm is spike_warning times the running median of the steps
  before it, with the layers that carried it (exploding);
- dying units: output units with a usable gradient at the first step and none by the end (dead);
- stalled updates: weights with a nonzero gradient that the step left unchanged, because the update was below
  the precision of their dtype (vanishing, view numeric);
- clipping that acts on most steps: the threshold, not the gradient, sets the step size (exploding).

The update sizes the optimizer made go to the update view (update.py compares ||dW||/||W|| across layers).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from gradcheck_cli.diagnose.common import LOSS_LAYER, Context, level, times
from gradcheck_cli.diagnose.views import MODEL_LAYER
from gradcheck_cli.report import Finding, Training, TrainingLayer
from gradcheck_cli.series import median

# A spike is judged against the median of at most this many steps before it, and only with at least
# SPIKE_HISTORY of them: a median of five ignores two odd steps, and twenty follow a trend (the loss falling)
# closely enough that a slow change is never read as a spike.
SPIKE_WINDOW = 20
SPIKE_HISTORY = 5
# A loss has no natural zero (a Poisson or Gaussian NLL without its constant goes negative, a language model's
# sits far from 0), so a ratio to its median means nothing: a loss spike is measured in robust standard
# deviations of the steps before it (1.4826 x their median absolute deviation), that deviation taken as at
# least LOSS_SCALE_FLOOR of the median's size so that a loss repeated exactly (one batch, reused) does not make
# a small rise infinitely many deviations.
MAD_TO_SIGMA = 1.4826
LOSS_SCALE_FLOOR = 0.1
# Steps at the end of the run in all of which units must be dead to have died (and so the fewest steps, with
# the first, that can show a death).
DEATH_STEPS = 2
# The layers named as carrying a spike: those whose own ||g|| grew most against their own running median.
CARRIERS = 3


def training(context: Context) -> list[Finding]:
    run = context.training
    if run is None or run.steps == 0:
        return []
    return [
        *_divergence(run),
        *_spikes(context, run),
        *_dying(context, run),
        *_stalled(context, run),
        *_clipping(context, run),
    ]


def _divergence(run: Training) -> list[Finding]:
    if run.nan_step is None:
        return []
    origin = run.nan_origin
    where = ""
    layer = LOSS_LAYER
    if origin is not None:
        where = f"; it started in the {origin.phase}" + (f" at {origin.module}" if origin.module else "")
        where += f" ({origin.detail})" if origin.detail else ""
        layer = origin.module if origin.module else LOSS_LAYER
    last = run.grad_norm[run.nan_step - 1] if run.nan_step > 0 else None
    before = f"; the gradient norm was {last:.3g} the step before" if last is not None else ""
    saved = f"; its batch is saved in {run.bad_batch}" if run.bad_batch else ""
    return [
        Finding(
            layer,
            "nan",
            "error",
            "training",
            f"step {run.nan_step + 1} of the watched run ({run.optimizer}) gave NaN/Inf{where}{before}{saved}",
            "the run diverged: lower the learning rate (10x), clip the gradient norm (--clip 1.0, "
            "clip_grad_norm_), warm the learning rate up; replay the step with --save-bad-batch",
        )
    ]


def _history(values: Sequence[float | None], step: int) -> list[float] | None:
    history = [v for v in values[max(0, step - SPIKE_WINDOW) : step] if v is not None and math.isfinite(v)]
    return history if len(history) >= SPIKE_HISTORY else None


def _running_factors(values: Sequence[float | None]) -> list[tuple[int, float]]:
    """(step, value / median of the steps before it) for each step with enough history: for norms, which
    are >= 0 with a natural zero."""
    factors = []
    for step, value in enumerate(values):
        history = _history(values, step)
        reference = median(history) if history else None
        # +Inf: every value finite, but the float32 norm overflowed (watch.Watch._overflow, under --clip)
        if value is not None and not math.isnan(value) and reference is not None and reference > 0:
            factors.append((step, value / reference))
    return factors


def _loss_deviations(values: Sequence[float]) -> list[tuple[int, float, float]]:
    """(step, robust deviations above the running median, the median) for each step with enough history."""
    found = []
    for step, value in enumerate(values):
        history = _history(values, step)
        if history is None or not math.isfinite(value):
            continue
        middle = median(history) or 0.0
        spread = MAD_TO_SIGMA * (median(abs(v - middle) for v in history) or 0.0)
        scale = max(spread, LOSS_SCALE_FLOOR * abs(middle))
        if scale > 0:
            found.append((step, (value - middle) / scale, middle))
    return found


def _spikes(context: Context, run: Training) -> list[Finding]:
    """The worst loss spike and the worst gradient-norm spike, each with the layers that carried it. A spike
    that --clip caught is at most a warning: clipping bounded that step, as it is meant to."""
    thresholds = context.thresholds
    findings = []
    losses = [(s, z, m) for s, z, m in _loss_deviations(run.loss) if z >= thresholds.spike_warning]
    if losses:
        step, deviations, middle = max(losses, key=lambda item: item[1])
        ratio = run.loss[step] / middle if middle > 0 else None
        severity = "error" if ratio is not None and ratio >= thresholds.spike_error else "warning"
        how = f" ({times(ratio)} its running median {middle:.3g})" if ratio is not None and ratio > 1 else ""
        text = (
            f"the loss jumped to {run.loss[step]:.3g}, {deviations:.0f} robust deviations above the steps before{how}"
        )
        findings.append(_spike(run, step, text, LOSS_LAYER, severity, deviations, len(losses)))
    grad = [None if skipped else v for v, skipped in zip(run.grad_norm, run.skipped, strict=True)]
    norms = [(s, f) for s, f in _running_factors(grad) if f >= thresholds.spike_warning]
    if norms:
        step, factor = max(norms, key=lambda item: item[1])
        severity = level(factor, thresholds.spike_warning, thresholds.spike_error) or "warning"
        if run.clipped[step]:
            severity = "warning"
        carriers = _carriers(run.layers, step)
        text = (
            f"the gradient norm jumped to {times(factor)} its running median ({run.grad_norm[step]:.3g})"
            if math.isfinite(factor)
            else "the gradient norm overflowed float32 (every value finite, their squares' sum not)"
        )
        findings.append(
            _spike(run, step, text, carriers[0][0] if carriers else MODEL_LAYER, severity, factor, len(norms))
        )
    return findings


def _spike(run: Training, step: int, text: str, layer: str, severity: str, factor: float, count: int) -> Finding:
    carriers = _carriers(run.layers, step)
    carried = ", ".join(f"{name} {times(f)}" for name, f in carriers)
    clipped = " (clipped)" if run.clipped[step] else ""
    others = f" ({count} spiking steps in all)" if count > 1 else ""
    return Finding(
        layer,
        "exploding",
        severity,
        "training",
        f"step {step + 1}: {text}{clipped}{others}" + (f"; carried by {carried}" if carried else ""),
        "one batch moved the weights far more than the others: look at that batch (outliers, bad labels), "
        "clip the gradient norm (--clip, clip_grad_norm_), lower the learning rate or warm it up",
        factor,
    )


def _carriers(layers: Sequence[TrainingLayer], step: int) -> list[tuple[str, float]]:
    """The layers whose ||g|| at `step` grew most against their own running median."""
    grown = []
    for layer in layers:
        for at, factor in _running_factors(layer.grad_norm):
            if at == step and factor > 1:
                grown.append((layer.name or "(model)", factor))
    return sorted(grown, key=lambda item: -item[1])[:CARRIERS]


def _dying(context: Context, run: Training) -> list[Finding]:
    """Units alive at the first step and dead at the end: the rise of the dead fraction against the same
    thresholds as the dead units of the measured passes."""
    thresholds = context.thresholds
    findings = []
    for layer in run.layers:
        dead = [d for d in layer.dead_fraction if d is not None]
        if len(dead) < DEATH_STEPS + 1:
            continue
        start = dead[0]
        # a unit that died stays dead: the fewest dead over the last quarter of the steps (at least two), so
        # that one batch on which many units happen to be silent is not a death
        end = min(dead[-max(DEATH_STEPS, len(dead) // 4) :])
        rise = end - start
        severity = level(rise, thresholds.dead_warning, thresholds.dead_error) if rise > 0 else None
        if severity is None:
            continue
        first = next(i for i, d in enumerate(dead) if d - start >= rise / 10)
        half = next(i for i, d in enumerate(dead) if d - start >= rise / 2)
        findings.append(
            Finding(
                layer.name,
                "dead",
                severity,
                "training",
                f"its units died during training: {start:.0%} got no gradient at step 1, {end:.0%} by step "
                f"{len(dead)}; the first died at step {first + 1}, half of them by step {half + 1}",
                "steps too large for ReLU units push their inputs below 0 for good: lower the learning rate, "
                "warm it up, or use LeakyReLU/GELU",
                rise,
            )
        )
    return findings


def _stalled(context: Context, run: Training) -> list[Finding]:
    thresholds = context.thresholds
    findings = []
    for layer in run.layers:
        lost = [
            f for f, skipped in zip(layer.stalled_fraction, run.skipped, strict=True) if f is not None and not skipped
        ]
        fraction = median(lost)
        if fraction is None:
            continue
        severity = level(fraction, thresholds.stall_warning, thresholds.stall_error)
        if severity is None:
            continue
        update = median(r for r in layer.update_ratio if r is not None)
        if update == 0:  # not rounding: the optimizer's update itself was 0 (e.g. Adam's second moment overflowed)
            cause = "the optimizer's update itself was 0 (its second moment overflowed, for one)"
        else:
            size = f" (||dW||/||W|| {update:.2g} per step)" if update is not None else ""
            cause = f"the updates{size} are below the precision of the weights' dtype around their values"
        findings.append(
            Finding(
                layer.name,
                "vanishing",
                severity,
                "numeric",
                f"{fraction:.0%} of its weights with a nonzero gradient did not change in a step: {cause}",
                "keep float32 master weights (train in float32 under torch.autocast, --amp bf16), or an optimizer "
                "with Kahan summation or stochastic rounding; a larger learning rate only for this layer",
                fraction,
            )
        )
    return findings


def _clipping(context: Context, run: Training) -> list[Finding]:
    if run.clip is None:
        return []
    steps = [c for c, skipped in zip(run.clipped, run.skipped, strict=True) if not skipped]
    if len(steps) < SPIKE_HISTORY:
        return []
    share = sum(steps) / len(steps)
    if share <= context.thresholds.clip_warning:
        return []
    norms = [n for n in run.grad_norm if math.isfinite(n)]
    typical = median(norms) or 0.0
    return [
        Finding(
            MODEL_LAYER,
            "exploding",
            "warning",
            "training",
            f"--clip {run.clip:g} acted on {share:.0%} of the steps (median gradient norm {typical:.3g}): the "
            "threshold, not the gradient, sets every step's size",
            f"raise --clip to about the typical norm ({typical:.2g}) so that it catches only spikes, or lower the "
            "learning rate",
            share,
        )
    ]
