"""Where a report goes: stdout in one format, and any of --output, --plot, --tensorboard, GitHub annotations.

Checked before any pass runs (`Outputs.check`: a wrong suffix or a missing optional extra costs nothing),
written after (`Outputs.emit`), which computes the gate once, hands it to every renderer and returns its exit
code. Rendering is left to render/; this module only routes, so that cli.py stays a thin skin.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gradcheck_cli.files import check_file_option, to_stdout, write_atomic, writing
from gradcheck_cli.gate import Gate

if TYPE_CHECKING:
    from rich.console import Console

    from gradcheck_cli.options import Options
    from gradcheck_cli.report import Report


@dataclass(frozen=True)
class Outputs:
    """What the user asked to get from a run."""

    options: Options

    def check(self) -> None:
        """Refuse bad output options before spending time on the passes."""
        from gradcheck_cli.render import OUTPUT_SUFFIXES

        options = self.options
        if options.output is not None:
            check_file_option(
                "--output",
                options.output,
                OUTPUT_SUFFIXES,
                (f"unknown report type '{options.output.suffix}'", "use .json, .md, .xml (JUnit) or .txt"),
                "report.json",
            )
        if options.plot is not None:
            from gradcheck_cli.render import plot

            plot.check(options.plot)
        if options.tensorboard is not None:
            from gradcheck_cli.render import tensorboard

            tensorboard.check(options.tensorboard)
        if options.save_grads is not None:
            from gradcheck_cli.gradsave import check_path

            check_path(options.save_grads)
        if options.save_bad_batch is not None:
            check_file_option(
                "--save-bad-batch",
                options.save_bad_batch,
                (".safetensors",),
                ("not a .safetensors file", "name it e.g. bad.safetensors (--data reads it back)"),
                "bad.safetensors",
            )

    def emit(self, report: Report) -> int:
        """Print the report, write the files asked for, annotate for GitHub; return the exit code."""
        from gradcheck_cli.distributed import main_process
        from gradcheck_cli.render import format_of, github, render_text

        options = self.options
        gate = Gate.of(report, options.fail_on, options.fail_level)
        if not main_process():
            return gate.code  # under torchrun only rank 0 writes; every rank reaches the same verdict
        with to_stdout():
            if options.format == "table":
                from gradcheck_cli.render import table

                table.render(report, gate, stdout_console(), options.layers)
            else:
                sys.stdout.write(render_text(report, options.format, gate))
        if options.output is not None:
            text = render_text(report, format_of(options.output), gate, options.layers)
            with writing("--output", options.output):
                write_atomic(options.located(options.output), text)
        if options.plot is not None:
            from gradcheck_cli.render import plot

            with writing("--plot", options.plot):
                plot.save(report, options.located(options.plot), gate)
        if options.tensorboard is not None:
            self._tensorboard(report, options.tensorboard, options.located(options.tensorboard), gate)
        if github.enabled():
            for line in github.workflow_commands(report, gate):
                print(line, file=sys.stderr)
        return gate.code

    @staticmethod
    def _tensorboard(report: Report, shown: Path, directory: Path, gate: Gate) -> None:
        from gradcheck_cli.render import render_text, tensorboard

        with writing("--tensorboard", shown):
            tensorboard.write(report, directory, render_text(report, "markdown", gate))


def stdout_console() -> Console:
    from rich.console import Console

    from gradcheck_cli.render.table import PIPED_WIDTH

    console = Console(soft_wrap=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(soft_wrap=False, width=PIPED_WIDTH)
    return console
