"""What the CLI shows while a run goes: a progress bar on stderr when it is a terminal, and the library
warnings kept off it (summarised as report notes)."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gradcheck_cli.report import Report


def with_progress(run: Callable[[Any], Report], quiet: bool) -> Report:
    """Run with a progress bar on stderr when stderr is a terminal (never on stdout)."""
    from gradcheck_cli.distributed import main_process

    if quiet or not sys.stderr.isatty() or not main_process():
        return _quietly(run, None)  # and without importing rich: JSON runs in CI start faster
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn

    console = Console(stderr=True)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        console=console,
        transient=True,
    ) as bar:
        tasks: dict[str, Any] = {}

        def progress(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                label = "SGD steps" if phase == "train" else "forward/backward passes"
                tasks[phase] = bar.add_task(label, total=total)
            bar.update(tasks[phase], completed=done)

        return _quietly(run, progress)


def _quietly(run: Callable[[Any], Report], progress: Any) -> Report:
    """Keep library warnings (torch's NumPy notice, hook internals) off the user's terminal; the model's own
    warnings are summarised as report notes."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = run(progress)
    seen = []
    for warning in caught:
        text = str(warning.message).splitlines()[0] if str(warning.message) else warning.category.__name__
        if "NumPy" in text or text in seen:
            continue
        seen.append(text)
    for text in seen[:3]:
        report.notes.append(f"warning during the run: {text}")
    return report
