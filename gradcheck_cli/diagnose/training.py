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
# SPIKE_HISTORY of them: a median of three already ignores one odd step, and twenty follow a trend (the loss
# falling) closely enough that a slow change is never read as a spike.
SPIKE_WINDOW = 20
SPIKE_HISTORY = 3
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


def _running_factors(values: Sequence[float | None]) -> list[tuple[int, float]]:
    """(step, value / median of the steps before it) for each step with enough history."""
    factors = []
    for step, value in enumerate(values):
        history = [v for v in values[max(0, step - SPIKE_WINDOW) : step] if v is not None and math.isfinite(v)]
        reference = median(history) if len(history) >= SPIKE_HISTORY else None
        if value is not None and math.isfinite(value) and reference is not None and reference > 0:
            factors.append((step, value / reference))
    return factors


def _spikes(context: Context, run: Training) -> list[Finding]:
    thresholds = context.thresholds
    findings = []
    grad = [None if skipped else v for v, skipped in zip(run.grad_norm, run.skipped, strict=True)]
    for name, values in (("loss", list(run.loss)), ("gradient norm", grad)):
        spikes = [(s, f) for s, f in _running_factors(values) if f >= thresholds.spike_warning]
        if not spikes:
            continue
        step, factor = max(spikes, key=lambda item: item[1])
        severity = level(factor, thresholds.spike_warning, thresholds.spike_error)
        assert severity is not None
        carriers = _carriers(run.layers, step)
        carried = ", ".join(f"{layer} {times(f)}" for layer, f in carriers)
        others = f" ({len(spikes)} spiking steps in all)" if len(spikes) > 1 else ""
        clipped = " (clipped)" if run.clipped[step] else ""
        message = (
            f"step {step + 1}: the {name} jumped to {times(factor)} its running median "
            f"({values[step]:.3g}){clipped}{others}" + (f"; carried by {carried}" if carried else "")
        )
        findings.append(
            Finding(
                carriers[0][0] if carriers and name != "loss" else LOSS_LAYER,
                "exploding",
                severity,
                "training",
                message,
                "one batch moved the weights far more than the others: look at that batch (outliers, bad labels), "
                "clip the gradient norm (--clip, clip_grad_norm_), lower the learning rate or warm it up",
                factor,
            )
        )
    return findings


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
        if len(dead) < 2:
            continue
        start = dead[0]
        end = median(dead[-max(1, len(dead) // 4) :]) or 0.0  # the last quarter: a unit that died stays dead
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
