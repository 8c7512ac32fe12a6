"""Markdown: the same report as a GitHub-flavoured table, fit for a CI job summary or a pull request."""

from __future__ import annotations

from gradcheck_cli.gate import Gate
from gradcheck_cli.render.columns import TableContext, columns
from gradcheck_cli.render.common import coverage_line, display_name, grouped, signal_line, update_line, verdict_line
from gradcheck_cli.render.rows import rows
from gradcheck_cli.report import Report

ICON = {"error": "❌", "warning": "⚠️"}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(report: Report, gate: Gate) -> str:
    lines = [
        f"## gradcheck: {report.model}",
        "",
        f"**{verdict_line(report, gate)}**",
        "",
        f"loss `{report.loss_name}` per step: {', '.join(f'{v:.4g}' for v in report.loss)}; "
        f"{report.steps} step(s), batch {report.batch_size}, {report.device}, {report.mode} mode, seed {report.seed}",
        "",
        f"- {signal_line(report)}",
        f"- {update_line(report)}",
    ]
    coverage = coverage_line(report)
    if coverage:
        lines.append(f"- {coverage}")
    if report.nan_origin is not None:
        lines.append(f"- NaN origin: {report.nan_origin.detail}")
    lines += [f"- note: {note}" for note in report.notes]
    context = TableContext.of(report)
    present = columns(context)
    lines += [
        "",
        "| " + " | ".join(_cell(column.header(context)) for column in present) + " |",
        "|" + "|".join("---:" if column.justify == "right" else "---" for column in present) + "|",
    ]
    for row in rows(report.layers, "all"):
        cells = [_decorated(column.cell(row, context), column.role, row.first.severity) for column in present]
        lines.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
    if report.findings:
        lines += ["", "### Findings", ""]
        for group, fix in grouped(report.findings):
            for finding in group:
                lines.append(
                    f"- {ICON[finding.severity]} **{finding.severity}** `{display_name(finding.layer)}` "
                    f"{finding.kind} [{finding.view}]: {finding.message}"
                )
            lines.append(f"  - fix{'' if len(group) == 1 else f' (the {len(group)} above)'}: {fix}")
    return "\n".join(lines) + "\n"


def _decorated(text: str, role: str, severity: str | None) -> str:
    """Markdown's touches on a cell: code spans for names and sparklines, an icon on a flagged status."""
    if role == "name":
        return f"`{text}`"
    if role == "spark":
        return f"`{text}`" if text.strip() else ""
    if role == "status" and severity:
        return f"{ICON[severity]} {text}"
    return text
