"""Formatting shared by every renderer: numbers, factors, sparklines, summary lines."""

from __future__ import annotations

import math
from collections.abc import Sequence

from gradcheck_cli.gate import Gate
from gradcheck_cli.kinds import KIND_BY_NAME
from gradcheck_cli.report import Finding, Layer, Report
from gradcheck_cli.series import histogram_edges

SPARK = " ▁▂▃▄▅▆▇█"
SPARK_WIDTH = 16


def number(value: float | None, digits: int = 1) -> str:
    """Compact scientific formatting: 0.0123 -> '1.2e-02'; None -> '-'."""
    if value is None:
        return "-"
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if value == 0:
        return "0"
    return f"{value:.{digits}e}"


def count(value: int) -> str:
    """Parameter counts: 1234567 -> '1.2M'."""
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= limit:
            return f"{value / limit:.1f}{suffix}"
    return str(value)


def spread(value: float | None) -> str:
    """max/min over steps as a factor: '1.3x'; '-' with a single step."""
    return "-" if value is None else f"{value:.1f}x"


def percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def display_name(layer: Layer | str) -> str:
    name = layer.name if isinstance(layer, Layer) else layer
    return name or "(model)"


def spark_window(layers: Sequence[Layer]) -> tuple[int, int] | None:
    """The histogram bins where any layer has mass: one shared axis, so rows compare by position."""
    low, high = None, None
    for layer in layers:
        if not layer.histogram:
            continue
        used = [i for i, c in enumerate(layer.histogram) if c > 0]
        if used:
            low = used[0] if low is None else min(low, used[0])
            high = used[-1] if high is None else max(high, used[-1])
    return (low, high) if low is not None and high is not None else None


def sparkline(histogram: Sequence[int] | None, window: tuple[int, int] | None, width: int = SPARK_WIDTH) -> str:
    """log10|g| histogram as block characters over the shared window (left = small gradients)."""
    if not histogram or window is None:
        return ""
    low, high = window
    bins = list(histogram[low : high + 1])
    group = max(1, math.ceil(len(bins) / width))
    merged = [sum(bins[i : i + group]) for i in range(0, len(bins), group)]
    peak = max(merged) or 1
    return "".join(SPARK[0] if c == 0 else SPARK[max(1, round(c / peak * (len(SPARK) - 1)))] for c in merged)


TREND_WIDTH = 16  # characters of a sparkline over training steps: more steps are merged (median per group)


def trend_sparkline(values: Sequence[float | None], width: int = TREND_WIDTH) -> str:
    """Values over steps as block characters on their own log scale (low = the smallest, high = the largest);
    '!' marks a step whose value is not finite, ' ' one without a value."""
    count = min(width, len(values))
    merged: list[float | None] = []
    for index in range(count):
        chunk = values[index * len(values) // count : (index + 1) * len(values) // count]
        if any(v is not None and not math.isfinite(v) for v in chunk):
            merged.append(math.inf)
            continue
        known = sorted(v for v in chunk if v is not None)
        merged.append(known[len(known) // 2] if known else None)
    logs = [math.log10(v) for v in merged if v is not None and math.isfinite(v) and v > 0]
    low, high = (min(logs), max(logs)) if logs else (0.0, 0.0)
    chars = []
    for value in merged:
        if value is None:
            chars.append(" ")
        elif not math.isfinite(value):
            chars.append("!")
        elif value <= 0:
            chars.append(".")
        else:
            level = (math.log10(value) - low) / (high - low) if high > low else 0.5
            chars.append(SPARK[1 + round(level * (len(SPARK) - 2))])
    return "".join(chars)


def fraction_sparkline(values: Sequence[float | None], width: int = TREND_WIDTH) -> str:
    """Fractions over steps as block characters on a fixed 0..1 scale ('.' for 0, ' ' without a value)."""
    count = min(width, len(values))
    chars = []
    for index in range(count):
        chunk = sorted(
            v for v in values[index * len(values) // count : (index + 1) * len(values) // count] if v is not None
        )
        if not chunk:
            chars.append(" ")
            continue
        value = chunk[len(chunk) // 2]
        chars.append("." if value <= 0 else SPARK[max(1, round(min(value, 1.0) * (len(SPARK) - 1)))])
    return "".join(chars)


def spark_axis(window: tuple[int, int] | None) -> str:
    """The sparkline's range in words, e.g. '|g| 1e-09 .. 1e-01'."""
    if window is None:
        return ""
    edges = histogram_edges()
    return f"|g| 1e{edges[window[0]]:+.0f} .. 1e{edges[window[1] + 1]:+.0f}"


def status_text(layer: Layer, findings: Sequence[Finding]) -> str:
    """'vanishing 830x [signal]' style: the status, how bad (a factor or a fraction), and which view said so."""
    kind = KIND_BY_NAME.get(layer.status)
    if kind is None or kind.name == "unused":  # ok, frozen; unused says it all
        return layer.status
    mine = [f for f in findings if f.covers(layer.name) and f.kind == layer.status]
    worst = min(mine, key=lambda f: (f.severity != "error", f.layer != layer.name)) if mine else None
    if worst is None:
        return layer.status
    factor = worst.factor if worst.layer == layer.name else None  # a trend's other layers: its factor is not theirs
    if factor is None or (kind.amount != "fraction" and not factor > 0):  # 0: a gradient that is exactly 0
        return f"{layer.status} [{worst.view}]"
    if kind.amount == "fraction":
        return f"{layer.status} {factor:.0%} [{worst.view}]"
    shown = factor if factor >= 1 else 1 / factor
    amount = f"{shown:.0f}x" if shown < 1e4 else f"{shown:.0e}x"
    return f"{layer.status} {amount} [{worst.view}]"


def grouped(findings: Sequence[Finding]) -> list[tuple[list[Finding], str]]:
    """Consecutive findings that share a fix, so each fix is printed once under its group."""
    groups: list[tuple[list[Finding], str]] = []
    for finding in findings:
        if groups and groups[-1][1] == finding.fix:
            groups[-1][0].append(finding)
        else:
            groups.append(([finding], finding.fix))
    return groups


def signal_line(report: Report) -> str:
    signal = report.signal
    if signal.gain_per_layer is None:
        return (
            f"signal view: no per-layer gain: {len(signal.chain)} layers with dL/dz, too few of them the same role "
            "at other depths"
        )
    gates = signal.beyond_gates_gain
    in_chain = set(signal.chain)
    depths = [layer.depth for layer in report.layers if layer.name in in_chain]
    deep = len(set(depths)) if None not in depths else len(signal.chain)
    span = f"{len(signal.chain)} layers" + (f", {deep} deep" if deep != len(signal.chain) else "")
    extras = [f"x{signal.total_factor:.3g} in all"]
    if gates:
        extras.append(f"x{gates:.2f} per layer beyond the LSTM/GRU gates at their neutral point, judged")
    if signal.input_scale_gain:
        extras.append(
            f"x{signal.input_scale_gain:.2f} per layer with each layer's dL/dz taken at its input's scale below unit "
            "RMS, judged: a normalised branch's gradient follows 1/RMS of the stream it reads"
        )
    if signal.weight_gradient_gain:
        extras.append(
            f"dL/dz x input RMS x{signal.weight_gradient_gain:.2f} per layer: the weights' gradients follow it past "
            "the trainable depth of a plain network"
        )
    return (
        f"signal view: ||dL/dz|| x{signal.gain_per_layer:.2f} per layer toward the input over {span} "
        f"({'; '.join(extras)})"
    )


def update_line(report: Report) -> str:
    update = report.update
    if update.median_grad_to_weight is None:
        return "update view: no weight layers to compare"
    if update.quantity == "update_ratio":
        return (
            f"update view: median ||dW||/||W|| {update.median_grad_to_weight:.3g} per watched step over "
            f"{len(update.layers)} weight layers (the updates the optimizer made)"
        )
    return (
        f"update view: median ||g||/||W|| {update.median_grad_to_weight:.3g} over {len(update.layers)} weight layers "
        f"(one SGD step at lr {report.lr:g} moves weights by {report.lr * update.median_grad_to_weight:.2g}x)"
    )


def run_header(report: Report) -> str:
    """How many passes, after what: '3 step(s) after 20 watched adamw steps'."""
    training = report.training
    if training is None:
        return f"{report.steps} step(s)"
    name = training.optimizer.split(" (")[0]
    taken = f"{training.steps} of {report.train_steps}" if training.steps < report.train_steps else f"{training.steps}"
    return f"{report.steps} step(s) after {taken} watched {name} step(s)"


def training_line(report: Report) -> str | None:
    """The watched run in one line: optimizer, loss first -> last, gradient norm, clipping, how it ended."""
    run = report.training
    if run is None or not run.steps:
        return None
    finite = sorted(n for n in run.grad_norm if math.isfinite(n))
    norms = f"gradient norm {finite[0]:.3g}..{finite[-1]:.3g} (median {finite[len(finite) // 2]:.3g})" if finite else ""
    parts = [
        f"training: {run.steps} step(s) of {run.optimizer}",
        f"loss {run.loss[0]:.4g} -> {run.loss[-1]:.4g}",
        norms,
    ]
    if run.clip is not None:
        parts.append(f"--clip {run.clip:g} acted on {sum(run.clipped)} of {run.steps} steps")
    if run.loss_scale is not None:
        parts.append(f"loss scale {run.loss_scale[0]:g} -> {run.loss_scale[-1]:g}, {sum(run.skipped)} step(s) skipped")
    if run.nan_step is not None:
        parts.append(f"stopped at step {run.nan_step + 1}: NaN/Inf (the measured passes ran on the weights before it)")
    return "; ".join(part for part in parts if part)


EVOLUTION_SHOWN = 6  # layers named in the evolution line: all of a small model, else the largest changes


def evolution_line(report: Report) -> str | None:
    """How each layer's gradient changed over the watched run: ||g|| over its first and its last tenth of
    steps (medians), the tutorial's histograms compared between the start and the end of training."""
    run = report.training
    if run is None or run.steps < 2:
        return None
    part = max(1, run.steps // 10)
    changes = []
    for index, layer in enumerate(run.layers):
        first = sorted(v for v in layer.grad_norm[:part] if v is not None and math.isfinite(v))
        last = sorted(v for v in layer.grad_norm[-part:] if v is not None and math.isfinite(v))
        if first and last and first[len(first) // 2] > 0 and last[len(last) // 2] > 0:
            start, end = first[len(first) // 2], last[len(last) // 2]
            changes.append((index, layer.name or "(model)", start, end))
    if not changes:
        return None
    if len(changes) > EVOLUTION_SHOWN:
        changes = sorted(changes, key=lambda c: -abs(math.log(c[3] / c[2])))[:EVOLUTION_SHOWN]
        changes.sort()
    shown = ", ".join(f"{name} {start:.2g} -> {end:.2g}" for _, name, start, end in changes)
    head = "||g|| at the start -> the end of the watched run"
    return f"{head}{'' if len(changes) == len(run.layers) else ' (largest changes)'}: {shown}"


def coverage_line(report: Report) -> str | None:
    """Which layers the views compared, and which weight layers none could (status unjudged): a layer that
    reads ok was compared; one that reads unjudged was only checked for NaN/Inf and all-zero gradients."""
    unjudged = [layer for layer in report.layers if layer.status == "unjudged" and not layer.side_output]
    if not unjudged:
        return None
    counts = {view: sum(view in layer.views for layer in report.layers) for view in ("signal", "update", "time")}
    compared = ", ".join(f"{view} view {count}" for view, count in counts.items() if count)
    names = ", ".join(display_name(layer) for layer in unjudged[:3]) + (", ..." if len(unjudged) > 3 else "")
    head = f"layers compared: {compared}" if compared else "no view compared any layer"
    return (
        f"{head}; {len(unjudged)} weight layer(s) compared by none, checked only for NaN and all-zero "
        f"gradients (status unjudged: {names})"
    )


def verdict_line(report: Report, gate: Gate) -> str:
    errors = sum(f.severity == "error" for f in report.findings)
    warnings = sum(f.severity == "warning" for f in report.findings)
    # A run whose views judged nothing must not read as a clean bill of health (diagnose.views.unjudged).
    unjudged = any(f.kind == "unjudged" for f in report.findings)
    head = "FAIL" if gate.failing else ("UNJUDGED" if unjudged else "PASS")
    return f"{head}: {errors} error(s), {warnings} warning(s); {len(gate.failing)} failing ({gate.options()})"
