"""Where a report goes: stdout in one format, and any of --output, --plot, --tensorboard, GitHub annotations.

Checked before any pass runs (`Outputs.check`: a wrong suffix or a missing optional extra costs nothing),
written after (`Outputs.emit`), which returns the exit code. Rendering is left to render/; this module only
routes, so that cli.py stays a thin skin.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from gradcheck_cli.errors import UserError

if TYPE_CHECKING:
    from rich.console import Console

    from gradcheck_cli.report import Report

FORMATS = ("table", "json", "markdown", "junit")
OUTPUT_SUFFIXES = (".json", ".md", ".markdown", ".xml", ".txt", ".log")
PIPED_WIDTH = 160  # CI logs and files have no terminal width; the table needs ~130 columns
EXIT_OK, EXIT_FINDINGS = 0, 1


@dataclass(frozen=True)
class Outputs:
    """What the user asked to get from a run."""

    format: str = "table"
    output: Path | None = None
    plot: Path | None = None
    tensorboard: Path | None = None
    save_grads: Path | None = None
    fail_on: Sequence[str] = field(default_factory=tuple)
    fail_level: str = "error"

    @property
    def value_histograms(self) -> bool:
        """The tutorial's signed-value histograms cost measurement time: only the picture outputs want them."""
        return self.plot is not None or self.tensorboard is not None

    def check(self) -> None:
        """Refuse bad output options before spending time on the passes."""
        check_output(self.output)
        if self.plot is not None:
            from gradcheck_cli.render import plot

            plot.check(self.plot)
        if self.tensorboard is not None:
            from gradcheck_cli.render import tensorboard

            tensorboard.check(self.tensorboard)
        if self.save_grads is not None:
            from gradcheck_cli.gradsave import check_path

            check_path(self.save_grads)

    def emit(self, report: Report) -> int:
        """Print the report, write the files asked for, annotate for GitHub; return the exit code."""
        from gradcheck_cli.distributed import main_process

        fail_on, fail_level = list(self.fail_on), self.fail_level
        code = EXIT_FINDINGS if report.failing(fail_on, fail_level) else EXIT_OK
        if not main_process():
            return code  # under torchrun only rank 0 writes; every rank reaches the same verdict
        if self.format == "table":
            from gradcheck_cli.render import table

            table.render(report, stdout_console(), fail_on, fail_level)
        else:
            sys.stdout.write(render_text(report, self.format, fail_on, fail_level))
        if self.output is not None:
            text = render_text(report, _format_of(self.output), fail_on, fail_level)
            with writing("--output", self.output):
                write_atomic(self.output, text)
        if self.plot is not None:
            from gradcheck_cli.render import plot

            with writing("--plot", self.plot):
                plot.save(report, self.plot, fail_on, fail_level)
        if self.tensorboard is not None:
            from gradcheck_cli.render import markdown, tensorboard

            with writing("--tensorboard", self.tensorboard):
                tensorboard.write(report, self.tensorboard, markdown.render(report, fail_on, fail_level))
        from gradcheck_cli.render import github

        if github.enabled():
            for line in github.workflow_commands(report, fail_on, fail_level):
                print(line, file=sys.stderr)
        return code


@contextlib.contextmanager
def writing(option: str, path: Path) -> Iterator[None]:
    """A full disk or a read-only folder is the user's to fix: one line, exit 2."""
    try:
        yield
    except OSError as error:
        raise UserError(
            f"cannot write {option} {path}: {error.strerror or error}",
            "check that the folder is writable and has free space",
        ) from error


def render_text(report: Report, format: str, fail_on: list[str], fail_level: str) -> str:
    """The report as text in one of FORMATS ("text": the table without colour, for files)."""
    if format == "json":
        return report.to_json() + "\n"
    if format == "markdown":
        from gradcheck_cli.render import markdown

        return markdown.render(report, fail_on, fail_level)
    if format == "junit":
        from gradcheck_cli.render import junit

        return junit.render(report, fail_on, fail_level)
    return plain_text(report, fail_on, fail_level)


def _format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    return {".json": "json", ".md": "markdown", ".markdown": "markdown", ".xml": "junit"}.get(suffix, "text")


def check_output(output: Path | None) -> None:
    """Refuse a bad --output before spending time on the passes."""
    if output is None:
        return
    if output.suffix.lower() not in OUTPUT_SUFFIXES:
        raise UserError(
            f"--output {output}: unknown report type '{output.suffix}'",
            "use .json, .md, .xml (JUnit) or .txt",
        )
    if output.is_dir():
        raise UserError(f"--output {output} is a directory", "give a file name, e.g. report.json")
    if not output.parent.exists():
        raise UserError(f"--output {output}: folder {output.parent} does not exist", "create it first")


def stdout_console() -> Console:
    from rich.console import Console

    console = Console(soft_wrap=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(soft_wrap=False, width=PIPED_WIDTH)
    return console


def plain_text(report: Report, fail_on: list[str], fail_level: str) -> str:
    from rich.console import Console

    from gradcheck_cli.render import table

    with open(os.devnull, "w") as devnull:
        console = Console(record=True, width=PIPED_WIDTH, file=devnull, color_system=None)
        table.render(report, console, fail_on, fail_level)
    return console.export_text()


def write_atomic(path: Path, text: str) -> None:
    """Write text to a temporary file beside `path`, then rename: readers never see half a report."""

    def write(name: str) -> None:
        with open(name, "w", encoding="utf-8") as stream:
            stream.write(text)

    replace_atomic(path, write)


def replace_atomic(path: Path, write: Callable[[str], None]) -> None:
    """Let `write` fill a temporary file (named by its path) beside `path`, then rename it to `path`: for
    writers that want a file name, such as matplotlib's savefig. Nothing is left behind on failure."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent or Path("."))
    os.close(handle)
    try:
        write(temporary)
        os.chmod(temporary, default_mode())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def default_mode() -> int:
    """The mode open() would give a new file: 0o666 less the umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask
