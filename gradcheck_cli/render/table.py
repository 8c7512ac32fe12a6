"""The Rich table: which layers, how bad, which view, why, what to do, at a glance."""

from __future__ import annotations

import os
from typing import Literal

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from gradcheck_cli.gate import Gate
from gradcheck_cli.render.columns import COLUMN_LABELS, TableContext, columns
from gradcheck_cli.render.common import (
    coverage_line,
    display_name,
    evolution_line,
    grouped,
    percent,
    run_header,
    signal_line,
    training_line,
    update_line,
    verdict_line,
)
from gradcheck_cli.render.rows import common_prefix, rows, shorten
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


def build(report: Report, gate: Gate, layers: str = "folded", width: int = PIPED_WIDTH) -> RenderableType:
    """The whole terminal report: header, per-layer table, findings with fixes, verdict line; the table's
    rows as --layers says, its columns those that fit in `width` (numbers are never cut)."""
    header = Text()
    header.append(f"gradcheck: {report.model}", style="bold")
    header.append(
        f"  loss {report.loss_name} | {run_header(report)}"
        + f" | batch {report.batch_size} | {report.device} | {report.mode} mode | seed {report.seed}"
    )
    losses = ", ".join(f"{v:.4g}" for v in report.loss)
    header.append(f"\nloss per step: {losses}", style="dim")
    table, table_notes = _table(report, layers, width)
    parts: list[RenderableType] = [header, Text(""), table, Text("")]
    parts += [Text(note, style="dim") for note in table_notes]
    parts.append(Text(signal_line(report), style="dim"))
    parts.append(Text(update_line(report), style="dim"))
    for extra in (training_line(report), evolution_line(report)):
        if extra:
            parts.append(Text(extra, style="dim"))
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
        activation = worst.flat_activation or "ReLU"
        notes.append(f"most dead {activation} units: {display_name(worst)} {percent(worst.dead_fraction)}")
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


def render(report: Report, gate: Gate, console: Console, layers: str = "folded") -> None:
    console.print(build(report, gate, layers, console.width))


def render_text(report: Report, gate: Gate, layers: str = "folded") -> str:
    """The table as plain text, without colour, at the width of a CI log: for --output FILE.txt."""
    with open(os.devnull, "w") as devnull:
        console = Console(record=True, width=PIPED_WIDTH, file=devnull, color_system=None)
        render(report, gate, console, layers)
    return console.export_text()


# -- the table: rows, then the columns that fit ----------------------------------------------------------

NAME_MIN = 16  # shortest a layer name is cut to (with a middle ellipsis) before the table may overflow


def _short_view(status: str, room: int) -> str:
    """A status in `room` characters: 'vanishing 4e+12x [signal]', else 'vanishing 4e+12x [sig]' (the view's
    first three letters), else 'vanishing 4e+12x' (the findings below name the view), so that the kind and the
    amount stay whole on one line of a narrow terminal."""
    head, bracket, view = status.rpartition(" [")
    if len(status) <= room or not bracket or not view.endswith("]"):
        return status
    short = f"{head} [{view[:3]}]"
    return short if len(short) <= room else head


def _table(report: Report, layers: str, width: int) -> tuple[Table, list[str]]:
    context = TableContext.of(report)
    present = columns(context)
    chosen = rows(report.layers, layers)
    notes = []
    prefix = common_prefix([row.name for row in chosen])
    if prefix:
        notes.append(f"layer names below {prefix.rstrip('.')}: shown without that prefix")
    headers = {column.key: column.header(context) for column in present}
    cells = {column.key: [column.cell(row, context) for row in chosen] for column in present}
    cells["layer"] = [row.name[len(prefix) :] for row in chosen]
    shown = list(present)
    widths = {key: max([len(headers[key]), *map(len, values)]) for key, values in cells.items()}

    def total() -> int:  # cells plus one space of padding each side between columns and a rule
        return sum(widths[column.key] for column in shown) + 3 * (len(shown) - 1)

    for column in sorted((c for c in present if c.drop is not None), key=lambda c: c.drop or 0):
        if total() <= width:
            break
        shown.remove(column)
    if total() > width:
        room = max(NAME_MIN, width - (total() - widths["layer"]))
        cells["layer"] = [shorten(name, room) for name in cells["layer"]]
        widths["layer"] = max([len(headers["layer"]), *map(len, cells["layer"])])
    if total() > width and "status" in widths:  # still too wide: shorten the view tags of the longest statuses
        room = max(len(headers["status"]), widths["status"] - (total() - width))
        cells["status"] = [_short_view(text, room) for text in cells["status"]]
        widths["status"] = max([len(headers["status"]), *map(len, cells["status"])])
    left_out = [COLUMN_LABELS[column.key] for column in present if column not in shown]
    if left_out:
        notes.append(f"left out to fit {width} columns: {', '.join(left_out)} (a wider terminal shows them)")
    if layers == "folded" and any(row.folded for row in chosen):
        folded = sum(len(row.layers) for row in chosen if row.folded)
        notes.append(f"{folded} layers folded into rows that differ only by numbers (--layers all shows each)")
    if layers == "flagged":
        hidden = len(report.layers) - len(chosen)
        notes.append(f"{hidden} layer(s) without findings not shown (--layers all shows them)")
    table = Table(show_edge=False, header_style="bold", pad_edge=False, expand=False)
    for column in shown:
        # never "ellipsis" for a number: fold it instead (only a name may be cut, and shorten() cuts it first)
        overflow: Literal["ellipsis", "fold"] = "ellipsis" if column.role == "name" else "fold"
        table.add_column(
            headers[column.key], justify=column.justify, no_wrap=True, overflow=overflow, min_width=widths[column.key]
        )
    for index, row in enumerate(chosen):
        style = SEVERITY_STYLE.get(row.first.severity or "", STATUS_STYLE.get(row.first.status, ""))
        table.add_row(*[_styled(cells[column.key][index], column.role, style) for column in shown])
    return table, notes
