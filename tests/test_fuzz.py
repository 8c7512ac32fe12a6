"""Property and fuzz tests: the TARGET and --data parsers, and weights and data files of arbitrary bytes.

Whatever the input, the only exception that leaves the parsers and loaders is UserError (exit 2, one line).
"""

from __future__ import annotations

import contextlib
import io
import string
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save
from torch import nn

from gradcheck_cli.errors import UserError
from gradcheck_cli.resolve.data import load_data
from gradcheck_cli.resolve.specs import Target, parse_data_spec, parse_target
from gradcheck_cli.resolve.weights import load_weights

FAST = settings(max_examples=200, deadline=None)
FILES = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

identifiers = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True)
dotted = st.lists(identifiers, min_size=1, max_size=3).map(".".join)
folders = st.lists(st.text(string.ascii_letters + string.digits + "_-.", min_size=1, max_size=6), max_size=3)


# -- TARGET -----------------------------------------------------------------------------------------------


@FAST
@given(st.text())
def test_parse_target_raises_only_user_errors(text: str) -> None:
    try:
        target = parse_target(text)
    except UserError:
        return
    assert parse_target(target.label()) == target  # what it parsed, it parses back to the same


@FAST
@given(folders, identifiers, st.none() | dotted)
def test_parse_target_splits_file_and_name(folder: list[str], stem: str, name: str | None) -> None:
    path = "/".join([*folder, f"{stem}.py"])
    spec = f"{path}:{name}" if name else path
    assert parse_target(spec) == Target(path, True, name)


@FAST
@given(dotted, st.none() | dotted)
def test_parse_target_splits_module_and_name(module: str, name: str | None) -> None:
    spec = f"{module}:{name}" if name else module
    assert parse_target(spec) == Target(module, module.endswith(".py"), name)


# -- --data specs -----------------------------------------------------------------------------------------

shapes = st.lists(st.integers(1, 10**6), min_size=1, max_size=3).map(tuple)  # at most 10**18 elements


@FAST
@given(st.text() | st.sampled_from(["randn:", "randint:", "randint:5:"]).flatmap(lambda p: st.text().map(p.__add__)))
def test_parse_data_spec_raises_only_user_errors(text: str) -> None:
    try:
        spec = parse_data_spec(text)
    except UserError:
        return
    assert parse_data_spec(spec.text) == spec


@FAST
@given(shapes, st.sampled_from([",", ", "]))
def test_randn_specs_parse_to_their_shape(shape: tuple[int, ...], separator: str) -> None:
    spec = parse_data_spec(f"randn:{separator.join(map(str, shape))}")
    assert (spec.kind, spec.shape) == ("randn", shape)


@FAST
@given(st.integers(1, 2**62), shapes)
def test_randint_specs_parse_to_their_range_and_shape(high: int, shape: tuple[int, ...]) -> None:
    spec = parse_data_spec(f"randint:{high}:{','.join(map(str, shape))}")
    assert (spec.kind, spec.high, spec.shape) == ("randint", high, shape)


@FAST
@given(shapes.filter(lambda s: any(d > 1 for d in s)), st.integers(0, 2))
def test_bad_shapes_are_refused(shape: tuple[int, ...], position: int) -> None:
    dims = [str(d) for d in shape]
    dims[position % len(dims)] = "0"
    with pytest.raises(UserError, match="bad shape"):
        parse_data_spec(f"randn:{','.join(dims)}")


@FAST
@given(folders, identifiers, identifiers)
def test_file_specs(folder: list[str], stem: str, function: str) -> None:
    path = "/".join([*folder, stem])
    assert parse_data_spec(f"{path}.safetensors").path == f"{path}.safetensors"
    spec = parse_data_spec(f"{path}.py:{function}")
    assert spec.kind == "python" and spec.target == Target(f"{path}.py", True, function)


# -- weights and data files of arbitrary bytes ------------------------------------------------------------


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


WEIGHTS = save(_model().state_dict())
DATA = save({"inputs": torch.randn(6, 4), "targets": torch.randint(0, 2, (6,))})
_buffer = io.BytesIO()
torch.save(_model().state_dict(), _buffer)
CHECKPOINT = _buffer.getvalue()


def _load_weights(path: Path, content: bytes, allow_pickle: bool = False) -> None:
    path.write_bytes(content)
    load_weights(_model(), path, allow_pickle=allow_pickle)


def _load_data(path: Path, content: bytes) -> None:
    path.write_bytes(content)
    load_data(parse_data_spec(str(path)), 2, 4, 0)


def _mutated(original: bytes) -> st.SearchStrategy[bytes]:
    """The file with a few bytes overwritten (header or payload)."""
    edits = st.lists(st.tuples(st.integers(0, len(original) - 1), st.integers(0, 255)), min_size=1, max_size=4)

    def apply(changes: list[tuple[int, int]]) -> bytes:
        content = bytearray(original)
        for position, value in changes:
            content[position] = value
        return bytes(content)

    return edits.map(apply)


@FILES
@given(st.binary(max_size=300) | _mutated(WEIGHTS), st.booleans())
def test_weights_of_any_bytes_load_or_raise_a_user_error(tmp_path: Path, content: bytes, allow_pickle: bool) -> None:
    with contextlib.suppress(UserError):  # a few overwritten payload bytes still make a valid file
        _load_weights(tmp_path / "weights.safetensors", content, allow_pickle)


@FILES
@given(st.binary(max_size=300) | _mutated(DATA))
def test_data_of_any_bytes_loads_or_raises_a_user_error(tmp_path: Path, content: bytes) -> None:
    with contextlib.suppress(UserError):
        _load_data(tmp_path / "data.safetensors", content)


@FILES
@given(st.integers(0, len(WEIGHTS) - 1), st.integers(0, len(DATA) - 1), st.integers(0, len(CHECKPOINT) - 1))
def test_truncated_files_are_refused(tmp_path: Path, weights_size: int, data_size: int, checkpoint_size: int) -> None:
    with pytest.raises(UserError):
        _load_weights(tmp_path / "weights.safetensors", WEIGHTS[:weights_size])
    with pytest.raises(UserError):
        _load_data(tmp_path / "data.safetensors", DATA[:data_size])
    with pytest.raises(UserError):
        _load_weights(tmp_path / "checkpoint.pt", CHECKPOINT[:checkpoint_size], allow_pickle=True)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=200) | st.integers(0, len(DATA) - 1).map(lambda n: DATA[:n]), st.booleans())
def test_cli_with_broken_files_exits_2_with_one_line(cli, write, tmp_path: Path, content: bytes, as_data: bool) -> None:
    model = write("fuzz_model.py", "from torch import nn\nmodel = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))\n")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(content)
    option = "--data" if as_data else "--weights"
    result = cli("analyze", model, option, broken)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1, result.stderr
    assert broken.read_bytes() == content
