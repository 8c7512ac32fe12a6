"""Markdown: the same report as a GitHub-flavoured table, fit for a CI job summary or a pull request."""

from __future__ import annotations

from collections.abc import Sequence

from gradcheck_cli.render.common import (
    count,
    display_name,
    grouped,
    number,
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

ICON = {"error": "❌", "warning": "⚠️"}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(report: Report, fail_on: Sequence[str], fail_level: str) -> str:
    failing = report.failing(fail_on, fail_level)
    lines = [
        f"## gradcheck: {report.model}",
        "",
        f"**{verdict_line(report, failing, fail_on, fail_level)}**",
        "",
        f"loss `{report.loss_name}` per step: {', '.join(f'{v:.4g}' for v in report.loss)}; "
        f"{report.steps} step(s), batch {report.batch_size}, {report.device}, {report.mode} mode, seed {report.seed}",
        "",
        f"- {signal_line(report)}",
        f"- {update_line(report)}",
    ]
    if report.nan_origin is not None:
        lines.append(f"- NaN origin: {report.nan_origin.detail}")
    lines += [f"- note: {note}" for note in report.notes]
    window = spark_window(report.layers)
    lines += [
        "",
        f"| layer | type | params | ‖g‖ | spread | ‖g‖/‖W‖ | ‖dL/dz‖ | {spark_axis(window) or 'histogram'} | status |",
        "|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    ordered = sorted(report.layers, key=lambda layer: (layer.forward_index is None, layer.forward_index or 0))
    for layer in ordered:
        status = status_text(layer, report.findings)
        if layer.severity:
            status = f"{ICON[layer.severity]} {status}"
        spark = sparkline(layer.histogram, window)
        lines.append(
            "| "
            + " | ".join(
                _cell(cell)
                for cell in (
                    f"`{display_name(layer)}`",
                    layer.type,
                    count(layer.params),
                    number(layer.grad_norm_median),
                    spread(layer.grad_norm_spread),
                    number(layer.grad_to_weight),
                    number(layer.output_grad_norm_median),
                    f"`{spark}`" if spark.strip() else "",
                    status,
                )
            )
            + " |"
        )
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
