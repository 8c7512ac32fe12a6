"""--plot FILE.png|.svg: the gradient-flow figure, drawn from the report alone (no tensors, no torch).

Left, the two views along the forward order on log axes: ‖dL/dz‖ per position (signal view) and ‖g‖/‖W‖
(update view), one dot per step and a marker for the median, flagged layers in orange (warning) or red (error)
with the kind written beside them. Right, per-layer histograms: log10 |g| on one axis shared by every layer
(the table's sparkline, in full), and, when the report has them, the tutorial's signed-value histograms per
step. Past SMALL_MULTIPLES layers the log10 |g| histograms become one heat map, which stays readable at any
depth.

matplotlib is an optional extra; the figure is built with the object API (no pyplot), so no global backend
is chosen and nothing opens a window.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradcheck_cli.errors import UserError
from gradcheck_cli.files import check_file_option, replace_atomic
from gradcheck_cli.gate import Gate
from gradcheck_cli.render.common import display_name, verdict_line
from gradcheck_cli.render.plot_histograms import COLOR, STEP_COLOR, heat_map, severity, small_multiples
from gradcheck_cli.render.rows import in_forward_order
from gradcheck_cli.report import Finding, Layer, Report

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

SUFFIXES = (".png", ".svg")
SMALL_MULTIPLES = 16  # layers up to which each gets its own histogram row
MAX_TICK_LABELS = 40  # x labels beyond this are thinned to every k-th layer
MIN_DECADES = 2.0  # the least range a log axis of the views shows
MAX_HEIGHT = 14.0  # inches; deeper models get thinner heat-map rows

INSTALL_HINT = 'pip install "gradcheck-cli[plot]"'


def check(path: Path) -> None:
    """Refuse a bad --plot before any pass runs: wrong suffix, missing folder, matplotlib not installed."""
    check_file_option(
        "--plot", path, SUFFIXES, (f"unknown image type '{path.suffix}'", "use .png or .svg"), "gradients.png"
    )
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("--plot needs matplotlib", INSTALL_HINT) from None


def save(report: Report, path: Path, gate: Gate) -> None:
    """Draw the figure and write it atomically; the format follows the suffix."""
    figure = build(report, gate)
    replace_atomic(path, lambda name: figure.savefig(name, dpi=110, format=path.suffix.lower().lstrip(".")))


def build(report: Report, gate: Gate) -> Figure:
    from matplotlib.figure import Figure

    ordered = in_forward_order(report.layers)
    flow = [layer for layer in ordered if layer.forward_index is not None and _in_views(report, layer)]
    small = len(ordered) <= SMALL_MULTIPLES
    has_values = small and any(layer.value_histograms for layer in ordered)
    rows = max(len(ordered), 1)
    height = max(7.5, 0.62 * rows + 2.2) if small else min(MAX_HEIGHT, max(7.5, 0.16 * rows + 3.0))
    trained = report.training is not None and report.training.steps > 0
    if trained:
        height = max(height, 12.0)
    width = 19.0 if has_values else 16.0
    figure = Figure(figsize=(width, height), layout="constrained")
    figure.suptitle(
        f"gradcheck: {report.model}"
        + (f"  ({report.target})" if report.target else "")
        + f"\n{verdict_line(report, gate)}",
        fontsize=12,
        color=COLOR["error"] if gate.failing else "black",
    )
    panels: Any = figure.subfigures(1, 2, width_ratios=[1.0, 1.25 if has_values else 0.9], wspace=0.02)
    left, right = panels[0], panels[1]
    if trained:
        from gradcheck_cli.render.plot_training import training_panels

        signal_axes, update_axes, loss_axes, step_axes = left.subplots(4, 1, height_ratios=[1, 1, 0.8, 0.8])
        update_axes.sharex(signal_axes)
        step_axes.sharex(loss_axes)
        training_panels(loss_axes, step_axes, report)
    else:
        signal_axes, update_axes = left.subplots(2, 1, sharex=True)
    _signal_view(signal_axes, report, flow)
    _update_view(update_axes, report, flow)
    _layer_ticks(update_axes, flow)
    if not ordered:
        return figure
    if small:
        small_multiples(right, report, ordered, has_values)
    else:
        heat_map(right, report, ordered)
    return figure


# -- left: the two views ----------------------------------------------------------------------------------


def _in_views(report: Report, layer: Layer) -> bool:
    """What the views compare (normalisation layers are left out of both, see diagnose), and anything flagged."""
    compared = set(report.signal.chain) | set(report.update.layers)
    return not compared or layer.name in compared or layer.severity is not None


def _view_findings(report: Report, layer: Layer, views: Sequence[str]) -> list[Finding]:
    return [f for f in report.findings if f.covers(layer.name) and f.view in views]


def _viewseverity(report: Report, layer: Layer, views: Sequence[str]) -> str:
    """A point's colour in one view: that view's finding on the layer, not the layer's overall status (a
    layer flagged by the signal view sits in the update view as it measured there)."""
    severities = {f.severity for f in _view_findings(report, layer, views)}
    if severities:
        return "error" if "error" in severities else "warning"
    return "inactive" if severity(layer) == "inactive" else "ok"


def _trend_line(axes: Axes, report: Report, layers: Sequence[Layer]) -> None:
    """The fitted per-layer gain the signal verdict rests on, through the chain's median points."""
    gain, chain = report.signal.gain_per_layer, report.signal.chain
    position = {layer.name: x for x, layer in enumerate(layers)}
    points = [
        (k, position[name], y)
        for k, name in enumerate(chain)
        if name in position and (y := layers[position[name]].output_grad_per_position) is not None and _positive(y)
    ]
    if gain is None or len(points) < 2:
        return
    slope = -math.log10(gain)  # log10 ||dL/dz|| per chain position, toward the output
    offset = sorted(math.log10(y) - slope * k for k, _, y in points)[len(points) // 2]
    xs = [x for _, x, _ in points]
    ys = [10 ** (offset + slope * k) for k, _, _ in points]
    axes.plot(xs, ys, color="#222222", linestyle="--", linewidth=1.1, zorder=2, label=f"fit: ×{gain:.3g} per layer")


def _draw_view(
    axes: Axes,
    report: Report,
    layers: Sequence[Layer],
    median: Callable[[Layer], float | None],
    steps: Callable[[Layer], Sequence[float | None]],
    views: Sequence[str],
    compared: Sequence[str],
    hollow: Callable[[Layer], bool] = lambda layer: False,
) -> None:
    """One view: the layers it compares (all when it compares none) and those it flagged. Per-step values as
    small dots, the median as a marker coloured by the layer's verdict; exact zeros as triangles on the floor."""
    from matplotlib.transforms import blended_transform_factory

    points: list[tuple[int, float, Layer]] = []
    zeros: list[tuple[int, Layer]] = []
    step_points: list[tuple[int, float]] = []
    for x, layer in enumerate(layers):
        if compared and layer.name not in compared and not _view_findings(report, layer, views):
            continue
        step_points += [(x, v) for v in steps(layer) if v is not None and _positive(v)]
        value = median(layer)
        if value is not None and _positive(value):
            points.append((x, value, layer))
        elif value == 0:
            zeros.append((x, layer))
    if not points and not zeros:
        axes.text(0.5, 0.5, "nothing to show", transform=axes.transAxes, ha="center", color="#777777")
        axes.set_yticks([])
        return
    if step_points:
        axes.scatter(
            [x for x, _ in step_points], [y for _, y in step_points], s=9, color=STEP_COLOR, zorder=2, linewidths=0
        )
    axes.set_yscale("log")
    if points:
        xs = [x for x, _, _ in points]
        ys = [y for _, y, _ in points]
        axes.plot(xs, ys, color="#777777", linewidth=1, zorder=1)
        for x, y, layer in points:
            color = COLOR[_viewseverity(report, layer, views)]
            axes.scatter(
                x, y, s=42, zorder=3, color="white" if hollow(layer) else color, edgecolors=color, linewidths=1.2
            )
        # At least MIN_DECADES in view: on a log axis a flat profile must look flat, not like noise blown up;
        # and headroom for the labels.
        low, high = axes.get_ylim()
        centre = math.sqrt(min(ys) * max(ys))
        half = 10 ** (MIN_DECADES / 2)
        axes.set_ylim(min(low, centre / half), max(high, centre * half) * 2)
    else:
        axes.set_yticks([], minor=False)
        axes.set_yticks([], minor=True)
    floor = blended_transform_factory(axes.transData, axes.transAxes)
    for x, layer in zeros:
        color = COLOR[_viewseverity(report, layer, views)]
        axes.scatter(x, 0.03, s=46, marker="v", color=color, transform=floor, zorder=3, clip_on=False)
        axes.annotate("0", (x, 0.03), xycoords=floor, xytext=(5, -3), textcoords="offset points", fontsize=7.5)
    _label_runs(
        axes, report, views, [(x, y, layer) for x, y, layer in points] + [(x, None, layer) for x, layer in zeros]
    )
    axes.grid(True, which="major", axis="y", alpha=0.3)
    axes.set_xlim(-0.6, max(len(layers) - 0.4, 0.6))


def _label_runs(
    axes: Axes, report: Report, views: Sequence[str], points: list[tuple[int, float | None, Layer]]
) -> None:
    """The finding kinds beside flagged points; a run of neighbours with the same kinds is labelled once."""
    from matplotlib.transforms import blended_transform_factory

    floor = blended_transform_factory(axes.transData, axes.transAxes)
    previous: tuple[tuple[str, str], int] = (("", ""), -2)
    for x, y, layer in sorted(points, key=lambda point: point[0]):
        findings = _view_findings(report, layer, views)
        text = " ".join(sorted({f.kind for f in findings}))
        worst = "error" if any(f.severity == "error" for f in findings) else "warning"
        if text and ((text, worst) != previous[0] or x != previous[1] + 1):
            axes.annotate(
                text,
                (x, y) if y is not None else (x, 0.03),
                xycoords="data" if y is not None else floor,
                xytext=(5, 7 if y is not None else 8),
                textcoords="offset points",
                fontsize=8,
                color=COLOR[worst],
                fontweight="bold",
            )
        previous = ((text, worst), x)


def _signal_view(axes: Axes, report: Report, layers: Sequence[Layer]) -> None:
    _draw_view(
        axes,
        report,
        layers,
        lambda layer: layer.output_grad_per_position,
        lambda layer: layer.output_grad_per_position_steps,
        ("signal", "activation", "numeric", "usage"),
        report.signal.chain,
    )
    _trend_line(axes, report, layers)
    signal = report.signal
    if signal.gain_per_layer is not None and signal.total_factor is not None:
        trend = (
            f": ×{signal.gain_per_layer:.2f} per layer toward the input over {len(signal.chain)} layers "
            f"(×{signal.total_factor:.3g} in all)"
        )
    else:
        trend = f": too few layers ({len(signal.chain)}) for a per-layer gain"
    axes.set_title(f"signal view{trend}", fontsize=10, loc="left")
    axes.set_ylabel("‖dL/dz‖ per position")
    _legend(axes)


def _update_view(axes: Axes, report: Report, layers: Sequence[Layer]) -> None:
    measured = report.update.quantity == "update_ratio" and report.training is not None
    training = report.training

    def steps_of(layer: Layer) -> tuple[float | None, ...]:
        found = training.layer(layer.name) if training is not None else None
        return found.update_ratio if found is not None else ()

    _draw_view(
        axes,
        report,
        layers,
        (lambda layer: layer.update_ratio) if measured else (lambda layer: layer.grad_to_weight),
        steps_of if measured else (lambda layer: layer.grad_to_weight_steps),
        ("update",),
        report.update.layers,
        hollow=lambda layer: layer.feeds_norm,
    )
    if any(layer.feeds_norm for layer in layers if layer.name in report.update.layers):
        from matplotlib.lines import Line2D

        marker = Line2D([], [], marker="o", linestyle="", markerfacecolor="white", color=COLOR["ok"], markersize=7)
        axes.legend(
            [marker],
            ["feeds a norm layer:\nscale-invariant,\nnot judged"],
            fontsize=7.5,
            loc="upper left",
            bbox_to_anchor=(1.005, 1.0),
            borderaxespad=0,
        )
    median = report.update.median_grad_to_weight
    if _positive(median):
        assert median is not None
        axes.axhline(median, color="#555555", linestyle="--", linewidth=0.9)
        axes.annotate(
            "median", (1.0, median), xycoords=("axes fraction", "data"), fontsize=7.5, ha="right", va="bottom"
        )
        warning = report.thresholds.get("balance_warning")
        if warning and warning > 0 and axes.get_yscale() == "log":
            low, high = axes.get_ylim()
            axes.set_ylim(min(low, median / warning / 2), high)  # show how far the layers are from warning
        for key, label in (("balance_warning", "warning"), ("balance_error", "error")):
            factor = report.thresholds.get(key)
            if factor and factor > 0 and axes.get_yscale() == "log" and median / factor > axes.get_ylim()[0]:
                axes.axhline(median / factor, color=COLOR[label], linestyle=":", linewidth=0.9)
                axes.annotate(
                    f"{label}: median/{factor:g}",
                    (1.0, median / factor),
                    xycoords=("axes fraction", "data"),
                    fontsize=7.5,
                    ha="right",
                    va="bottom",
                    color=COLOR[label],
                )
    summary = f": median {median:.3g} over {len(report.update.layers)} weight layers" if median is not None else ""
    what = (
        "(the update each watched optimizer step made, ‖ΔW‖/‖W‖; dots: single steps)"
        if measured
        else f"(one SGD step at lr {report.lr:g} moves a layer's weights by lr × ‖g‖/‖W‖ of their norm)"
    )
    axes.set_title(f"update view{summary}\n{what}", fontsize=10, loc="left")
    axes.set_ylabel("‖ΔW‖/‖W‖ per step" if measured else "‖g‖/‖W‖")
    axes.set_xlabel("layers in forward order (input → output)")


def _legend(axes: Axes) -> None:
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], marker="o", linestyle="", color=COLOR[key], label=label, markersize=7)
        for key, label in (
            ("ok", "ok"),
            ("warning", "warning"),
            ("error", "error"),
            ("inactive", "frozen/unused/gated/unjudged"),
        )
    ]
    handles.append(Line2D([], [], marker="o", linestyle="", color=STEP_COLOR, label="single steps", markersize=4))
    handles.append(Line2D([], [], marker="v", linestyle="", color="#555555", label="exactly 0", markersize=6))
    handles += [line for line in axes.get_lines() if str(line.get_label()).startswith("fit:")]
    # beside the axes, never over the points
    axes.legend(handles=handles, fontsize=7.5, loc="upper left", bbox_to_anchor=(1.005, 1.0), borderaxespad=0)


def _layer_ticks(axes: Axes, layers: Sequence[Layer]) -> None:
    every = max(1, math.ceil(len(layers) / MAX_TICK_LABELS))
    positions = list(range(0, len(layers), every))
    axes.set_xticks(positions)
    size = 8 if len(positions) <= 20 else 6.5
    labels = axes.set_xticklabels([display_name(layers[i]) for i in positions], rotation=60, ha="right", fontsize=size)
    for label, i in zip(labels, positions, strict=True):
        label.set_color(COLOR[severity(layers[i])] if layers[i].severity else "black")


def _positive(value: float | None) -> bool:
    return value is not None and math.isfinite(value) and value > 0
