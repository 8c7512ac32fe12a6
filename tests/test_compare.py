"""gradcheck compare: per-layer ratios between two reports, a regression gate with exit codes 0/1/2."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gradcheck_cli.compare import DEFAULT_FACTOR, compare
from gradcheck_cli.errors import UserError
from gradcheck_cli.report import Report


@pytest.fixture(scope="module")
def base_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A real report of a small healthy MLP, as JSON."""
    import torch
    from torch import nn

    import gradcheck_cli

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    batch = (torch.randn(12, 8), torch.randint(0, 4, (12,)))
    data: dict[str, Any] = json.loads(gradcheck_cli.analyze(model, batch, steps=2).to_json())
    return data


def changed(data: dict[str, Any], layer: str, **fields: Any) -> Report:
    """The report with one layer's fields replaced."""
    report = Report.from_dict(json.loads(json.dumps(data)))
    report.layers = [dataclasses.replace(x, **fields) if x.name == layer else x for x in report.layers]
    return report


def test_the_same_report_has_no_regression(base_report: dict[str, Any]) -> None:
    report = Report.from_dict(base_report)
    comparison = compare(report, report)
    assert comparison.regressions == [] and comparison.added == [] and comparison.notes == []
    assert all(change.ratio == 1 for layer in comparison.layers for change in layer.changes)


@pytest.mark.parametrize(
    ("factor", "regressed"),
    [(1e-3, True), (0.5, False), (2.0, False), (DEFAULT_FACTOR * 1.01, True), (0.0, True)],
)
def test_a_norm_outside_the_factor_regresses(base_report: dict[str, Any], factor: float, regressed: bool) -> None:
    base = Report.from_dict(base_report)
    value = base.layer("2").grad_norm_median
    assert value is not None
    comparison = compare(base, changed(base_report, "2", grad_norm_median=value * factor))
    assert [layer.name for layer in comparison.regressions] == (["2"] if regressed else [])
    if regressed:
        assert comparison.regressions[0].reasons[0].startswith("‖g‖ ")


def test_ok_to_flagged_regresses_and_flagged_to_ok_does_not(base_report: dict[str, Any]) -> None:
    base = Report.from_dict(base_report)
    worse = changed(base_report, "0", status="saturated", severity="warning")
    assert [layer.name for layer in compare(base, worse).regressions] == ["0"]
    # three layers: too few for either view to compare (min_chain), so the base status is unjudged, not ok
    assert base.layer("0").status == "unjudged"
    assert compare(base, worse).regressions[0].reasons == ("unjudged -> saturated (warning)",)
    assert compare(worse, base).regressions == []


def test_from_zero_is_not_a_regression_but_to_zero_and_to_nan_are(base_report: dict[str, Any]) -> None:
    base = Report.from_dict(base_report)
    dead = changed(base_report, "4", grad_to_weight=0.0)
    assert compare(dead, base).regressions == []
    assert compare(base, dead).regressions[0].reasons == ("‖g‖/‖W‖ fell to exactly 0",)
    broken = changed(base_report, "4", output_grad_norm_median=float("nan"))
    assert compare(base, broken).regressions[0].reasons == ("‖dL/dz‖ became nan",)


def test_added_and_removed_layers_are_listed_not_judged(base_report: dict[str, Any]) -> None:
    base = Report.from_dict(base_report)
    new = Report.from_dict(base_report)
    new.layers = [dataclasses.replace(x, name="head") if x.name == "4" else x for x in new.layers]
    new.batch_size = 64
    comparison = compare(base, new)
    assert comparison.added == ["head"] and comparison.removed == ["4"] and comparison.regressions == []
    assert any("batch size (12 vs 64)" in note for note in comparison.notes)


def test_factor_must_exceed_one(base_report: dict[str, Any]) -> None:
    report = Report.from_dict(base_report)
    with pytest.raises(UserError):
        compare(report, report, factor=1.0)


# -- the command ----------------------------------------------------------------------------------------


def write(path: Path, report: Report | dict[str, Any]) -> Path:
    path.write_text(report.to_json() if isinstance(report, Report) else json.dumps(report))
    return path


def test_exit_codes_and_formats(cli, base_report: dict[str, Any], tmp_path: Path) -> None:
    base = write(tmp_path / "base.json", base_report)
    value = Report.from_dict(base_report).layer("0").output_grad_norm_median
    assert value is not None
    new = write(tmp_path / "new.json", changed(base_report, "0", output_grad_norm_median=value / 50))

    same = cli("compare", base, base)
    assert same.exit_code == 0, same.output
    assert "NO REGRESSION" in same.stdout

    worse = cli("compare", base, new)
    assert worse.exit_code == 1
    assert "REGRESSED: 1 of 3" in worse.stdout and "x0.02" in worse.stdout
    assert cli("compare", base, new, "--factor", "100").exit_code == 0

    as_json = cli("compare", base, new, "--format", "json")
    data = json.loads(as_json.stdout)
    assert as_json.exit_code == 1 and data["regressions"] == ["0"] and data["factor"] == DEFAULT_FACTOR
    assert data["layers"][0]["changes"]["output_grad_norm"]["ratio"] == pytest.approx(0.02)

    markdown = cli("compare", base, new, "--format", "markdown")
    assert markdown.stdout.startswith("## gradcheck compare") and "| `0` |" in markdown.stdout


def test_github_annotations_for_regressions(base_report: dict[str, Any], tmp_path: Path) -> None:
    from conftest import Cli

    base = write(tmp_path / "base.json", base_report)
    new = write(tmp_path / "new.json", changed(base_report, "2", status="vanishing", severity="error"))
    cli = Cli()
    cli.runner = type(cli.runner)(env={"COLUMNS": "160", "NO_COLOR": "1", "GITHUB_ACTIONS": "true"})
    result = cli("compare", base, new, "--format", "json")
    assert result.exit_code == 1
    json.loads(result.stdout)
    assert result.stderr.strip() == "::error title=gradcheck regression::2: unjudged -> vanishing (error)"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        ("{not json", "not JSON"),
        ('{"schema": "gradcheck.report/2"}', "not a gradcheck.report/1 document"),
        ('{"schema": "gradcheck.report/1", "model": "M"}', "malformed"),
        ("[1, 2]", "not a gradcheck.report/1 document"),
    ],
)
def test_unreadable_reports_exit_2(
    cli, base_report: dict[str, Any], tmp_path: Path, content: str | None, message: str
) -> None:
    base = write(tmp_path / "base.json", base_report)
    bad = tmp_path / "bad.json"
    if content is not None:
        bad.write_text(content)
    result = cli("compare", base, bad)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output and result.stdout == ""


# -- shell completion (Typer's) ---------------------------------------------------------------------------


def _gradcheck() -> str:
    found = shutil.which("gradcheck", path=str(Path(sys.executable).parent)) or shutil.which("gradcheck")
    if found is None:
        pytest.skip("the gradcheck console script is not installed")
    return found


def test_show_completion_prints_a_bash_script() -> None:
    # With shellingham installed, Typer detects the shell from the process tree, which a process started without
    # a shell among its ancestors (setsid, some CI runners) does not have ("Shell  not supported."): Typer's own
    # switch makes the named shell the one used, whatever started the tests.
    env = {**os.environ, "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}
    result = subprocess.run(
        [_gradcheck(), "--show-completion", "bash"], capture_output=True, text=True, timeout=60, env=env
    )
    assert result.returncode == 0, result.stderr
    assert "_GRADCHECK_COMPLETE" in result.stdout and "complete" in result.stdout


def test_completion_completes_commands_and_options_without_importing_torch() -> None:
    def complete(words: str) -> list[str]:
        env = {
            **os.environ,
            "_GRADCHECK_COMPLETE": "complete_bash",
            "COMP_WORDS": words,
            "COMP_CWORD": str(len(words.split(" ")) - 1),
            "PYTHONPROFILEIMPORTTIME": "1",
        }
        result = subprocess.run([_gradcheck()], capture_output=True, text=True, env=env, timeout=60)
        # -X importtime's lines end in "| module": torch must not be among them
        assert not any(line.rstrip().endswith("| torch") for line in result.stderr.splitlines())
        return result.stdout.split()

    assert {"analyze", "compare", "demo"} <= set(complete("gradcheck "))
    assert "--format" in complete("gradcheck analyze --for")
    assert set(complete("gradcheck analyze --format ")) >= {"table", "json", "markdown", "junit"}
