"""The README's CI recipes are the files in examples/, and each one runs here as the README says it runs: the
workflow's `run:` lines, pre-commit's entry, the pytest example through pytest, on a small project whose
model theory labels healthy or broken. A renamed flag or a changed exit code fails these tests."""

from __future__ import annotations

import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from theory import relu_chi1, sigmoid_chi1

from gradcheck_cli.diagnose.thresholds import Thresholds

ROOT = Path(__file__).parents[1]
EXAMPLES = ROOT / "examples"
README = (ROOT / "README.md").read_text()

DEPTH = 8  # hidden layers of width 64, then a 10-way head: 9 linear layers, 8 steps of the chain rule
MODEL = """
import torch
from torch import nn


def build_model() -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range({depth}):
        linear = nn.Linear(64, 64)
        {init}
        nn.init.zeros_(linear.bias)
        layers += [linear, {activation}()]
    return nn.Sequential(*layers, nn.Linear(64, 10))
"""
# name -> (activation, init, theory's chi1): ReLU with He's N(0, 2/fan_in) is critical (chi1 = 1); sigmoid with
# Glorot (sw2 = 1 on square layers) has chi1 = 0.056, so ||dL/dz|| shrinks by 0.236^8 = 1e-5 over the chain
MODELS = {
    "healthy": ("nn.ReLU", 'nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")', relu_chi1(2.0)),
    "broken": ("nn.Sigmoid", "nn.init.xavier_normal_(linear.weight)", sigmoid_chi1(1.0, 0.0)),
}


def _expected_exit(name: str) -> int:
    """What the README promises: exit 1 when theory's change over the chain passes the error factor."""
    total = math.sqrt(MODELS[name][2]) ** DEPTH
    return 1 if max(total, 1 / total) > Thresholds().signal_error else 0


def _write_model(root: Path, name: str) -> None:
    activation, init, _ = MODELS[name]
    (root / "models" / "net.py").write_text(MODEL.format(depth=DEPTH, init=init, activation=activation))


def _project(root: Path, name: str) -> Path:
    """A user's repository: models/net.py, tests/batch.safetensors, and the recipes copied where they go."""
    (root / "models").mkdir(parents=True)
    (root / "tests").mkdir()
    _write_model(root, name)
    generator = torch.Generator().manual_seed(0)
    batch = {"inputs": torch.randn(64, 64, generator=generator), "targets": torch.randint(0, 10, (64,))}
    save_file(batch, str(root / "tests" / "batch.safetensors"))
    shutil.copy(EXAMPLES / "pyproject.toml", root / "pyproject.toml")
    shutil.copy(EXAMPLES / "test_gradients.py", root / "tests" / "test_gradients.py")
    return root


def _environment(**extra: str) -> dict[str, str]:
    """The caller's environment with this interpreter's scripts (gradcheck, pytest) first on PATH."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, "NO_COLOR": "1", **extra}


# -- the README shows the files -----------------------------------------------------------------------------


def test_every_recipe_in_the_readme_is_its_file() -> None:
    """A fenced block whose first line names examples/X is that file, byte for byte; every file is shown."""
    shown = set()
    for block in re.findall(r"^```\w*\n(.*?)^```", README, flags=re.S | re.M):
        named = re.match(r"# (examples/[\w.-]+)", block)
        if named:
            assert block == (ROOT / named[1]).read_text(), f"README's {named[1]} differs from the file"
            shown.add(named[1])
    assert shown == {f"examples/{path.name}" for path in EXAMPLES.iterdir()}


def test_the_readme_opens_the_ci_section_with_the_demo_gate() -> None:
    """In CI starts with the failing demo and its exit code, then the passing twin (codes run in test_demos)."""
    from gradcheck_cli.demo_names import DEMO_LISTINGS

    section = README.split("\n## In CI\n", 1)[1].split("\n## ", 1)[0]
    runs = re.findall(r"^\$ gradcheck demo ([\w-]+).*?^\$ echo \$\?\n(\d+)$", section, flags=re.S | re.M)
    assert [name for name, _ in runs] == ["deep-sigmoid", "deep-relu-he"]
    assert section.index("$ gradcheck demo") < section.index("```yaml")
    for name, code in runs:
        assert int(code) == DEMO_LISTINGS[name].exit_code


# -- the GitHub workflow --------------------------------------------------------------------------------------


def workflow_steps(text: str) -> list[dict[str, str]]:
    """The steps of the workflow's one job, each its keys and one-line values: a reader for the subset of YAML
    the recipe uses (no block scalars, anchors or flow sequences in steps; anything else fails here)."""
    steps: list[dict[str, str]] = []
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "steps:") + 1
    for line in lines[start:]:
        if not line.strip() or line.strip().startswith("#"):
            continue
        item = re.fullmatch(r"\s+- ([\w-]+): (.+)", line) or re.fullmatch(r"\s+([\w-]+): (.+)", line)
        assert item, f"cannot read this workflow line: {line!r}"
        if line.lstrip().startswith("- "):
            steps.append({})
        assert item[2] not in ("|", ">"), "keep each run: on one line, so that the test reads it"
        steps[-1][item[1]] = item[2]
    return steps


def test_the_workflow_reader_agrees_with_yaml() -> None:
    """Where PyYAML is installed (transformers brings it), it must read the same steps as the small reader."""
    yaml = pytest.importorskip("yaml")
    text = (EXAMPLES / "github-workflow.yml").read_text()
    parsed = yaml.safe_load(text)
    (job,) = parsed["jobs"].values()
    expected = [{key: value for key, value in step.items() if key in ("run", "if", "uses")} for step in job["steps"]]
    ours = [
        {key: value for key, value in step.items() if key in ("run", "if", "uses")} for step in workflow_steps(text)
    ]
    assert ours == expected


def run_workflow(root: Path, summary: Path) -> list[tuple[str, int | None, str]]:
    """Each step as a GitHub runner takes it: `run:` under `bash -e`, skipped after a failure unless
    `if: always()`; `uses:` actions are GitHub's. The install step is checked, not run (nothing downloads)."""
    results: list[tuple[str, int | None, str]] = []
    failed = False
    for step in workflow_steps((EXAMPLES / "github-workflow.yml").read_text()):
        command = step.get("run")
        if command is None:
            continue
        if command.startswith("pip install"):
            project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["name"]
            assert command.endswith(f"pip install {project}"), command
            continue
        if failed and step.get("if") != "always()":
            results.append((command, None, ""))
            continue
        env = _environment(GITHUB_ACTIONS="true", GITHUB_STEP_SUMMARY=str(summary))
        done = subprocess.run(["bash", "-e", "-c", command], cwd=root, env=env, capture_output=True, text=True)
        failed = failed or done.returncode != 0
        results.append((command, done.returncode, done.stderr))
    return results


@pytest.mark.parametrize("name", MODELS)
def test_the_workflow_gates_the_job(tmp_path: Path, cli, monkeypatch, name: str) -> None:
    root = _project(tmp_path / "repo", "healthy")
    # the regression base, committed from main while the model was healthy
    monkeypatch.chdir(root)
    base = ("analyze", "models/net.py", "--data", "tests/batch.safetensors", "--format", "json", "--quiet")
    assert cli(*base, "--output", "tests/gradcheck-base.json").exit_code == 0
    _write_model(root, name)
    summary = tmp_path / "summary.md"
    results = run_workflow(root, summary)
    codes = [code for _, code, _ in results]
    gate = _expected_exit(name)
    # the README's promise: healthy, every step passes; broken, the gate step fails the job, the JSON step
    # still runs (if: always()) and fails too, and compare does not run
    assert codes == ([0, 0, 0] if gate == 0 else [1, 1, None]), results
    assert summary.read_text().startswith("## gradcheck:")
    junit = (root / "gradcheck.xml").read_text()
    annotations = results[0][2]
    if gate:
        assert "<failure" in junit and "::error title=gradcheck vanishing" in annotations
    else:
        assert "<failure" not in junit and "::error" not in annotations


# -- pre-commit ------------------------------------------------------------------------------------------------


def _hook() -> dict[str, str]:
    """The one hook of the pre-commit recipe, its values without YAML comments."""
    text = (EXAMPLES / "pre-commit-config.yaml").read_text()
    hook: dict[str, str] = {}
    for line in text.splitlines()[text.splitlines().index("    hooks:") + 1 :]:
        key, _, value = line.strip().removeprefix("- ").partition(": ")
        hook[key] = re.sub(r"\s+#.*$", "", value)
    return hook


@pytest.mark.parametrize("name", MODELS)
def test_the_pre_commit_hook_runs_as_configured(tmp_path: Path, name: str) -> None:
    hook = _hook()
    assert hook["language"] == "system" and hook["pass_filenames"] == "false"
    assert re.search(hook["files"], "models/net.py")  # a change to the model triggers it
    root = _project(tmp_path, name)
    # language: system runs the entry as a command in the repository; pass_filenames: false adds no files
    done = subprocess.run(shlex.split(hook["entry"]), cwd=root, env=_environment(), capture_output=True, text=True)
    assert done.returncode == _expected_exit(name), done.stdout + done.stderr
    assert "note: config: " in done.stdout  # TARGET and --data came from [tool.gradcheck]


# -- pytest ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_the_pytest_example_fails_with_the_findings_table(tmp_path: Path, name: str) -> None:
    root = _project(tmp_path, name)
    pytest_script = Path(sys.executable).parent / "pytest"
    done = subprocess.run(
        [str(pytest_script), "-p", "no:cacheprovider", "tests/test_gradients.py"],
        cwd=root,
        env=_environment(),
        capture_output=True,
        text=True,
    )
    assert done.returncode == _expected_exit(name), done.stdout + done.stderr
    if done.returncode == 0:
        assert "1 passed" in done.stdout
        return
    out = done.stdout
    # the user's line, then the report as the CLI prints it: the verdict, the flagged rows, findings, fixes
    assert ">       gradcheck_cli.assert_healthy(" in out and "assertions.py" not in out
    assert "E       AssertionError: FAIL: " in out
    assert re.search(r"^E       ERROR   0 vanishing \[signal\]: x0\.2\d+ per layer over 9 layers", out, flags=re.M)
    assert re.search(r"^E               fix( \(the \d+ above\))?: ", out, flags=re.M)
    assert "Finding(" not in out and "\x1b[" not in out
    assert "FAILED tests/test_gradients.py::test_gradients_are_healthy" in out and "1 failed" in out


def _built(name: str) -> torch.nn.Module:
    namespace: dict[str, object] = {}
    activation, init, _ = MODELS[name]
    exec(MODEL.format(depth=DEPTH, init=init, activation=activation), namespace)
    return namespace["build_model"]()  # type: ignore[operator,no-any-return]


def test_assert_healthy_gates_as_the_cli_does() -> None:
    """In-process: the same gate as `gradcheck analyze` (--fail-on, --fail-level), the message in plain text."""
    import gradcheck_cli

    batch = (torch.randn(64, 64), torch.randint(0, 10, (64,)))
    report = gradcheck_cli.assert_healthy(_built("healthy"), batch)
    assert report.signal.gain_per_layer == pytest.approx(1.0, rel=0.15)  # theory: chi1 = 1 (width 64, 8 layers)
    broken = _built("broken")
    with pytest.raises(AssertionError) as failure:
        gradcheck_cli.assert_healthy(broken, batch)
    message = str(failure.value)
    assert message.startswith("FAIL: ") and "\x1b[" not in message
    assert "ERROR   0 vanishing [signal]: " in message and "        fix" in message
    # as `gradcheck analyze --fail-on exploding` exits 0 on this model, so does the assertion
    assert gradcheck_cli.assert_healthy(broken, batch, fail_on="exploding").findings
    with pytest.raises(gradcheck_cli.UserError, match="unknown --fail-on kind"):
        gradcheck_cli.assert_healthy(broken, batch, fail_on=["vanishing", "bogus"])
    with pytest.raises(gradcheck_cli.UserError, match="unknown --fail-level"):
        gradcheck_cli.assert_healthy(broken, batch, fail_level="info")
