"""The one exception type a user can cause.

Everything a user gets wrong (a missing file, a malformed spec, a model that does not fit its data) is raised
as UserError and becomes exit code 2 with one line on stderr. Any other exception is a bug in gradcheck and
keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class UserError(Exception):
    """A mistake in the input, with what to do about it.

    `message` names the cause; `hint` says how to fix it. Both are short enough for one terminal line.
    """

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message

    def one_line(self) -> str:
        """The message and hint on a single line, as the CLI prints them."""
        text = f"{self.message}: {self.hint}" if self.hint else self.message
        return " ".join(text.split())


class ModelRunError(UserError):
    """The user's model (or loss) raised while gradcheck ran it.

    Carries the module that was running, so the message can say where the forward failed.
    """

    def __init__(self, message: str, hint: str = "", module: str | None = None) -> None:
        super().__init__(message, hint)
        self.module = module


def is_out_of_memory(error: BaseException) -> bool:
    """Whether an exception means the device or host ran out of memory: torch.OutOfMemoryError (CUDA), the
    CPU allocator's RuntimeError, or Python's MemoryError. Not the model's fault: a smaller batch fixes it."""
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def exited(exc: SystemExit, where: str) -> UserError:
    """User code that tried to end the process (sys.exit, raise SystemExit) while gradcheck ran it: exit 2 with
    one line naming where, never its own exit code, which could read as a pass (0) or as findings (1)."""
    return UserError(
        f"{where} called sys.exit({exc.code!r})", "raise an exception instead of exiting (--debug shows the traceback)"
    )


def calling(label: str, function: Callable[[], Any], hint: str = "--debug shows the traceback") -> Any:
    """Code run on the user's behalf (their build_optimizer, a hub library's loader): a failure is one line
    naming what failed, an attempted exit is exit 2, never its own code."""
    try:
        return function()
    except UserError:
        raise
    except SystemExit as exc:
        raise exited(exc, label) from exc
    except Exception as exc:
        raise ModelRunError(f"{label} raised {type(exc).__name__}: {first_line(exc)}", hint) from exc


def first_line(exc: BaseException, empty: str | None = None) -> str:
    """The first line of an exception's message, for one-line errors; `empty` (default: the exception's type
    name) when it has none."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else (empty if empty is not None else type(exc).__name__)


class Terminated(BaseException):
    """SIGTERM (a CI job cancelled, torchrun stopping its workers), raised where the program is, so that every
    `finally` and context manager runs: a half-written --save-grads or --output temporary file is removed, the
    model restored. Not an Exception: user code that catches those must not swallow it."""


def raise_on_sigterm() -> None:
    """Turn SIGTERM into Terminated, unless something else already handles it (the caller's own handler)."""
    import signal

    def terminated(signum: int, frame: object) -> None:
        raise Terminated

    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, terminated)
