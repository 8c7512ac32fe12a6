"""TARGET -> nn.Module: import the user's file or module and find the model in it.

Importing a model file runs it, exactly as `python -c "import model"` would; gradcheck never writes next to
it (no __pycache__).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from gradcheck_cli.errors import UserError, exited, first_line
from gradcheck_cli.files import input_file
from gradcheck_cli.resolve.specs import Target

MODEL_FACTORIES = ("build_model", "get_model", "create_model")


@contextlib.contextmanager
def no_bytecode() -> Iterator[None]:
    """Importing must not write __pycache__ into the user's folders: around the imports of TARGET and for
    the whole run (a model may import a sibling module lazily, in its forward or its get_batch)."""
    previous = sys.dont_write_bytecode
    sys.dont_write_bytecode = True
    try:
        yield
    finally:
        sys.dont_write_bytecode = previous


# The libraries gradcheck itself imports after the user's folder is on sys.path (lazily: weights, rendering,
# the optional extras). A user file of the same name there (safetensors.py, rich.py, ...) must not shadow them.
OWN_IMPORTS = ("torch", "typer", "rich", "safetensors", "matplotlib", "tensorboard", "numpy")
OWN_SUBMODULES = {"safetensors": ("safetensors.torch",), "rich": ("rich.console", "rich.table", "rich.text")}


def _protect(folder: Path) -> None:
    """Import now, from where they are installed, the libraries of OWN_IMPORTS that a file or package in
    `folder` would shadow once it is on sys.path (only those: importing all would slow every start)."""
    try:
        names = {entry.removesuffix(".py") for entry in os.listdir(folder)}
    except OSError:
        return
    wanted = [library for library in OWN_IMPORTS if library in names and library not in sys.modules]
    if not wanted:
        return
    # Without the folder on the path (`python -m` and `python -c` put the working directory there already).
    saved = list(sys.path)
    sys.path[:] = [entry for entry in saved if not _same_folder(entry, folder)]
    try:
        for library in wanted:
            for name in (library, *OWN_SUBMODULES.get(library, ())):
                with contextlib.suppress(ImportError):
                    importlib.import_module(name)
    finally:
        sys.path[:] = saved


def _same_folder(entry: str, folder: Path) -> bool:
    try:
        return Path(entry or ".").resolve() == folder.resolve()
    except OSError:
        return False


_IMPORTED: dict[str, ModuleType] = {}


def import_target(target: Target) -> ModuleType:
    """Import the file or module that a Target names (once per process), with user-facing errors."""
    if target.is_file:
        return import_file(Path(target.source))
    _protect(Path.cwd())
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # as `python -m` does: local packages import
    try:
        with no_bytecode():
            return importlib.import_module(target.source)
    except ModuleNotFoundError as exc:
        if exc.name and target.source.startswith(exc.name):
            raise UserError(
                f"no module named '{target.source}'",
                "check the spelling, install the package, or give a path to a .py file",
            ) from exc
        raise _import_error(target.source, exc) from exc
    except SystemExit as exc:
        raise exited(exc, f"importing {target.source}") from exc
    except SyntaxError as exc:
        raise _syntax_error(exc) from exc
    except Exception as exc:
        raise _import_error(target.source, exc) from exc


def import_file(path: Path) -> ModuleType:
    """Run a .py file as a fresh module named after its path; its folder goes on sys.path for local imports."""
    input_file(path, "file", "point to the .py file that defines the model")
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
    _protect(Path(folder))  # also when it is on sys.path already (python -m puts the working directory there)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    sys.modules[module_name] = module  # dataclasses and pickling look the module up by name
    try:
        with no_bytecode():
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
        f"importing {source} raised {type(exc).__name__}: {first_line(exc, '(no message)')}",
        "fix the error in the model file (--debug shows the traceback)",
    )


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
        values = ", ".join(f"{argument}=..." for argument in required)
        raise UserError(
            f"{name}() needs arguments: {', '.join(required)}",
            f"give them defaults, def {name}({values}), or add a function that passes them, "
            f"def small_model(): return {name}({values}), and analyze FILE:small_model",
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
            f"{name}() raised {type(exc).__name__}: {first_line(exc, '(no message)')}",
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


def function_in(target: Target) -> Callable[..., Any]:
    """The function a FILE.py:FN (or module:FN) spec names, imported."""
    module = import_target(target)
    found: Callable[..., Any] | None = getattr(module, target.name or "", None)
    if not callable(found):
        raise UserError(f"{target.source} has no function '{target.name}'", "check the name after ':'")
    return found
