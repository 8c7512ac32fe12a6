"""TARGET -> nn.Module, and weights from safetensors.

A TARGET is `path/model.py`, `path/model.py:NAME` or `package.module:NAME`. Importing a model file runs it,
exactly as `python -c "import model"` would; gradcheck never writes next to it (no __pycache__).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from gradcheck_cli.errors import UserError

MODEL_FACTORIES = ("build_model", "get_model", "create_model")
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle", ".tar")


@dataclass(frozen=True)
class Target:
    """A parsed TARGET: a Python file or an importable module, and optionally a NAME inside it."""

    source: str  # file path or dotted module name
    is_file: bool
    name: str | None = None

    def label(self) -> str:
        return f"{self.source}:{self.name}" if self.name else self.source


def _is_identifier_path(text: str) -> bool:
    return bool(text) and all(part.isidentifier() for part in text.split("."))


def parse_target(spec: str, what: str = "TARGET") -> Target:
    """Split `file.py[:NAME]` or `package.module[:NAME]`; raise UserError for anything else."""
    text = spec.strip()
    if not text:
        raise UserError(f"empty {what}", "give a model file such as model.py, or package.module:NAME")
    source, name = text, None
    head, sep, tail = text.rpartition(":")
    # A colon splits off NAME only when what follows is a (dotted) identifier; "C:\models\m.py" and "C:m.py"
    # keep their drive, while "m:Net" is module m.
    drive = len(head) == 1 and head.isalpha() and (tail.startswith(("\\", "/")) or tail.endswith(".py"))
    if sep and _is_identifier_path(tail) and head and not drive:
        source, name = head, tail
    elif sep and not tail:
        raise UserError(f"{what} '{spec}' ends with ':'", "add a NAME after the colon, or drop the colon")
    elif sep and head and not drive:
        raise UserError(
            f"'{tail}' in {what} '{spec}' is not a Python name",
            "NAME must be an attribute of the file, e.g. model.py:Net",
        )
    if source.endswith(".py") or "/" in source or "\\" in source:
        return Target(source, True, name)
    if _is_identifier_path(source):
        return Target(source, False, name)
    raise UserError(
        f"{what} '{spec}' is neither a .py file nor a module name",
        "use path/model.py, path/model.py:NAME or package.module:NAME",
    )


@contextlib.contextmanager
def _no_bytecode() -> Iterator[None]:
    """Importing must not write __pycache__ into the user's folders."""
    previous = sys.dont_write_bytecode
    sys.dont_write_bytecode = True
    try:
        yield
    finally:
        sys.dont_write_bytecode = previous


_IMPORTED: dict[str, ModuleType] = {}


def import_target(target: Target) -> ModuleType:
    """Import the file or module that a Target names (once per process), with user-facing errors."""
    if target.is_file:
        return import_file(Path(target.source))
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # as `python -m` does: local packages import
    try:
        with _no_bytecode():
            return importlib.import_module(target.source)
    except ModuleNotFoundError as exc:
        if exc.name and target.source.startswith(exc.name):
            raise UserError(
                f"no module named '{target.source}'",
                "check the spelling, install the package, or give a path to a .py file",
            ) from exc
        raise _import_error(target.source, exc) from exc
    except SyntaxError as exc:
        raise _syntax_error(exc) from exc
    except Exception as exc:
        raise _import_error(target.source, exc) from exc


def import_file(path: Path) -> ModuleType:
    """Run a .py file as a fresh module named after its path; its folder goes on sys.path for local imports."""
    if not path.exists():
        raise UserError(f"file not found: {path}", "check the path")
    if path.is_dir():
        raise UserError(f"{path} is a directory", "point to the .py file that defines the model")
    if path.suffix != ".py":
        raise UserError(f"{path} is not a Python file", "give the .py file that defines the model")
    resolved = str(path.resolve())
    if resolved in _IMPORTED:
        return _IMPORTED[resolved]
    digest = hashlib.sha1(resolved.encode()).hexdigest()[:8]
    module_name = f"gradcheck_user_{path.stem if path.stem.isidentifier() else 'model'}_{digest}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise UserError(f"cannot import {path}", "give a readable .py file")
    module = importlib.util.module_from_spec(spec)
    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    sys.modules[module_name] = module  # dataclasses and pickling look the module up by name
    try:
        with _no_bytecode():
            spec.loader.exec_module(module)
    except SyntaxError as exc:
        sys.modules.pop(module_name, None)
        raise _syntax_error(exc) from exc
    except SystemExit as exc:
        sys.modules.pop(module_name, None)
        raise UserError(
            f"{path} called sys.exit({exc.code}) while being imported",
            "guard script code with `if __name__ == '__main__':`",
        ) from exc
    except Exception as exc:
        sys.modules.pop(module_name, None)
        raise _import_error(str(path), exc) from exc
    _IMPORTED[resolved] = module
    return module


def _syntax_error(exc: SyntaxError) -> UserError:
    where = f"{exc.filename}:{exc.lineno}" if exc.filename else "the model file"
    return UserError(f"syntax error in {where}: {exc.msg}", "fix the file and run again")


def _import_error(source: str, exc: BaseException) -> UserError:
    return UserError(
        f"importing {source} raised {type(exc).__name__}: {_first_line(exc)}",
        "fix the error in the model file (--debug shows the traceback)",
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else "(no message)"


def _lookup(module: ModuleType, name: str, label: str) -> Any:
    obj: Any = module
    for part in name.split("."):
        if not hasattr(obj, part):
            candidates = ", ".join(model_candidates(module)) or "none"
            raise UserError(
                f"{label} has no attribute '{name}'",
                f"models defined there: {candidates}",
            )
        obj = getattr(obj, part)
    return obj


def model_candidates(module: ModuleType) -> list[str]:
    """Names in a module that could be the model: instances, classes defined there, factory functions."""
    from torch import nn

    names = []
    for key, value in vars(module).items():
        if key.startswith("_"):
            continue
        if (
            isinstance(value, nn.Module)
            or (inspect.isclass(value) and issubclass(value, nn.Module) and value.__module__ == module.__name__)
            or (key in MODEL_FACTORIES and callable(value))
        ):
            names.append(key)
    return names


def resolve_model(module: ModuleType, name: str | None, label: str) -> Any:
    """The nn.Module that TARGET (and NAME) designate, following the documented order."""
    from torch import nn

    if name:
        return instantiate(_lookup(module, name, label), name)
    if hasattr(module, "model"):
        return instantiate(module.model, "model")
    for factory in MODEL_FACTORIES:
        if callable(getattr(module, factory, None)):
            return instantiate(getattr(module, factory), factory)
    classes = [
        key
        for key, value in vars(module).items()
        if inspect.isclass(value) and issubclass(value, nn.Module) and value.__module__ == module.__name__
    ]
    if len(classes) == 1:
        return instantiate(getattr(module, classes[0]), classes[0])
    if len(classes) > 1:
        raise UserError(
            f"{label} defines several models: {', '.join(classes)}",
            f"pick one: gradcheck analyze {label}:{classes[0]} (or --model {classes[0]})",
        )
    raise UserError(
        f"no model found in {label}",
        "define `model = ...`, a function build_model(), an nn.Module subclass, or name one with :NAME",
    )


def instantiate(obj: Any, name: str) -> Any:
    """An nn.Module instance as is; a Module class or zero-argument function called."""
    from torch import nn

    if isinstance(obj, nn.Module):
        return obj
    if not callable(obj):
        raise UserError(
            f"'{name}' is a {type(obj).__name__}, not a model",
            "NAME must be an nn.Module instance, an nn.Module class, or a function returning one",
        )
    required = _required_arguments(obj)
    if required:
        raise UserError(
            f"{name}() needs arguments: {', '.join(required)}",
            "add defaults, or write `def build_model(): return ...` and analyze that",
        )
    try:
        result = obj()
    except SystemExit as exc:
        raise UserError(
            f"{name}() called sys.exit({exc.code})",
            "raise an exception instead of exiting (--debug shows the traceback)",
        ) from exc
    except Exception as exc:
        raise UserError(
            f"{name}() raised {type(exc).__name__}: {_first_line(exc)}",
            "fix the model's constructor (--debug shows the traceback)",
        ) from exc
    if not isinstance(result, nn.Module):
        raise UserError(
            f"{name}() returned a {type(result).__name__}, not an nn.Module",
            "return the model itself (an nn.Module)",
        )
    return result


def _required_arguments(obj: Callable[..., Any]) -> list[str]:
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return []
    return [
        p.name
        for p in signature.parameters.values()
        if p.default is inspect.Parameter.empty
        and p.kind
        in (
            inspect.Parameter.POSITIONAL_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            inspect.Parameter.KEYWORD_ONLY,
        )
    ]


def file_function(module: ModuleType, name: str) -> Callable[..., Any] | None:
    """An optional hook function the model file may define (get_batch, batches, loss_fn)."""
    value = getattr(module, name, None)
    return value if callable(value) and not inspect.isclass(value) else None


# -- weights ----------------------------------------------------------------------------------------------


def load_weights(model: Any, path: Path, strict: bool = True, allow_pickle: bool = False) -> list[str]:
    """Load parameters and buffers into `model`; return notes (e.g. keys left out under --no-strict).

    safetensors files are parsed without running code. Pickle checkpoints can run arbitrary code when loaded,
    so they are refused unless allow_pickle, and even then read with torch.load(weights_only=True).
    """
    if not path.exists():
        raise UserError(f"weights file not found: {path}", "check the path")
    if path.is_dir():
        raise UserError(f"{path} is a directory", "give the .safetensors file itself")
    if path.suffix.lower() in PICKLE_SUFFIXES or _looks_like_pickle(path):
        if not allow_pickle:
            raise UserError(
                f"{path.name} is a pickle checkpoint, and loading pickle can run arbitrary code",
                "convert it to safetensors, or pass --allow-pickle to load it with torch.load(weights_only=True)",
            )
        state = _load_pickle(path)
    else:
        state = _load_safetensors(path)
    return _apply_state(model, state, path, strict)


def _looks_like_pickle(path: Path) -> bool:
    """torch.save writes a zip archive ("PK\x03\x04"), older torch and plain pickle start with 0x80. A safetensors
    file starts with its header's length (8 bytes, little-endian) and then "{", which is checked first: a
    128-byte header also starts with 0x80."""
    try:
        with path.open("rb") as handle:
            head = handle.read(9)
    except OSError:
        return False
    if len(head) == 9 and head[8:9] == b"{":
        return False
    return head[:1] == b"\x80" or head[:4] == b"PK\x03\x04"


def _load_safetensors(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    try:
        return dict(load_file(str(path)))
    except Exception as exc:
        raise UserError(
            f"{path.name} is not a readable safetensors file ({_first_line(exc)})",
            "check that the file is complete and was written by safetensors.torch.save_file or save_model",
        ) from exc


def _load_pickle(path: Path) -> dict[str, Any]:
    import torch

    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(
            f"cannot load {path.name} with torch.load(weights_only=True): {_first_line(exc)}",
            "save a plain state_dict (torch.save(model.state_dict(), ...)) or convert it to safetensors",
        ) from exc
    if isinstance(loaded, dict) and "state_dict" in loaded and isinstance(loaded["state_dict"], dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise UserError(f"{path.name} does not hold a state_dict", "save model.state_dict() instead")
    return dict(loaded)


def _apply_state(model: Any, state: dict[str, Any], path: Path, strict: bool) -> list[str]:
    import torch

    own = model.state_dict()
    mismatched = [
        f"{key} {tuple(state[key].shape)} vs model {tuple(own[key].shape)}"
        for key in state
        if key in own and tuple(state[key].shape) != tuple(own[key].shape)
    ]
    if mismatched:
        more = f" and {len(mismatched) - 3} more" if len(mismatched) > 3 else ""
        raise UserError(
            f"{path.name} does not fit the model: shape mismatch for {'; '.join(mismatched[:3])}{more}",
            "check that the weights belong to this model and its configuration",
        )
    # Tied weights: a tensor registered under several names is saved once (safetensors' save_model);
    # a missing alias of a loaded tensor is not missing.
    loaded_storage = {own[k].untyped_storage().data_ptr() for k in state if k in own}
    missing = [k for k in own if k not in state and own[k].untyped_storage().data_ptr() not in loaded_storage]
    unexpected = [k for k in state if k not in own]
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s): {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s): {_names(unexpected)}")
        raise UserError(
            f"{path.name} does not match the model: {'; '.join(parts)}",
            "check the model configuration, or pass --no-strict to load the keys that match",
        )
    with torch.no_grad():
        for key, value in state.items():
            if key in own:
                own[key].copy_(value.to(dtype=own[key].dtype))
    notes = []
    if missing:
        notes.append(f"--no-strict: {len(missing)} model key(s) kept their initial values: {_names(missing)}")
    if unexpected:
        notes.append(f"--no-strict: {len(unexpected)} key(s) in {path.name} were ignored: {_names(unexpected)}")
    return notes


def _names(keys: list[str], limit: int = 4) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown}, ... ({len(keys) - limit} more)" if len(keys) > limit else shown
