"""Diagnosis: measured layers -> statuses and findings, each with its evidence and a fix.

Pure functions over the report's dataclasses: no torch, no hooks, no printing. Each rule is one function
from a Context (the layers and the run's settings) to findings, registered in RULES below:

- numeric: NaN/Inf, all-zero gradients (numeric.py), values that underflow the AMP dtype;
- views: the signal view (signal.py: how ||dL/dz|| changes along the forward order) and the update view
  (update.py: each weight layer's ||g||/||W||), kept when they hold on most batches (views.py);
- time: the gradient reaching each time step of a recurrent layer (time.py);
- training: what the watched optimizer steps of --train-steps showed over time (training.py);
- activation: dead ReLU units, nearly dead ones (layers reading almost only exact zeros), saturated
  sigmoid/tanh inputs; usage: parameters that got no gradient (activation.py).

Adding a rule: write `def my_rule(context: Context) -> list[Finding]` in one of these files (or a new one)
and add it to RULES; a new kind of finding also gets a line in kinds.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from gradcheck_cli.diagnose.activation import activations, usage
from gradcheck_cli.diagnose.common import LOSS_LAYER, Context
from gradcheck_cli.diagnose.numeric import numeric, underflow
from gradcheck_cli.diagnose.peers import peer_group
from gradcheck_cli.diagnose.signal import signal_view
from gradcheck_cli.diagnose.thresholds import Thresholds
from gradcheck_cli.diagnose.time import gated_memory_notes, through_time
from gradcheck_cli.diagnose.training import training
from gradcheck_cli.diagnose.update import expects_comparison, update_view
from gradcheck_cli.diagnose.views import MODEL_LAYER, unjudged, views
from gradcheck_cli.kinds import STATUS_ORDER
from gradcheck_cli.report import Finding, Layer, NanOrigin, SignalSummary, Training, UpdateSummary

__all__ = ["LOSS_LAYER", "MODEL_LAYER", "RULES", "Context", "Thresholds", "Verdict", "diagnose", "peer_group"]

Rule = Callable[[Context], list[Finding]]
# Every rule, in the order their findings are gathered (then sorted by _ordered).
RULES: tuple[Rule, ...] = (numeric, views, through_time, activations, usage, underflow, unjudged, training)


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
    residual: bool | None = None,
    training_run: Training | None = None,
) -> Verdict:
    """Statuses and findings for every layer; the two views' summaries. residual: whether the signal has a
    path around the chain's layers (confirm.find_bypass), which changes what the signal view judges."""
    signal = signal_view(layers, thresholds, residual)
    update = update_view(layers, thresholds, lr, signal[0])
    context = Context(layers, loss, thresholds, nan_origin, lr, amp, signal, update, training_run)
    findings = [finding for rule in RULES for finding in rule(context)]
    notes = _tied_notes(layers) + gated_memory_notes(layers, thresholds)
    compared = _compared(layers, signal[0], update[0], thresholds)
    layers = [dataclasses.replace(layer, views=compared.get(layer.name, ())) for layer in layers]
    return Verdict(_with_status(layers, findings), _ordered(findings, layers), signal[0], update[0], notes)


def _compared(
    layers: Sequence[Layer], signal: SignalSummary, update: UpdateSummary, thresholds: Thresholds
) -> dict[str, tuple[str, ...]]:
    """Which views compared each layer with others: the signal view's chain when it fitted a gain, the update
    view's members when it had a median of enough layers, the time view's recurrent layers with enough steps."""
    views: dict[str, list[str]] = {}
    if signal.gain_per_layer is not None:
        for name in signal.chain:
            views.setdefault(name, []).append("signal")
    if update.median_grad_to_weight is not None and len(update.layers) >= thresholds.min_chain:
        for name in update.layers:
            views.setdefault(name, []).append("update")
    for layer in layers:
        if layer.time_grad_norms is not None and len(layer.time_grad_norms) >= thresholds.min_chain:
            views.setdefault(layer.name, []).append("time")
    return {name: tuple(found) for name, found in views.items()}


def _with_status(layers: Sequence[Layer], findings: Sequence[Finding]) -> list[Layer]:
    by_layer: dict[str, list[Finding]] = {}
    for finding in findings:
        for name in (finding.layer, *finding.also):
            by_layer.setdefault(name, []).append(finding)
    result = []
    for layer in layers:
        mine = by_layer.get(layer.name, [])
        if mine:
            # the worst; of equals, the layer's own finding before a trend's that covers it (its own numbers)
            worst = min(mine, key=lambda f: (f.severity != "error", STATUS_ORDER.index(f.kind), f.layer != layer.name))
            status, severity = worst.kind, worst.severity
        elif layer.frozen:
            status, severity = "frozen", None
        elif layer.gated:  # not judged: its gradient is 0 until the gate after it moves
            status, severity = "gated", None
        # an auxiliary head the loss does not read, or a weight layer checked numerically but compared by no view
        elif layer.side_output or (not layer.views and expects_comparison(layer)):
            status, severity = "unjudged", None
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


def _tied_notes(layers: Sequence[Layer]) -> list[str]:
    """One note per tied tensor: which modules reuse it, and where its one verdict is."""
    aliases: dict[str, list[str]] = {}
    for layer in layers:
        if layer.alias_of is not None:
            aliases.setdefault(layer.alias_of, []).append(layer.name or "(model)")
    return [
        f"tied: {', '.join(names)} reuse the parameters of {owner or '(model)'}; one tensor, one verdict, on {owner}"
        for owner, names in aliases.items()
    ]
