"""The through-time view: how the gradient reaching each time step of a recurrent layer changes with its
distance from the loss (Bengio et al. 1994; Pascanu et al. 2013: the largest singular value of W_hh below
1/gamma is sufficient for it to vanish). Steps are a recurrent net's depth, so the same thresholds apply as
to the signal view's chain of layers; a gradient that reaches the first steps as exactly 0 (float32
underflow) is an error whatever the factor.

Gated cells (LSTM, GRU) decay by design at initialisation: the cell state's gain per step is the forget
(GRU: update) gate, which learns to open from the gradient of the steps near the loss (Gers et al. 2000). A
gate at its neutral point, sigmoid(0) = 1/2, gives x0.5 per step, and PyTorch's default init puts every gate
there (biases ~0); the recommended forget-gate bias of 1 (Jozefowicz et al. 2015) gives 0.73, still a decay.
So a gated layer losing at most half its gradient per step is not a finding (a note says how far its memory
reaches at init); a faster decay means gates held closed (negative biases, saturating weights), judged as
any recurrence. Growth through time is judged alike for every recurrent layer."""

from __future__ import annotations

import math
from collections.abc import Sequence

from gradcheck_cli.diagnose.common import Context, level, times
from gradcheck_cli.diagnose.thresholds import Thresholds
from gradcheck_cli.report import Finding, Layer
from gradcheck_cli.series import theil_sen_slope


def through_time(context: Context) -> list[Finding]:
    findings = []
    loops: dict[int, list[Layer]] = {}
    for layer in context.layers:
        norms = layer.time_grad_norms
        if not norms or len(norms) < context.thresholds.min_chain or not _usable(norms[-1]):
            continue
        if layer.loop_over_depth:
            loops.setdefault(len(norms), []).append(layer)
            continue
        finding = _judge(layer, norms, context)
        if finding is not None:
            findings.append(finding)
    for block in loops.values():
        finding = _judge_block(block, context.thresholds)
        if finding is not None:
            findings.append(finding)
    return findings


def _judge_block(block: Sequence[Layer], thresholds: Thresholds) -> Finding | None:
    """A block applied again to its own result (loop_over_depth: ALBERT's one shared layer) is one chain of
    calls, as a stack of distinct blocks is one chain of layers: its layers' per-call norms are fitted together
    (Theil-Sen over pairs of calls of one layer, as the signal view fits roles), so that one role differing by
    design across depth (a query projection at near-uniform attention) does not set the verdict alone. One
    finding, on the block's first layer, covering the rest."""
    usable = [
        (float(t), math.log10(n), layer.name)
        for layer in block
        for t, n in enumerate(layer.time_grad_norms or ())
        if _usable(n)
    ]
    slope = theil_sen_slope([x for x, _, _ in usable], [y for _, y, _ in usable], [n for _, _, n in usable])
    if slope is None:
        return None
    calls = len(block[0].time_grad_norms or ())
    gain = 10 ** (-slope)
    if (verdict := _verdict(gain, calls, thresholds)) is None:
        return None
    severity, kind, direction, total = verdict
    message = (
        f"{len(block)} layer(s) applied {calls} times to their own result (weights shared across depth): the "
        f"gradient reaching the first call is {times(total)} {direction} than at the last, x{gain:.3g} per call"
    )
    fix = (
        "the shared block shrinks the gradient at each application: residual connections and normalisation "
        "around it (as ALBERT's), or fewer applications"
        if kind == "vanishing"
        else "the shared block amplifies the gradient at each application: scale its weights down, normalise "
        "around it, clip with torch.nn.utils.clip_grad_norm_"
    )
    also = tuple(layer.name for layer in block[1:])
    return Finding(block[0].name, kind, severity, "time", message, fix, total, also)


# The per-step gain of a gated cell whose forget/update gate sits at its neutral point: sigmoid(0).
NEUTRAL_GATE = 0.5


def gated_memory_notes(layers: Sequence[Layer], thresholds: Thresholds) -> list[str]:
    """A note per gated recurrent layer whose decay through time was not judged but would have been flagged
    in a plain recurrence (see the module docstring)."""
    notes = []
    for layer in layers:
        norms = layer.time_grad_norms or ()
        gain = _gain(norms) if layer.time_gated and len(norms) >= thresholds.min_chain else None
        if gain is None or not NEUTRAL_GATE <= gain < 1 or gain ** (len(norms) - 1) > 1 / thresholds.signal_warning:
            continue
        notes.append(
            f"{layer.name} ({layer.type}): the gradient halves every {math.log(2) / -math.log(gain):.2g} time "
            f"steps toward the first (x{gain:.3g} per step), by design at init: gates at their neutral point "
            f"(sigmoid(0)) give x0.5 and learn to open from the steps near the loss; not a finding"
        )
    return notes


def _gain(norms: tuple[float, ...] | None) -> float | None:
    """The fitted factor per step toward the first step (Theil-Sen on log10 of the usable norms)."""
    points = [(float(t), math.log10(n)) for t, n in enumerate(norms or ()) if _usable(n)]
    slope = theil_sen_slope([x for x, _ in points], [y for _, y in points]) if len(points) >= 2 else None
    return None if slope is None else float(10 ** (-slope))


def _usable(value: float) -> bool:
    return math.isfinite(value) and value > 0


def _judge(layer: Layer, norms: tuple[float, ...], context: Context) -> Finding | None:
    thresholds = context.thresholds
    fitted = _gain(norms)
    steps = len(norms)
    # Toward the first step, each step multiplies the gradient by `gain`.
    gain = fitted if fitted is not None else 0.0
    if layer.time_gated and NEUTRAL_GATE <= gain <= 1:
        return None  # gates at or above neutral: a decay by design that the gates learn away (docstring)
    zero = [t for t, n in enumerate(norms) if n == 0]
    if zero and zero[0] == 0:
        message = (
            f"the gradient reaching the first {len(zero)} of {steps} time steps is exactly 0 in float32"
            + (f" (x{gain:.3g} per step toward them)" if fitted is not None else "")
            + ": nothing the model reads there can influence what it learns"
        )
        return Finding(layer.name, "vanishing", "error", "time", message, _fix("vanishing", layer.time_gated), 0.0)
    if fitted is None:
        return None
    if (verdict := _verdict(gain, steps, thresholds)) is None:
        return None
    severity, kind, direction, total = verdict
    message = (
        f"the gradient reaching the first time step is {times(total)} {direction} than at the last: "
        f"x{gain:.3g} per step over {steps} steps"
    )
    return Finding(layer.name, kind, severity, "time", message, _fix(kind, layer.time_gated), total)


def _verdict(gain: float, steps: int, thresholds: Thresholds) -> tuple[str, str, str, float] | None:
    """(severity, kind, direction, factor over the steps) of a gain per step, None below the warning threshold."""
    total = gain ** (steps - 1)
    severity = level(max(total, 1 / total), thresholds.signal_warning, thresholds.signal_error)
    if severity is None:
        return None
    return (severity, "vanishing", "smaller", total) if total < 1 else (severity, "exploding", "larger", total)


def _fix(kind: str, gated: bool) -> str:
    if kind == "vanishing" and gated:
        return (
            "gates held closed: initialise the forget-gate bias to 1 (Jozefowicz et al. 2015) and the other gate "
            "biases to 0, keep W_hh at its default scale or orthogonal, or shorten the sequences (truncated BPTT)"
        )
    if kind == "vanishing":
        return (
            "gradients decay through time: use nn.LSTM/nn.GRU (forget-gate bias 1), orthogonal or identity "
            "W_hh (IRNN: Le et al. 2015), shorter sequences (truncated BPTT), or attention/residual paths"
        )
    return "gradients grow through time: scale W_hh to spectral norm < 1 (nn.init.orthogonal_), clip with " + (
        "torch.nn.utils.clip_grad_norm_" if gated else "torch.nn.utils.clip_grad_norm_, or use nn.LSTM/nn.GRU"
    )
