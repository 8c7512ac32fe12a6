"""The through-time view: how the gradient reaching each time step of a recurrent layer changes with its
distance from the loss (Bengio et al. 1994; Pascanu et al. 2013: the largest singular value of W_hh below
1/gamma is sufficient for it to vanish). Steps are a recurrent net's depth, so the same thresholds apply as
to the signal view's chain of layers; a gradient that reaches the first steps as exactly 0 (float32
underflow) is an error whatever the factor."""

from __future__ import annotations

import math

from gradcheck_cli.diagnose.common import Context, level, times
from gradcheck_cli.report import Finding, Layer
from gradcheck_cli.series import theil_sen_slope


def through_time(context: Context) -> list[Finding]:
    findings = []
    for layer in context.layers:
        norms = layer.time_grad_norms
        if not norms or len(norms) < context.thresholds.min_chain or not _usable(norms[-1]):
            continue
        finding = _judge(layer, norms, context)
        if finding is not None:
            findings.append(finding)
    return findings


def _usable(value: float) -> bool:
    return math.isfinite(value) and value > 0


def _judge(layer: Layer, norms: tuple[float, ...], context: Context) -> Finding | None:
    thresholds = context.thresholds
    points = [(float(t), math.log10(n)) for t, n in enumerate(norms) if _usable(n)]
    slope = theil_sen_slope([x for x, _ in points], [y for _, y in points]) if len(points) >= 2 else None
    steps = len(norms)
    # Toward the first step, each step multiplies the gradient by `gain`.
    gain = 10 ** (-slope) if slope is not None else 0.0
    zero = [t for t, n in enumerate(norms) if n == 0]
    if zero and zero[0] == 0:
        message = (
            f"the gradient reaching the first {len(zero)} of {steps} time steps is exactly 0 in float32"
            + (f" (x{gain:.3g} per step toward them)" if slope is not None else "")
            + ": nothing the model reads there can influence what it learns"
        )
        return Finding(layer.name, "vanishing", "error", "time", message, _fix("vanishing"), 0.0)
    if slope is None:
        return None
    total = gain ** (steps - 1)
    severity = level(max(total, 1 / total), thresholds.signal_warning, thresholds.signal_error)
    if severity is None:
        return None
    kind = "vanishing" if total < 1 else "exploding"
    direction = "smaller" if kind == "vanishing" else "larger"
    message = (
        f"the gradient reaching the first time step is {times(total)} {direction} than at the last: "
        f"x{gain:.3g} per step over {steps} steps"
    )
    return Finding(layer.name, kind, severity, "time", message, _fix(kind), total)


def _fix(kind: str) -> str:
    if kind == "vanishing":
        return (
            "gradients decay through time: use nn.LSTM/nn.GRU (forget-gate bias 1), orthogonal or identity "
            "W_hh (IRNN: Le et al. 2015), shorter sequences (truncated BPTT), or attention/residual paths"
        )
    return (
        "gradients grow through time: scale W_hh to spectral norm < 1 (nn.init.orthogonal_), clip with "
        "torch.nn.utils.clip_grad_norm_, or use nn.LSTM/nn.GRU"
    )
