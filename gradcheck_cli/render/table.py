"""The Rich table: which layers, how bad, which view, why, what to do, at a glance."""

from __future__ import annotations

import os

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from gradcheck_cli.gate import Gate
from gradcheck_cli.render.columns import COLUMNS, TableContext, in_forward_order
from gradcheck_cli.render.common import (
    coverage_line,
    display_name,
    grouped,
    percent,
    signal_line,
    update_line,
    verdict_line,
)
from gradcheck_cli.report import Report

PIPED_WIDTH = 160  # CI logs and files have no terminal width; the table needs ~130 columns
STATUS_STYLE = {
    "ok": "green",
    "frozen": "dim",
    "gated": "dim",
    "unjudged": "dim",
    "unused": "yellow",
}
SEVERITY_STYLE = {"error": "bold red", "warning": "yellow"}


def build(report: Report, gate: Gate) -> RenderableType:
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

    context = TableContext.of(report)
    table = Table(show_edge=False, header_style="bold", pad_edge=False, expand=False)
    for column in COLUMNS:
        table.add_column(
            column.header(context),
            justify=column.justify,
            overflow="fold" if column.role == "name" else "ellipsis",
            no_wrap=column.role in ("spark", "status"),
        )
    for layer in in_forward_order(report.layers):
        style = SEVERITY_STYLE.get(layer.severity or "", STATUS_STYLE.get(layer.status, ""))
        cells = [column.cell(layer, context) for column in COLUMNS]
        table.add_row(*[_styled(text, column.role, style) for text, column in zip(cells, COLUMNS, strict=True)])

    parts: list[RenderableType] = [header, Text(""), table, Text("")]
    parts.append(Text(signal_line(report), style="dim"))
    parts.append(Text(update_line(report), style="dim"))
    coverage = coverage_line(report)
    if coverage:
        parts.append(Text(coverage, style="dim"))
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
    parts.append(Text(""))
    parts.append(Text(verdict_line(report, gate), style="bold red" if gate.failing else "bold green"))
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


def _styled(text: str, role: str, status_style: str) -> Text | str:
    if role == "spark":
        return Text(text, style="cyan")
    if role == "status":
        return Text(text, style=status_style)
    return text


def render(report: Report, gate: Gate, console: Console) -> None:
    console.print(build(report, gate))


def render_text(report: Report, gate: Gate) -> str:
    """The table as plain text, without colour, at the width of a CI log: for --output FILE.txt."""
    with open(os.devnull, "w") as devnull:
        console = Console(record=True, width=PIPED_WIDTH, file=devnull, color_system=None)
        render(report, gate, console)
    return console.export_text()
