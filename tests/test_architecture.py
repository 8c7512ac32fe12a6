"""The package's shape, checked: the report round-trips exactly, the schema agrees with the one definition of
kinds and fields, the torch-free stages import and run without torch, no import circles, and the size limits
the redesign set (functions, signatures, modules)."""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from gradcheck_cli import kinds
from gradcheck_cli.report import (
    Finding,
    Layer,
    NanOrigin,
    ParameterRecord,
    Report,
    SignalSummary,
    UpdateSummary,
    ValueHistogram,
)

PACKAGE = Path(__file__).parents[1] / "gradcheck_cli"
SCHEMA = json.loads((PACKAGE / "report.schema.json").read_text())

# -- the report survives its JSON form exactly -------------------------------------------------------------

numbers = st.floats(allow_nan=True, allow_infinity=True, width=64)
optional_numbers = st.none() | numbers
names = st.text(min_size=0, max_size=8)
steps = st.tuples(optional_numbers, optional_numbers)


def _record(cls: type[Any], **overrides: Any) -> st.SearchStrategy[Any]:
    """A strategy for a report record: every field drawn by its declared type (names, counts, numbers)."""
    import typing

    hints = typing.get_type_hints(cls)
    fields: dict[str, Any] = {}
    for item in dataclasses.fields(cls):
        if item.name in overrides:
            fields[item.name] = overrides[item.name]
            continue
        hint = str(hints[item.name])
        if hint == "<class 'str'>":
            fields[item.name] = names
        elif hint in ("str | None", "typing.Optional[str]"):
            fields[item.name] = st.none() | names
        elif hint == "<class 'int'>":
            fields[item.name] = st.integers(-5, 10**6)
        elif "int | None" in hint and "tuple" not in hint:
            fields[item.name] = st.none() | st.integers(0, 100)
        elif hint == "<class 'bool'>":
            fields[item.name] = st.booleans()
        elif hint == "<class 'float'>":
            fields[item.name] = numbers
        elif hint == "float | None":
            fields[item.name] = optional_numbers
        elif hint == "tuple[float | None, ...]":
            fields[item.name] = steps
        elif hint == "tuple[str, ...]":
            fields[item.name] = st.tuples(names)
        elif hint == "tuple[int, ...]":
            fields[item.name] = st.tuples(st.integers(0, 9), st.integers(0, 9))
        elif hint == "tuple[float, ...] | None":
            fields[item.name] = st.none() | st.tuples(numbers)
        elif hint == "tuple[int, ...] | None":
            fields[item.name] = st.none() | st.tuples(st.integers(0, 9))
        else:
            raise AssertionError(f"no strategy for {cls.__name__}.{item.name}: {hint}")
    return st.builds(cls, **fields)


histograms = st.builds(ValueHistogram, st.integers(0, 3), numbers, st.tuples(st.integers(0, 99)))
layers = _record(Layer, value_histograms=st.none() | st.tuples(histograms))
reports = st.builds(
    Report,
    torch_version=names,
    model=names,
    target=st.none() | names,
    steps=st.integers(1, 9),
    train_steps=st.integers(0, 9),
    batch_size=st.none() | st.integers(1, 64),
    lr=numbers,
    device=names,
    mode=st.sampled_from(["train", "eval"]),
    seed=st.integers(0, 99),
    loss_name=names,
    loss=st.lists(numbers, max_size=3),
    train_loss=st.lists(numbers, max_size=2),
    thresholds=st.dictionaries(names, numbers, max_size=2),
    signal=st.builds(SignalSummary, st.tuples(names), optional_numbers, optional_numbers),
    update=st.builds(UpdateSummary, st.tuples(names), optional_numbers),
    nan_origin=st.none() | st.builds(NanOrigin, names, st.none() | names, names),
    amp=st.sampled_from([None, "bf16", "fp16"]),
    loss_scale=optional_numbers,
    skipped_steps=st.integers(0, 5),
    parallel=st.sampled_from([None, "ddp", "fsdp"]),
    world_size=st.integers(1, 8),
    notes=st.lists(names, max_size=2),
    histogram_edges=st.lists(numbers, max_size=3),
    findings=st.lists(_record(Finding, factor=optional_numbers), max_size=2),
    layers=st.lists(layers, max_size=2),
    parameters=st.lists(_record(ParameterRecord), max_size=2),
)


def _same(a: Any, b: Any) -> bool:
    """Equality in which NaN equals NaN (JSON writes it as "nan"), types included (a tuple stays a tuple)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    if dataclasses.is_dataclass(a):
        return all(_same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return bool(a == b)


@settings(max_examples=60, deadline=None)
@given(reports)
def test_every_report_survives_its_json_form_exactly(report: Report) -> None:
    back = Report.from_dict(json.loads(report.to_json()))
    assert _same(back, report)


def test_amp_and_torchrun_fields_round_trip() -> None:
    """The fields an fp16 or torchrun report carries (lost by the old from_dict) come back."""
    report = Report(
        model="M",
        steps=1,
        loss=[1.0],
        thresholds={},
        signal=SignalSummary((), None, None),
        update=UpdateSummary((), None),
        amp="fp16",
        loss_scale=32768.0,
        skipped_steps=2,
        parallel="fsdp",
        world_size=2,
        findings=[],
        layers=[],
        parameters=[],
    )
    back = Report.from_dict(json.loads(report.to_json()))
    assert (back.amp, back.loss_scale, back.skipped_steps, back.parallel, back.world_size) == (
        "fp16",
        32768.0,
        2,
        "fsdp",
        2,
    )


# -- the schema agrees with the definitions -------------------------------------------------------------------


def test_the_schema_lists_the_kinds_statuses_views_and_categories_that_exist() -> None:
    defs = SCHEMA["$defs"]
    assert defs["kind"]["enum"] == list(kinds.KINDS)
    assert defs["severity"]["enum"] == list(kinds.SEVERITIES)
    assert defs["finding"]["properties"]["view"]["enum"] == list(kinds.VIEWS)
    assert set(defs["layer"]["properties"]["status"]["enum"]) == set(kinds.STATUSES)
    assert defs["layer"]["properties"]["category"]["enum"] == list(kinds.CATEGORIES)


def test_the_schema_describes_every_field_the_report_writes() -> None:
    defs = SCHEMA["$defs"]
    for cls, properties, computed in (
        (Report, SCHEMA["properties"], {"schema", "gradcheck_version", "healthy"}),
        (Layer, defs["layer"]["properties"], {"frozen"}),
        (ParameterRecord, defs["parameter"]["properties"], set()),
        (Finding, defs["finding"]["properties"], set()),
    ):
        assert set(properties) == {f.name for f in dataclasses.fields(cls)} | computed, cls.__name__


# -- torch-free stages -------------------------------------------------------------------------------------------

TORCH_FREE = (
    "gradcheck_cli.series",
    "gradcheck_cli.kinds",
    "gradcheck_cli.gate",
    "gradcheck_cli.report",
    "gradcheck_cli.options",
    "gradcheck_cli.errors",
    "gradcheck_cli.files",
    "gradcheck_cli.compare",
    "gradcheck_cli.diagnose",
    "gradcheck_cli.resolve.specs",
    "gradcheck_cli.resolve.config",
    "gradcheck_cli.render",
    "gradcheck_cli.render.common",
    "gradcheck_cli.render.columns",
    "gradcheck_cli.render.markdown",
    "gradcheck_cli.render.junit",
    "gradcheck_cli.render.github",
    "gradcheck_cli.render.json_report",
    "gradcheck_cli.cli",
)

BLOCK_TORCH = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, Block())
"""


def test_rules_and_text_renderers_import_and_run_without_torch(tmp_path: Path) -> None:
    """A report read back from JSON is diagnosed again and rendered in every text format, torch blocked."""
    from zoo import cases

    import gradcheck_cli

    case = next(c for c in cases() if c.name == "ordered-tanh")  # findings of several kinds and views
    path = tmp_path / "report.json"
    path.write_text(gradcheck_cli.analyze(case.build(), case.batches()).to_json())
    script = BLOCK_TORCH + textwrap.dedent(
        f"""
        import importlib, json
        for name in {TORCH_FREE!r}:
            importlib.import_module(name)
        from gradcheck_cli.diagnose import Thresholds, diagnose
        from gradcheck_cli.gate import Gate
        from gradcheck_cli.render import FORMATS, render_text
        from gradcheck_cli.report import Report
        report = Report.from_dict(json.loads(open({str(path)!r}).read()))
        verdict = diagnose(report.layers, report.loss, Thresholds())
        assert [f.kind for f in verdict.findings] == [f.kind for f in report.findings], verdict.findings
        gate = Gate.of(report)
        for name in FORMATS:
            assert render_text(report, name, gate)
        assert "torch" not in sys.modules
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


# -- no circles, and the size limits ------------------------------------------------------------------------------


def _modules() -> dict[str, ast.Module]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = ast.parse(path.read_text(), str(path))
    return found


def _imports(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """The package's modules that `name` imports, at module level or inside functions, but not those under
    `if TYPE_CHECKING:` (annotations only: nothing runs)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            return
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            base = node.module
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in known else base)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {module for module in found if module in known and module != name}


def test_no_import_circles() -> None:
    modules = _modules()
    known = set(modules)
    graph = {name: _imports(name, tree, known) for name, tree in modules.items()}
    # A package's __init__ importing its own submodules is not a circle through them.
    graph = {name: {d for d in deps if not name.startswith(d + ".")} for name, deps in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(name: str) -> None:
        state[name] = 1
        stack.append(name)
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                raise AssertionError("import circle: " + " -> ".join([*stack[stack.index(dep) :], dep]))
            if dep not in state:
                walk(dep)
        stack.pop()
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            walk(name)


# The limits the redesign set (issue 12): about 80 lines a function, 10 parameters, 450 lines a module.
MAX_FUNCTION_LINES = 80
MAX_PARAMETERS = 10
MAX_MODULE_LINES = 450


def test_functions_signatures_and_modules_stay_small() -> None:
    too_big = []
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = path.read_text().count("\n")
        if lines > MAX_MODULE_LINES:
            too_big.append(f"{path.name}: {lines} lines")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                arguments = node.args
                count = len(arguments.posonlyargs) + len(arguments.args) + len(arguments.kwonlyargs)
                count -= 1 if arguments.args and arguments.args[0].arg in ("self", "cls") else 0
                if length > MAX_FUNCTION_LINES:
                    too_big.append(f"{path.name}:{node.lineno} {node.name}: {length} lines")
                if count > MAX_PARAMETERS:
                    too_big.append(f"{path.name}:{node.lineno} {node.name}: {count} parameters")
    assert not too_big, too_big
