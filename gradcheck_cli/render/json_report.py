"""--format json: the versioned report document (report.py defines it; report.schema.json describes it)."""

from __future__ import annotations

from gradcheck_cli.gate import Gate
from gradcheck_cli.report import Report


def render(report: Report, gate: Gate) -> str:
    return report.to_json() + "\n"
