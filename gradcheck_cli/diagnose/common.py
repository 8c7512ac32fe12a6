"""What every rule shares: the input they read (Context), severities against thresholds, factors in words."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from gradcheck_cli.diagnose.thresholds import Thresholds
from gradcheck_cli.report import Finding, Layer, NanOrigin, ParameterRecord, SignalSummary, Training, UpdateSummary

LOSS_LAYER = "<loss>"


@dataclass(frozen=True)
class Context:
    """What the rules judge: the measured layers, the run's settings, and the two views (summary and
    findings over the steps' medians), computed once since several rules read them."""

    layers: Sequence[Layer]
    loss: Sequence[float | None]
    thresholds: Thresholds
    nan_origin: NanOrigin | None
    lr: float
    amp: str | None
    signal: tuple[SignalSummary, list[Finding]]
    update: tuple[UpdateSummary, list[Finding]]
    training: Training | None = None  # --train-steps: the watched run (diagnose/training.py)


def level(value: float, warning: float, error: float) -> str | None:
    """Severity of a value measured against (warning, error) thresholds, larger is worse."""
    if not math.isfinite(value):
        return "error"
    if value >= error:
        return "error"
    if value >= warning:
        return "warning"
    return None


def times(factor: float) -> str:
    """A factor the way people say it: 1.2e-03 -> '830x', 25 -> '25x'."""
    if factor <= 0 or not math.isfinite(factor):
        return str(factor)
    value = factor if factor >= 1 else 1 / factor
    text = f"{value:.0f}x" if value < 1e4 else f"{value:.1e}x"
    return text


def got_no_gradient(layer: Layer) -> bool:
    """A trainable layer that owns its tensors and got no gradient in any step (unused, or an auxiliary head)."""
    return layer.alias_of is None and bool(layer.trainable_params) and all(v is None for v in layer.grad_norm_steps)


def all_zero(record: Layer | ParameterRecord) -> bool:
    """Whether a layer's (a tensor's) gradient was exactly 0 in every measured step that gave it one."""
    got = [v for v in record.grad_norm_steps if v is not None]
    return bool(got) and all(v == 0 for v in got)
