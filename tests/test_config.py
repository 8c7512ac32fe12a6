"""[tool.gradcheck] in pyproject.toml: found upward from the current directory, overridden by flags, checked."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gradcheck_cli.errors import UserError
from gradcheck_cli.resolve import config


@pytest.fixture
def project(tmp_path: Path, mlp_file: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project folder holding the model, with the current directory in a subfolder of it."""
    (tmp_path / "models").mkdir()
    mlp_file.rename(tmp_path / "models" / "net.py")
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "sub" / "deeper")
    return tmp_path


def pyproject(folder: Path, body: str) -> Path:
    path = folder / "pyproject.toml"
    path.write_text(textwrap.dedent(body))
    return path


def test_target_and_options_come_from_the_nearest_table_upward(cli, project: Path) -> None:
    pyproject(project / "sub", "[project]\nname = 'no table here'\n")  # nearer, but no [tool.gradcheck]
    path = pyproject(
        project,
        """
        [tool.gradcheck]
        target = "models/net.py"
        steps = 2
        fail-on = ["vanishing", "nan"]
        signal_warning = 30
        eval = true
        """,
    )
    code, report = cli.json("analyze")
    assert code == 0
    assert report["steps"] == 2 and report["mode"] == "eval"
    assert report["thresholds"]["signal_warning"] == 30
    assert report["target"] == str(Path("..", "..", "models", "net.py"))  # relative to the pyproject, from here
    assert report["notes"][0] == f"config: {path.resolve()}"


def test_flags_on_the_command_line_win(cli, project: Path) -> None:
    pyproject(project, '[tool.gradcheck]\ntarget = "models/net.py"\nsteps = 2\nfail-on = "vanishing"\n')
    code, report = cli.json("analyze", project / "models" / "net.py", "--steps", "1")
    assert code == 0 and report["steps"] == 1
    # the configured fail-on applies: the exploding net fails only when the flag asks for it
    pyproject(project, '[tool.gradcheck]\ntarget = "models/net.py"\nfail-on = "nan"\nupdate-warning = 1e-9\n')
    assert cli("analyze", "--fail-level", "warning").exit_code == 0
    assert cli("analyze", "--fail-level", "warning", "--fail-on", "vanishing,exploding").exit_code == 1


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("stepz = 3", "unknown key 'stepz' in [tool.gradcheck]"),
        ('steps = "many"', "[tool.gradcheck] steps = 'many'"),
        ('format = "yaml"', "[tool.gradcheck] format = 'yaml'"),
        ("seed = [1, 2]", "seed must be a single value"),
        ("steps = ", "cannot read it"),
    ],
)
def test_a_bad_table_is_exit_2_naming_the_file_and_key(cli, project: Path, body: str, message: str) -> None:
    path = pyproject(project, f'[tool.gradcheck]\ntarget = "models/net.py"\n{body}\n')
    result = cli("analyze")
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"error: {path.resolve()}") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""


def test_without_a_table_target_is_required(cli, project: Path) -> None:
    result = cli("analyze")
    assert result.exit_code == 2 and "target" in result.output.lower()


def test_other_commands_ignore_the_table(cli, project: Path) -> None:
    pyproject(project, "[tool.gradcheck]\nstepz = 3\n")
    assert cli("demo", "--list").exit_code == 0


def test_paths_are_rebased_on_the_pyproject_folder(tmp_path: Path) -> None:
    found = config.Config(
        tmp_path / "pyproject.toml",
        {"target": "models/net.py:build", "data": "randn:4,8", "loss": "losses.py:fn", "plot": "out/f.png"},
    )
    names = {"target": "target", "data": "data", "loss": "loss", "plot": "plot"}
    values = config.defaults(found, names, cwd=tmp_path / "sub")
    assert values == {
        "target": str(Path("..", "models", "net.py")) + ":build",
        "data": "randn:4,8",  # not a path
        "loss": str(Path("..", "losses.py")) + ":fn",
        "plot": str(Path("..", "out", "f.png")),
    }


def test_find_returns_none_without_a_table(tmp_path: Path) -> None:
    assert config.find(tmp_path) is None
    pyproject(tmp_path, "[tool.gradcheck]\nsteps = 2\nsignal_warning = 30\n")
    (tmp_path / "a" / "b").mkdir(parents=True)
    found = config.find(tmp_path / "a" / "b")
    assert found is not None and found.values == {"steps": 2, "signal-warning": 30}
    pyproject(tmp_path, "[tool]\ngradcheck = 3\n")
    with pytest.raises(UserError, match="not a table"):
        config.find(tmp_path)


def test_help_does_not_import_torch_with_a_table(project: Path) -> None:
    pyproject(project, '[tool.gradcheck]\ntarget = "models/net.py"\nsteps = 4\n')
    code = (
        "import sys\n"
        "from gradcheck_cli.cli import app\n"
        "try:\n"
        "    app(['analyze', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(json.dumps('torch' in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", "import json\n" + code], capture_output=True, text=True, check=True)
    assert json.loads(result.stdout.strip().splitlines()[-1]) is False
