"""The Rich table: which layers, how bad, which view, why, what to do, at a glance."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from gradcheck_cli.render.common import (
    count,
    display_name,
    grouped,
    number,
    percent,
    signal_line,
    spark_axis,
    spark_window,
    sparkline,
    spread,
    status_text,
    update_line,
    verdict_line,
)
from gradcheck_cli.report import Report

STATUS_STYLE = {
    "ok": "green",
    "frozen": "dim",
    "unused": "yellow",
}
SEVERITY_STYLE = {"error": "bold red", "warning": "yellow"}


def build(report: Report, fail_on: Sequence[str], fail_level: str) -> RenderableType:
    """The whole terminal report: header, per-layer table, findings with fixes, verdict line."""
    header = Text()
    header.append(f"gradcheck: {report.model}", style="bold")
    header.append(
        f"  loss {report.loss_name} | {report.steps} step(s)"
        + (f" after {report.train_steps} SGD step(s) at lr {report.lr:g}" if report.train_steps else "")
        + f" | batch {report.batch_size} | {report.device} | {report.mode} mode | seed {report.seed}"
    )
    losses = ", ".join(f"{v:.4g}" for v in report.loss)
    header.append(f"\nloss per step: {losses}", style="dim")

    window = spark_window(report.layers)
    table = Table(show_edge=False, header_style="bold", pad_edge=False, expand=False)
    table.add_column("layer", overflow="fold")
    table.add_column("type")
    table.add_column("params", justify="right")
    table.add_column("‖g‖", justify="right")
    table.add_column("spread", justify="right")
    table.add_column("‖g‖/‖W‖", justify="right")
    table.add_column("‖dL/dz‖", justify="right")
    table.add_column(spark_axis(window) or "|g| histogram", no_wrap=True)
    table.add_column("status", no_wrap=True)
    ordered = sorted(report.layers, key=lambda layer: (layer.forward_index is None, layer.forward_index or 0))
    for layer in ordered:
        style = SEVERITY_STYLE.get(layer.severity or "", STATUS_STYLE.get(layer.status, ""))
        table.add_row(
            display_name(layer),
            layer.type,
            count(layer.params),
            number(layer.grad_norm_median),
            spread(layer.grad_norm_spread),
            number(layer.grad_to_weight),
            number(layer.output_grad_norm_median),
            Text(sparkline(layer.histogram, window), style="cyan"),
            Text(status_text(layer, report.findings), style=style),
        )

    parts: list[RenderableType] = [header, Text(""), table, Text("")]
    parts.append(Text(signal_line(report), style="dim"))
    parts.append(Text(update_line(report), style="dim"))
    if report.nan_origin is not None:
        parts.append(Text(f"NaN origin: {report.nan_origin.detail}", style="bold red"))
    for note in report.notes:
        parts.append(Text(f"note: {note}", style="dim"))
    if report.findings:
        parts.append(Text(""))
        parts.append(Text("Findings", style="bold"))
    for group, fix in grouped(report.findings):
        for finding in group:
            line = Text()
            line.append(f"{finding.severity.upper():7} ", style=SEVERITY_STYLE[finding.severity])
            line.append(f"{display_name(finding.layer)} ", style="bold")
            line.append(f"{finding.kind} [{finding.view}]: ")
            line.append(finding.message)
            parts.append(line)
        label = "fix" if len(group) == 1 else f"fix (the {len(group)} above)"
        parts.append(Text(f"        {label}: {fix}", style="cyan"))
    failing = report.failing(fail_on, fail_level)
    parts.append(Text(""))
    parts.append(
        Text(verdict_line(report, failing, fail_on, fail_level), style="bold red" if failing else "bold green")
    )
    extras = _column_notes(report)
    if extras:
        parts.append(Text(extras, style="dim"))
    return Group(*parts)


NOTABLE_FRACTION = 0.005


def _column_notes(report: Report) -> str:
    # Only fractions that show as at least 1%: "0%" would be noise.
    dead = [layer for layer in report.layers if (layer.dead_fraction or 0.0) >= NOTABLE_FRACTION]
    saturated = [layer for layer in report.layers if (layer.saturated_fraction or 0.0) >= NOTABLE_FRACTION]
    notes = []
    if dead:
        worst = max(dead, key=lambda layer: layer.dead_fraction or 0.0)
        notes.append(f"most dead ReLU units: {display_name(worst)} {percent(worst.dead_fraction)}")
    if saturated:
        worst = max(saturated, key=lambda layer: layer.saturated_fraction or 0.0)
        notes.append(f"most saturated inputs: {display_name(worst)} {percent(worst.saturated_fraction)}")
    return "; ".join(notes)


def render(report: Report, console: Console, fail_on: Sequence[str], fail_level: str) -> None:
    console.print(build(report, fail_on, fail_level))
