"""The signal view: how ||dL/dz|| (z = a layer's output) changes along the forward order.

The chain rule multiplies per-layer Jacobians, so a consistent per-layer gain != 1 compounds geometrically
(mean-field chi1; Poole et al. 2016, Schoenholz et al. 2017). This is where vanishing and exploding gradients
live.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from gradcheck_cli.diagnose.common import level, times
from gradcheck_cli.diagnose.thresholds import Thresholds
from gradcheck_cli.report import Finding, Layer, SignalSummary
from gradcheck_cli.series import median, theil_sen_slope

SIGNAL_CATEGORIES = ("linear", "conv", "recurrent", "attention", "embedding", "other")


def signal_view(layers: Sequence[Layer], thresholds: Thresholds) -> tuple[SignalSummary, list[Finding]]:
    chain = sorted(
        (
            layer
            for layer in layers
            if layer.category in SIGNAL_CATEGORIES
            and layer.forward_index is not None
            and layer.output_grad_per_position is not None
            and math.isfinite(layer.output_grad_per_position)
            and layer.output_grad_per_position > 0
        ),
        key=lambda layer: layer.forward_index or 0,
    )
    names = tuple(layer.name for layer in chain)
    if len(chain) < thresholds.min_chain:
        return SignalSummary(names, None, None), []
    xs = [float(i) for i in range(len(chain))]
    ys = [math.log10(layer.output_grad_per_position or 1.0) for layer in chain]
    slope = theil_sen_slope(xs, ys)
    assert slope is not None
    intercept = median([y - slope * x for x, y in zip(xs, ys, strict=True)]) or 0.0
    end = intercept + slope * xs[-1]
    # Toward the input, each layer multiplies ||dL/dz|| by 10**(-slope).
    gain = 10 ** (-slope)
    total = gain ** (len(chain) - 1)
    summary = SignalSummary(names, gain, total)
    findings = []
    trend = abs(math.log10(total))
    for layer, y in zip(chain, ys, strict=True):
        deviation = y - end  # log10 of ||dL/dz|| here over the fitted value at the output end
        kind = "vanishing" if deviation < 0 else "exploding"
        if (deviation < 0) != (total < 1):
            continue  # a layer off the trend's direction is not explained by it
        excess = min(abs(deviation), trend)
        severity = level(10**excess, thresholds.signal_warning, thresholds.signal_error)
        if severity is None:
            continue
        factor = 10**deviation
        direction = "smaller" if kind == "vanishing" else "larger"
        findings.append(
            Finding(
                layer.name,
                kind,
                severity,
                "signal",
                f"dL/dz is {times(factor)} {direction} than at the output end: x{gain:.3g} per layer over "
                f"{len(chain)} layers",
                _signal_fix(kind, layer, chain),
                factor,
            )
        )
    return summary, findings


def _signal_fix(kind: str, layer: Layer, chain: Sequence[Layer]) -> str:
    saturated = [c.saturated_fraction for c in chain if c.saturated_fraction is not None]
    if kind == "vanishing":
        if saturated and (median(saturated) or 0) > 0.2:
            return (
                "activations saturate: use nn.ReLU/nn.GELU with nn.init.kaiming_normal_, or put nn.LayerNorm/"
                "nn.BatchNorm before the sigmoid/tanh; residual connections keep the signal over depth"
            )
        return (
            "weights too small for gain 1: nn.init.xavier_normal_ (tanh), nn.init.kaiming_normal_ (ReLU) or "
            "nn.init.orthogonal_; add normalization layers or residual connections"
        )
    return (
        "weights too large for gain 1: re-initialise with nn.init.xavier_normal_ / kaiming_normal_ / "
        "orthogonal_, add normalization layers; clip with torch.nn.utils.clip_grad_norm_ while training"
    )
