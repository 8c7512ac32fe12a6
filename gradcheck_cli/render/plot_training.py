"""--plot, after --train-steps: the watched run over its steps, below the two views.

The loss (left axis) and the global gradient norm before clipping (right axis, log) per step; the steps
where --clip acted, the spikes and the step that diverged marked where they happened; and, as thin lines,
each weight layer's ||dW||/||W|| (the update the optimizer made), those with a training finding in colour.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

from gradcheck_cli.render.plot_histograms import COLOR
from gradcheck_cli.report import Report, Training

if TYPE_CHECKING:
    from matplotlib.axes import Axes

MAX_LINES = 24  # layers drawn as update lines; more are thinned to every k-th (flagged ones always)
_STEP = re.compile(r"^step (\d+)")


def training_panels(loss_axes: Axes, update_axes: Axes, report: Report) -> None:
    run = report.training
    assert run is not None
    steps = list(range(1, run.steps + 1))
    _loss_and_norm(loss_axes, report, run, steps)
    _updates(update_axes, report, run, steps)


def _loss_and_norm(axes: Axes, report: Report, run: Training, steps: list[int]) -> None:
    loss = [v if math.isfinite(v) else math.nan for v in run.loss]
    axes.plot(steps, loss, color="#333333", linewidth=1.2, label="loss")
    axes.set_ylabel("loss")
    if all(v > 0 for v in loss if math.isfinite(v)) and any(math.isfinite(v) for v in loss):
        axes.set_yscale("log")
    norm_axes = axes.twinx()
    norms = [v if math.isfinite(v) and v > 0 else math.nan for v in run.grad_norm]
    norm_axes.plot(steps, norms, color="#1f77b4", linewidth=1.0, label="gradient norm (before clipping)")
    if any(math.isfinite(v) for v in norms):
        norm_axes.set_yscale("log")
    norm_axes.set_ylabel("‖g‖ before clipping", color="#1f77b4")
    if run.clip is not None:
        norm_axes.axhline(run.clip, color="#888888", linestyle=":", linewidth=0.9)
        clipped = [s for s, c in zip(steps, run.clipped, strict=True) if c]
        norm_axes.plot(
            clipped,
            [run.grad_norm[s - 1] for s in clipped],
            "o",
            color="#888888",
            markersize=3,
            label=f"clipped (--clip {run.clip:g})",
        )
    for finding in report.findings:
        found = _STEP.match(finding.message)
        if finding.view != "training" or found is None:
            continue
        step = int(found.group(1))
        axes.axvline(step, color=COLOR[finding.severity], linestyle="--", linewidth=0.9)
        axes.annotate(
            finding.kind, (step, 1.0), xycoords=("data", "axes fraction"), fontsize=7.5, color=COLOR[finding.severity]
        )
    if run.nan_step is not None:
        axes.axvline(run.nan_step + 1, color=COLOR["error"], linewidth=1.5)
    handles = [
        line for line in axes.get_lines()[:1] + norm_axes.get_lines() if not str(line.get_label()).startswith("_")
    ]
    axes.legend(handles=handles, fontsize=7.5, loc="upper left", bbox_to_anchor=(1.12, 1.0), borderaxespad=0)
    axes.set_title(f"training: {run.steps} watched step(s) of {run.optimizer}", fontsize=10, loc="left")


def _updates(axes: Axes, report: Report, run: Training, steps: list[int]) -> None:
    flagged = {f.layer: f.severity for f in report.findings if f.view in ("training", "update")}
    layers = [layer for layer in run.layers if any(r is not None and r > 0 for r in layer.update_ratio)]
    every = max(1, math.ceil(len(layers) / MAX_LINES))
    drawn = False
    for index, layer in enumerate(layers):
        if layer.name not in flagged and index % every:
            continue
        values = [r if r is not None and math.isfinite(r) and r > 0 else math.nan for r in layer.update_ratio]
        severity = flagged.get(layer.name)
        axes.plot(
            steps,
            values,
            color=COLOR[severity] if severity else COLOR["ok"],
            linewidth=1.2 if severity else 0.6,
            alpha=1.0 if severity else 0.5,
            label=layer.name or "(model)" if severity else None,
        )
        drawn = True
    if drawn:
        axes.set_yscale("log")
    axes.set_ylabel("‖ΔW‖/‖W‖ per step")
    axes.set_xlabel("watched training step")
    if any(line.get_label() and not str(line.get_label()).startswith("_") for line in axes.get_lines()):
        axes.legend(fontsize=7.5, loc="upper left", bbox_to_anchor=(1.005, 1.0), borderaxespad=0)
    axes.set_title("‖ΔW‖/‖W‖: the update each layer's weights got (coloured: a finding)", fontsize=10, loc="left")
