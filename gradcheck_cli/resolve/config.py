"""[tool.gradcheck] in pyproject.toml: defaults for `gradcheck analyze`, as pytest, ruff and mypy read theirs.

    [tool.gradcheck]
    target = "models/net.py:build_model"
    data = "tests/batch.safetensors"
    steps = 5
    fail-on = ["vanishing", "exploding", "nan"]
    signal-warning = 30

The file is the first pyproject.toml with a [tool.gradcheck] table found from the current directory upward.
Keys are the long option names of `gradcheck analyze` (`-` or `_`; `target` for TARGET); flags given on the
command line win. Relative paths in it are relative to the pyproject.toml, not to where gradcheck runs, so the
same configuration works from any subdirectory.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradcheck_cli.errors import UserError
from gradcheck_cli.resolve.specs import Target, parse_data_spec, parse_loss_spec, parse_target

FILENAME = "pyproject.toml"
# Options whose value is a path; relative ones are taken from the pyproject.toml's folder.
PATH_KEYS = ("weights", "output", "plot", "tensorboard", "save-grads")
# Options whose value may start with a file path, maybe followed by :NAME (or be a keyword or module name).
SPEC_KEYS = ("target", "data", "loss")
NOT_CONFIGURABLE = ("help", "debug")


@dataclass(frozen=True)
class Config:
    path: Path
    values: dict[str, Any]  # key (dashes) -> value, as written


def find(start: Path | None = None) -> Config | None:
    """The first pyproject.toml with a [tool.gradcheck] table, from `start` (default: cwd) upward."""
    folder = (start or Path.cwd()).resolve()
    for candidate in (folder, *folder.parents):
        path = candidate / FILENAME
        if not path.is_file():
            continue
        try:
            with path.open("rb") as stream:
                data = tomllib.load(stream)
        except UnicodeDecodeError as error:  # TOML is UTF-8 by definition
            raise UserError(
                f"{path}: not UTF-8 (byte {error.object[error.start]:#04x} at offset {error.start})",
                "save it as UTF-8, as TOML requires",
            ) from None
        except (OSError, tomllib.TOMLDecodeError) as error:
            raise UserError(f"{path}: cannot read it ({error})", "fix the TOML or run from another folder") from None
        table = data.get("tool", {}).get("gradcheck")
        if table is None:
            continue
        if not isinstance(table, dict):
            raise UserError(f"{path}: [tool.gradcheck] is not a table", "write it as a [tool.gradcheck] section")
        return Config(path, {key.replace("_", "-"): value for key, value in table.items()})
    return None


def option_names(params: list[Any]) -> dict[str, str]:
    """Config key -> parameter name, from a command's click parameters: the long option names without their
    dashes (`--fail-on` -> fail-on, `--eval` -> eval), and the argument's name (`target` for TARGET)."""
    names: dict[str, str] = {}
    for param in params:
        if param.name is None or param.name in NOT_CONFIGURABLE:
            continue
        options = [option[2:] for option in param.opts if option.startswith("--")]
        for key in options or [param.name.replace("_", "-")]:
            names[key] = param.name
    return names


def defaults(config: Config, names: dict[str, str], cwd: Path | None = None) -> dict[str, Any]:
    """The command's default_map: parameter name -> value, with paths made relative to `cwd`.

    Raises UserError for a key that names no option (a typo would otherwise be ignored silently).
    """
    cwd = cwd or Path.cwd()
    base = config.path.parent
    found: dict[str, Any] = {}
    for key, value in config.values.items():
        name = names.get(key)
        if name is None:
            known = ", ".join(sorted(names))
            raise UserError(f"{config.path}: unknown key '{key}' in [tool.gradcheck]", f"known keys: {known}")
        if key in ("fail-on",) and isinstance(value, list):
            value = ",".join(str(item) for item in value)
        elif isinstance(value, str) and key in PATH_KEYS:
            value = _relative(base / value, cwd)
        elif isinstance(value, str) and key in SPEC_KEYS:
            value = _spec(key, value, base, cwd)
        elif isinstance(value, list | dict):
            raise UserError(
                f"{config.path}: [tool.gradcheck] {key} must be a single value, not a {type(value).__name__}",
                f"write e.g. {key} = ...",
            )
        found[name] = value
    return found


def _spec(key: str, value: str, base: Path, cwd: Path) -> str:
    """A TARGET, --data or --loss spec with its file part (if it has one) rebased on the config's folder,
    parsed as the option itself parses it (specs.py). A malformed spec is left as written: the option's own
    parsing reports it, with the same message as on the command line."""
    try:
        if key == "target":
            target: Target | str = parse_target(value)
        elif key == "loss":
            target = parse_loss_spec(value)
        else:
            data = parse_data_spec(value)
            if data.path is not None:
                return _relative(base / data.path, cwd)
            target = data.target or value
    except UserError:
        return value
    if isinstance(target, Target) and target.is_file:
        rebased = _relative(base / target.source, cwd)
        return f"{rebased}:{target.name}" if target.name else rebased
    return value


def _relative(path: Path, cwd: Path) -> str:
    """A path as the user would type it from `cwd`: relative when it is below or near it."""
    if path.is_absolute() and cwd.is_absolute():
        try:
            return os.path.relpath(path, cwd)
        except ValueError:  # another drive on Windows
            return str(path)
    return str(path)
