"""Specs: the strings a user writes (TARGET, --data, --loss) parsed once, here, into typed values.

Pure parsing, no imports of user code and no torch: a bad spec is a UserError before anything runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gradcheck_cli.errors import UserError

MAX_INT64 = 2**63 - 1  # torch sizes and integer bounds are int64: larger ones overflow inside torch
NAMED_LOSSES = ("auto", "cross-entropy", "mse")


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


@dataclass(frozen=True)
class DataSpec:
    """A parsed --data value."""

    kind: str  # "safetensors" | "python" | "randn" | "randint"
    text: str
    path: str | None = None
    target: Target | None = None
    shape: tuple[int, ...] = ()
    high: int = 0


def _parse_shape(text: str, spec: str) -> tuple[int, ...]:
    parts = [p.strip() for p in text.split(",")]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise UserError(
            f"bad shape '{text}' in --data '{spec}'",
            "give positive integers separated by commas, batch first, e.g. randn:32,784",
        )
    if math.prod(shape) > MAX_INT64:
        raise UserError(
            f"shape '{text}' in --data '{spec}' has more elements than torch can hold", "use a smaller shape"
        )
    return shape


def parse_data_spec(spec: str) -> DataSpec:
    """Parse --data: FILE.safetensors, FILE.py:FN (or module:FN), randn:B,D1,..., randint:HIGH:B,T."""
    text = spec.strip()
    if text.startswith("randn:"):
        return DataSpec("randn", text, shape=_parse_shape(text[len("randn:") :], spec))
    if text.startswith("randint:"):
        high_text, sep, shape_text = text[len("randint:") :].partition(":")
        try:
            high = int(high_text)
        except ValueError:
            high = 0
        if not sep or not 0 < high <= MAX_INT64:
            raise UserError(
                f"bad --data '{spec}'",
                "write randint:HIGH:B,T with HIGH the number of ids (e.g. the vocabulary size), e.g. randint:1000:8,32",
            )
        return DataSpec("randint", text, shape=_parse_shape(shape_text, spec), high=high)
    if text.endswith(".safetensors"):
        return DataSpec("safetensors", text, path=text)
    if text.endswith(".txt"):  # text for an hf: model, tokenised by its own tokenizer
        return DataSpec("text", text, path=text)
    if ":" in text:
        target = parse_target(text, what="--data")
        if target.name is None:
            raise UserError(f"--data '{spec}' names no function", "write FILE.py:FN")
        return DataSpec("python", text, target=target)
    raise UserError(
        f"cannot read --data '{spec}'",
        "use FILE.safetensors, FILE.py:FN, randn:B,D1,..., randint:HIGH:B,T or (hf: models) FILE.txt",
    )


def parse_loss_spec(spec: str) -> str | Target:
    """--loss: one of NAMED_LOSSES, or FILE.py:FN / module:FN naming a function."""
    if spec in NAMED_LOSSES:
        return spec
    target = parse_target(spec, what="--loss")
    if target.name is None:
        raise UserError(f"unknown loss '{spec}'", "use auto, cross-entropy, mse or FILE.py:FN")
    return target


def input_files(
    target: str, weights: str | None, data: str | None, loss: str, optimizer: str | None = None
) -> dict[str, Path | None]:
    """Every file a run reads, by what it is, found by parsing the specs as the run will (a malformed spec
    gives None here: the run reports it)."""

    def source(parse: Callable[[], object]) -> Path | None:
        try:
            spec = parse()
        except UserError:
            return None
        if isinstance(spec, DataSpec) and spec.path:
            return Path(spec.path)
        found = spec.target if isinstance(spec, DataSpec) else spec
        return Path(found.source) if isinstance(found, Target) and found.is_file else None

    return {
        "model file": source(lambda: parse_target(target)),
        "--weights file": Path(weights) if weights else None,
        "--data file": source(lambda: parse_data_spec(data)) if data else None,
        "--loss file": source(lambda: parse_loss_spec(loss)),
        "--optimizer file": source(lambda: parse_target(optimizer, what="--optimizer")) if optimizer else None,
    }
