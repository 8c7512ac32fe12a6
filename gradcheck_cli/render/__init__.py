"""Renderers: a report (and its gate) -> what a person or a CI system reads. Nothing here computes a number.

Text formats are registered in FORMATS: the name --format takes, the module and function that renders it
(imported on use, so a JSON run never imports Rich), and the --output suffixes that choose it. Adding a format
is one module with `render(report, gate) -> str` and one line here (and its name in options.FORMAT_CHOICES
for --format).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gradcheck_cli.gate import Gate
    from gradcheck_cli.report import Report


@dataclass(frozen=True)
class TextFormat:
    module: str
    function: str
    suffixes: tuple[str, ...]  # --output FILE with one of these is written in this format


FORMATS = {
    "json": TextFormat("gradcheck_cli.render.json_report", "render", (".json",)),
    "markdown": TextFormat("gradcheck_cli.render.markdown", "render", (".md", ".markdown")),
    "junit": TextFormat("gradcheck_cli.render.junit", "render", (".xml",)),
    # the table without colour, for files and logs
    "text": TextFormat("gradcheck_cli.render.table", "render_text", (".txt", ".log")),
}
OUTPUT_SUFFIXES = tuple(suffix for entry in FORMATS.values() for suffix in entry.suffixes)


def render_text(report: Report, format: str, gate: Gate, layers: str = "folded") -> str:
    """The report as text in one of FORMATS; `layers` (--layers) chooses the rows of the text table."""
    entry = FORMATS[format]
    function = getattr(importlib.import_module(entry.module), entry.function)
    text: str = function(report, gate, layers) if format == "text" else function(report, gate)
    return text


def format_of(path: Path) -> str:
    """The format an --output file is written in, by its suffix."""
    suffix = path.suffix.lower()
    return next(name for name, entry in FORMATS.items() if suffix in entry.suffixes)
