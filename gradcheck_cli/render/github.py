"""GitHub Actions annotations: workflow commands that GitHub turns into error and warning marks on the run's
summary (and on the model file in a pull request's diff, when TARGET is a file in the repository).

    ::error title=gradcheck vanishing,file=models/net.py::net.fc1: ||g||/||W|| = ... Fix: ...

Printed on stderr (GitHub reads both streams; stdout stays clean for --format json and junit), only when
GITHUB_ACTIONS=true. Escaping as GitHub's toolkit does it (actions/toolkit, core/src/command.ts).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from gradcheck_cli.gate import Gate
from gradcheck_cli.render.common import display_name
from gradcheck_cli.report import Report


def enabled(environ: Mapping[str, str] | None = None) -> bool:
    """GitHub sets GITHUB_ACTIONS=true in every step of a workflow run."""
    return (environ if environ is not None else os.environ).get("GITHUB_ACTIONS") == "true"


def escape_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(text: str) -> str:
    return escape_data(text).replace(":", "%3A").replace(",", "%2C")


def command(level: str, title: str, message: str, file: str | None = None) -> str:
    """One workflow command line: ::error title=...,file=...::message."""
    properties = [f"title={escape_property(title)}"]
    if file:
        properties.append(f"file={escape_property(file)}")
    return f"::{level} {','.join(properties)}::{escape_data(message)}"


def target_file(report: Report) -> str | None:
    """The model file TARGET names (path/model.py or path/model.py:NAME), when it is a file here."""
    if not report.target:
        return None
    path = report.target.split(":", 1)[0] if ".py:" in report.target else report.target
    if not path.endswith(".py") or not Path(path).is_file():
        return None
    return Path(path).as_posix()


def workflow_commands(report: Report, gate: Gate) -> list[str]:
    """An ::error per finding that fails the run, a ::warning per other finding."""
    file = target_file(report)
    lines = []
    for finding in report.findings:
        level = "error" if gate.fails(finding) else "warning"
        lines.append(
            command(
                level,
                f"gradcheck {finding.kind}",
                f"{display_name(finding.layer)}: {finding.message} Fix: {finding.fix}",
                file,
            )
        )
    return lines
