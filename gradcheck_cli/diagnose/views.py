"""The two views' findings, kept only when they hold on most batches (a per-step vote)."""

from __future__ import annotations

import dataclasses

from gradcheck_cli.diagnose.common import Context
from gradcheck_cli.diagnose.signal import signal_view
from gradcheck_cli.diagnose.update import update_view
from gradcheck_cli.report import Finding, Layer


def views(context: Context) -> list[Finding]:
    """The signal and update views' findings that also come out of at least half of the single-step
    diagnoses, so one odd batch can neither make nor break a CI verdict."""
    findings = context.signal[1] + context.update[1]
    layers, thresholds, lr = context.layers, context.thresholds, context.lr
    steps = max((len(layer.grad_norm_steps) for layer in layers), default=0)
    if steps < 2:
        return findings
    votes: dict[tuple[str, str, str], int] = {}
    for step in range(steps):
        single = [_at_step(layer, step) for layer in layers]
        signal, signal_findings = signal_view(single, thresholds, context.signal[0].residual)
        _, update_findings = update_view(single, thresholds, lr, signal)
        for key in {(f.layer, f.kind, f.view) for f in signal_findings + update_findings}:
            votes[key] = votes.get(key, 0) + 1
    needed = (steps + 1) // 2
    return [f for f in findings if votes.get((f.layer, f.kind, f.view), 0) >= needed]


def _at_step(layer: Layer, step: int) -> Layer:
    def pick(values: tuple[float | None, ...]) -> float | None:
        return values[step] if step < len(values) else None

    return dataclasses.replace(
        layer,
        grad_norm_median=pick(layer.grad_norm_steps),
        grad_to_weight=pick(layer.grad_to_weight_steps),
        output_grad_norm_median=pick(layer.output_grad_norm_steps),
        output_grad_per_position=pick(layer.output_grad_per_position_steps),
    )


MODEL_LAYER = "<model>"


def unjudged(context: Context) -> list[Finding]:
    """A run that could judge almost nothing says so: neither view had enough layers, and at least half of the
    trainable layers got no gradient to look at (a zero-initialised head gates them all at init, for example). Without
    this finding such a run would PASS on no evidence; --fail-on unjudged makes it fail."""
    signal, update = context.signal[0], context.update[0]
    min_chain = context.thresholds.min_chain
    if signal.gain_per_layer is not None or (
        update.median_grad_to_weight is not None and len(update.layers) >= min_chain
    ):
        return []
    trainable = [layer for layer in context.layers if layer.trainable_params and layer.alias_of is None]
    # A layer whose zero gradient a gate explains was not judged; one that is dead for good was (numeric).
    gated = sum(layer.gated for layer in trainable)
    if not trainable or 2 * gated < len(trainable):
        return []
    return [
        Finding(
            MODEL_LAYER,
            "unjudged",
            "warning",
            "usage",
            f"nothing was judged: {gated} of {len(trainable)} trainable layers get no gradient until the "
            f"zero-initialised layers that gate them move, {len(signal.chain)} had a dL/dz for the signal view and "
            f"{len(update.layers)} a ||g||/||W|| for the update view (each needs {min_chain})",
            "measure after the gates open: --train-steps 1 (or more); --fail-on unjudged fails such a run",
        )
    ]
