"""--plot's right panel: per-layer histograms of log10 |g| on one shared axis (the table's sparkline, in full),
and the tutorial's signed-value histograms per step when the report has them; past SMALL_MULTIPLES layers one
heat map, readable at any depth."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from gradcheck_cli.render.common import display_name, spark_window, status_text
from gradcheck_cli.report import Layer, Report
from gradcheck_cli.series import histogram_edges

if TYPE_CHECKING:
    from matplotlib.axes import Axes

MAX_ROW_LABELS = 100  # heat-map row labels beyond this are thinned to every k-th layer
COLOR = {"ok": "#3b75af", "warning": "#f28e2b", "error": "#d62728", "inactive": "#b0b0b0"}
STEP_COLOR = "#9ab7d3"


def severity(layer: Layer) -> str:
    if layer.severity:
        return layer.severity
    return "inactive" if layer.status in ("frozen", "unused", "gated", "unjudged") else "ok"


def _edges(report: Report) -> list[float]:
    if report.histogram_edges:
        return list(report.histogram_edges)
    return histogram_edges()  # a report from before edges were written into it


def _window(report: Report, layers: Sequence[Layer]) -> tuple[int, int] | None:
    window = spark_window(layers)
    if window is None:
        return None
    bins = len(_edges(report)) - 1
    return max(0, window[0] - 1), min(bins - 1, window[1] + 1)


def small_multiples(figure: Any, report: Report, layers: Sequence[Layer], has_values: bool) -> None:
    columns = 2 if has_values else 1
    grid = figure.subplots(len(layers), columns, squeeze=False)
    for row in grid[1:]:
        row[0].sharex(grid[0][0])  # one log10 |g| axis for all; the value histograms each keep their own
    edges = _edges(report)
    window = _window(report, layers)
    for row, layer in enumerate(layers):
        color = COLOR[severity(layer)]
        axes = grid[row][0]
        if layer.histogram and sum(layer.histogram) and window is not None:
            low, high = window
            counts = layer.histogram[low : high + 1]
            total = sum(counts)
            axes.stairs([c / total for c in counts], edges[low : high + 2], fill=True, color=color, alpha=0.75)
        else:
            _empty(axes, _why_empty(layer))
        _row_style(axes, layer, label=True, status=status_text(layer, report.findings))
        if row < len(layers) - 1:
            axes.tick_params(axis="x", labelbottom=False)
        if has_values:
            _value_row(grid[row][1], layer, color)
    if window is not None:
        grid[-1][0].set_xlabel("log10 |g|   (all steps; zeros not shown)")
    grid[0][0].set_title("gradient magnitudes, one axis for all layers", fontsize=10, loc="left")
    if has_values:
        grid[0][1].set_title("gradient values per step (the tutorial's histograms)", fontsize=10, loc="left")
        grid[-1][1].set_xlabel("g   (own axis per layer; log counts; darker = later step)")


def _value_row(axes: Axes, layer: Layer, color: str) -> None:
    histograms = [h for h in layer.value_histograms or () if math.isfinite(h.limit) and h.limit > 0]
    if not histograms:
        _empty(axes, _why_empty(layer))
    for index, histogram in enumerate(histograms):
        shade = 0.35 + 0.65 * (index + 1) / len(histograms)
        axes.stairs([c + 1 for c in histogram.counts], histogram.edges(), color=color, alpha=shade, linewidth=1.0)
    if histograms:
        axes.set_yscale("log")  # heavy tails and a spike at 0 both stay visible (counts + 1, so 0 shows)
        limit = max(h.limit for h in histograms)
        axes.set_xlim(-limit, limit)
        axes.tick_params(axis="x", labelbottom=True, labelsize=6.5)
        axes.ticklabel_format(axis="x", style="sci", scilimits=(-2, 3))
        axes.xaxis.get_offset_text().set_fontsize(6.5)
    _row_style(axes, layer, label=False)


def _why_empty(layer: Layer) -> str:
    if layer.frozen:
        return "frozen: no gradient"
    if layer.grad_norm is None:
        return "no gradient"
    if layer.nonfinite:
        return "NaN/Inf gradients"
    if layer.grad_norm == 0:
        return "every gradient exactly 0"
    return "no histogram"


def _empty(axes: Axes, text: str) -> None:
    axes.text(0.5, 0.35, text, transform=axes.transAxes, ha="center", va="center", fontsize=7.5, color="#555555")
    axes.tick_params(axis="x", labelbottom=False)


def _row_style(axes: Axes, layer: Layer, label: bool, status: str = "") -> None:
    axes.set_yticks([])
    for side in ("top", "right", "left"):
        axes.spines[side].set_visible(False)
    if label:
        axes.set_ylabel(
            display_name(layer) + (f"\n{status}" if status and layer.status != "ok" else ""),
            rotation=0,
            ha="right",
            va="center",
            fontsize=8,
            color=COLOR[severity(layer)] if layer.severity else "black",
        )


def heat_map(figure: Any, report: Report, layers: Sequence[Layer]) -> None:
    axes = figure.subplots(1, 1)
    edges = _edges(report)
    window = _window(report, layers)
    if window is None:
        axes.text(0.5, 0.5, "no gradient histograms", transform=axes.transAxes, ha="center")
        return
    low, high = window
    image = []
    for layer in layers:
        counts = list(layer.histogram[low : high + 1]) if layer.histogram else [0] * (high - low + 1)
        total = sum(counts)
        image.append([c / total if total else math.nan for c in counts])
    mesh = axes.pcolormesh(edges[low : high + 2], range(len(layers) + 1), image, cmap="magma_r", shading="flat")
    axes.invert_yaxis()
    every = max(1, math.ceil(len(layers) / MAX_ROW_LABELS))
    shown = list(range(0, len(layers), every))
    axes.set_yticks([i + 0.5 for i in shown])
    size = min(8.0, max(4.5, 260 / len(shown)))
    labels = axes.set_yticklabels([display_name(layers[i]) for i in shown], fontsize=size)
    for label, i in zip(labels, shown, strict=True):
        if layers[i].severity:
            label.set_color(COLOR[layers[i].severity or "ok"])
    axes.set_xlabel("log10 |g|   (all steps; zeros not shown)")
    axes.set_title("gradient magnitudes per layer (forward order, top = input)", fontsize=10, loc="left")
    figure.colorbar(mesh, ax=axes, label="fraction of the layer's gradient values", shrink=0.6)
