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
        signal, signal_findings = signal_view(single, thresholds)
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
