"""Files gradcheck writes (--output, --plot, --save-grads): checked before any pass runs, written atomically,
and a write failure is one line and exit 2. One mechanism for all of them."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from gradcheck_cli.errors import UserError


def check_file_option(
    option: str, path: Path, suffixes: Sequence[str], wrong_suffix: tuple[str, str], example: str
) -> None:
    """Refuse a bad output path before spending time on the passes: a suffix not in `suffixes` (`wrong_suffix`
    is the message's tail and the hint), a directory, a folder that does not exist."""
    if path.suffix.lower() not in suffixes:
        raise UserError(f"{option} {path}: {wrong_suffix[0]}", wrong_suffix[1])
    if path.is_dir():
        raise UserError(f"{option} {path} is a directory", f"give a file name, e.g. {example}")
    if not path.parent.exists():
        raise UserError(f"{option} {path}: folder {path.parent} does not exist", "create it first")


def bad_batch_weights(path: Path) -> Path:
    """Where --save-bad-batch FILE.safetensors writes the weights the diverging step started from:
    FILE.weights.safetensors, beside it."""
    return path.with_name(path.stem + ".weights" + path.suffix)


def refuse_inputs(outputs: dict[str, Path | None], inputs: dict[str, Path | None]) -> None:
    """No output option may name a file the run reads (weights, data, model, loss, config), also through a
    symbolic or a hard link: writing it would destroy the input. Checked before anything runs."""
    for option, output in outputs.items():
        if output is None or not output.exists():
            continue  # a file that does not exist yet is nobody's input
        for what, source in inputs.items():
            if source is None or not source.exists():
                continue
            try:
                same = os.path.samefile(output, source)
            except OSError:
                continue
            if same:
                raise UserError(
                    f"{option} {output} is the {what} this run reads: writing it would destroy it",
                    f"give {option} another file name",
                )


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


@contextlib.contextmanager
def to_stdout() -> Iterator[None]:
    """Printing the report: a full disk (`> /dev/full`) or a closed pipe is one line and exit 2, not a
    traceback, and the interpreter's own flush at exit then finds nothing left to fail on."""
    import sys

    try:
        yield
        sys.stdout.flush()
    except OSError as error:
        _discard_stdout()
        reason = error.strerror or type(error).__name__
        raise UserError(
            f"cannot write the report to stdout ({reason})", "free space where stdout goes, or use --output FILE"
        ) from None


def _discard_stdout() -> None:
    """Point file descriptor 1 at /dev/null, so that what is still buffered is flushed there."""
    import sys

    with contextlib.suppress(OSError, ValueError, AttributeError):
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.close(null)
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.flush()


def input_file(path: Path, what: str, folder_hint: str) -> None:
    """An input the run reads: it must exist and be a regular file. A FIFO, a socket or a device would be
    consumed by the first read (a format sniff) and hang or fail on the second."""
    import stat

    if not path.exists():
        raise UserError(f"{what} not found: {path}", "check the path")
    if path.is_dir():
        raise UserError(f"{path} is a directory", folder_hint)
    if not stat.S_ISREG(path.stat().st_mode):
        raise UserError(
            f"{what} {path} is not a regular file (a pipe, socket or device): gradcheck reads inputs more than once",
            "copy it to a regular file first",
        )
