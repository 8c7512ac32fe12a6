"""Diagnosis: measured layers -> statuses and findings, each with its evidence and a fix.

Pure functions over the report's dataclasses: no torch, no hooks, no printing. Each rule is one function
from a Context (the layers and the run's settings) to findings, registered in RULES below:

- numeric: NaN/Inf, all-zero gradients (numeric.py), values that underflow the AMP dtype;
- views: the signal view (signal.py: how ||dL/dz|| changes along the forward order) and the update view
  (update.py: each weight layer's ||g||/||W||), kept when they hold on most batches (views.py);
- activation: dead ReLU units, saturated sigmoid/tanh inputs; usage: parameters that got no gradient
  (activation.py).

Adding a rule: write `def my_rule(context: Context) -> list[Finding]` in one of these files (or a new one)
and add it to RULES; a new kind of finding also gets a line in kinds.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from gradcheck_cli.diagnose.activation import activations, usage
from gradcheck_cli.diagnose.common import LOSS_LAYER, Context
from gradcheck_cli.diagnose.numeric import gates, numeric, underflow
from gradcheck_cli.diagnose.signal import signal_view
from gradcheck_cli.diagnose.thresholds import Thresholds
from gradcheck_cli.diagnose.update import peer_group, update_view
from gradcheck_cli.diagnose.views import views
from gradcheck_cli.kinds import STATUS_ORDER
from gradcheck_cli.report import Finding, Layer, NanOrigin, SignalSummary, UpdateSummary

__all__ = ["LOSS_LAYER", "RULES", "Context", "Thresholds", "Verdict", "diagnose", "gates", "peer_group"]

Rule = Callable[[Context], list[Finding]]
# Every rule, in the order their findings are gathered (then sorted by _ordered).
RULES: tuple[Rule, ...] = (numeric, views, activations, usage, underflow)


@dataclass(frozen=True)
class Verdict:
    layers: list[Layer]
    findings: list[Finding]
    signal: SignalSummary
    update: UpdateSummary
    notes: list[str] = dataclasses.field(default_factory=list)


def diagnose(
    layers: Sequence[Layer],
    loss: Sequence[float | None],
    thresholds: Thresholds,
    *,
    nan_origin: NanOrigin | None = None,
    lr: float = 0.01,
    amp: str | None = None,
) -> Verdict:
    """Statuses and findings for every layer; the two views' summaries."""
    signal = signal_view(layers, thresholds)
    update = update_view(layers, thresholds, lr, signal[0])
    context = Context(layers, loss, thresholds, nan_origin, lr, amp, signal, update)
    findings = [finding for rule in RULES for finding in rule(context)]
    notes = []
    gated = gates(layers)
    if gated:
        names = sorted(set(gated.values()))
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        notes.append(
            f"{len(gated)} layer(s) get exactly zero gradient only because zero-initialised layers after them "
            f"({shown}) gate their branch (zero_init_residual / Fixup / ReZero); the gates get gradients and open "
            "on the first update: check with --train-steps 1"
        )
    return Verdict(_with_status(layers, findings), _ordered(findings, layers), signal[0], update[0], notes)


def _with_status(layers: Sequence[Layer], findings: Sequence[Finding]) -> list[Layer]:
    by_layer: dict[str, list[Finding]] = {}
    for finding in findings:
        by_layer.setdefault(finding.layer, []).append(finding)
    result = []
    for layer in layers:
        mine = by_layer.get(layer.name, [])
        if mine:
            worst = min(mine, key=lambda f: (f.severity != "error", STATUS_ORDER.index(f.kind)))
            status, severity = worst.kind, worst.severity
        elif layer.frozen:
            status, severity = "frozen", None
        else:
            status, severity = "ok", None
        result.append(dataclasses.replace(layer, status=status, severity=severity))
    return result


def _ordered(findings: Sequence[Finding], layers: Sequence[Layer]) -> list[Finding]:
    """Errors first; then by kind and view (findings that share a fix sit together); then forward order."""
    position = {layer.name: (layer.forward_index if layer.forward_index is not None else 10**9) for layer in layers}
    return sorted(
        findings,
        key=lambda f: (f.severity != "error", STATUS_ORDER.index(f.kind), f.view, position.get(f.layer, -1)),
    )
