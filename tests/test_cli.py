"""The command line as a user and a CI step meet it: exit codes, machine output, the demos."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

SCHEMA = json.loads((Path(__file__).parents[1] / "gradcheck_cli" / "report.schema.json").read_text())

EXPLODING = """
import torch
from torch import nn

def build_model():
    torch.manual_seed(0)
    layers = []
    for _ in range(6):
        linear = nn.Linear(64, 64)
        nn.init.normal_(linear.weight, 0.0, (32 / 64) ** 0.5)  # 16x He variance: chi1 = 16
        layers += [linear, nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(64, 10))

def get_batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(32, 64, generator=g), torch.randint(0, 10, (32,), generator=g)
"""


def test_healthy_model_exits_0_with_a_table(cli, mlp_file: Path) -> None:
    result = cli("analyze", mlp_file)
    assert result.exit_code == 0, result.output
    assert "PASS" in result.stdout
    for column in ("layer", "‖g‖", "‖g‖/‖W‖", "‖dL/dz‖", "status"):
        assert column in result.stdout


def test_bad_gradients_exit_1_and_name_the_layer(cli, write) -> None:
    path = write("exploding.py", EXPLODING)
    result = cli("analyze", path)
    assert result.exit_code == 1, result.output
    assert "exploding" in result.stdout and "FAIL" in result.stdout


def test_fail_on_and_fail_level_select_what_fails(cli, write) -> None:
    path = write("exploding.py", EXPLODING)
    assert cli("analyze", path, "--fail-on", "vanishing,nan").exit_code == 0
    assert cli("analyze", path, "--fail-on", "exploding").exit_code == 1
    demo_warning = cli("demo", "sigmoid-mlp", "--format", "json")
    assert demo_warning.exit_code == 0  # the demo's findings are warnings
    assert cli("demo", "sigmoid-mlp", "--format", "json", "--fail-level", "warning").exit_code == 1


@pytest.mark.parametrize(
    "args",
    [
        ["analyze", "missing_model.py"],
        ["analyze", "{model}", "--fail-on", "vanishing,bogus"],
        ["analyze", "{model}", "--steps", "0"],
        ["analyze", "{model}", "--signal-warning", "500"],
        ["analyze", "{model}", "--loss", "hinge"],
        ["analyze", "{model}", "--format", "yaml"],
        ["analyze", "{model}", "--output", "report.xyz"],
        ["analyze", "{model}", "--data", "randn:zero"],
        ["demo", "no-such-demo"],
    ],
)
def test_bad_input_exits_2_with_one_line_and_no_traceback(cli, mlp_file: Path, args: list[str]) -> None:
    result = cli(*[a.replace("{model}", str(mlp_file)) for a in args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.stdout == ""


def test_debug_shows_the_traceback(cli) -> None:
    result = cli("analyze", "missing_model.py", "--debug")
    assert result.exit_code == 2
    assert "Traceback" in result.stderr


def test_json_output_is_only_the_document_and_matches_the_schema(cli, mlp_file: Path) -> None:
    code, report = cli.json("analyze", mlp_file)
    assert code == 0
    jsonschema.validate(report, SCHEMA)
    assert report["schema"] == "gradcheck.report/1"
    assert report["healthy"] is True and report["steps"] == 3 and len(report["loss"]) == 3
    assert [layer["name"] for layer in report["layers"]] == ["0", "2", "4"]
    assert [p["name"] for p in report["parameters"]] == [
        "0.weight",
        "0.bias",
        "2.weight",
        "2.bias",
        "4.weight",
        "4.bias",
    ]
    assert all(p["grad_norm"] > 0 for p in report["parameters"])


def test_json_of_a_broken_model_matches_the_schema(cli, write) -> None:
    path = write(
        "nan_model.py",
        "import torch\nfrom torch import nn\n"
        "class Log(nn.Module):\n    def forward(self, x):\n        return torch.log(x)\n"
        "model = nn.Sequential(nn.Linear(8, 8), Log(), nn.Linear(8, 2))\n",
    )
    code, report = cli.json("analyze", path, "--data", "randn:6,8")
    assert code == 1
    jsonschema.validate(report, SCHEMA)
    assert report["healthy"] is False
    assert report["nan_origin"]["module"] == "1"
    assert {f["kind"] for f in report["findings"]} == {"nan"}


def test_output_files(cli, mlp_file: Path, tmp_path: Path) -> None:
    as_json = tmp_path / "report.json"
    as_md = tmp_path / "report.md"
    as_txt = tmp_path / "report.txt"
    for path in (as_json, as_md, as_txt):
        assert cli("analyze", mlp_file, "--output", path).exit_code == 0
    jsonschema.validate(json.loads(as_json.read_text()), SCHEMA)
    assert as_md.read_text().startswith("## gradcheck: Sequential")
    assert "| layer | type |" in as_md.read_text()
    assert "PASS" in as_txt.read_text()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp files left


def test_markdown_format(cli, mlp_file: Path) -> None:
    result = cli("analyze", mlp_file, "--format", "markdown")
    assert result.exit_code == 0
    assert result.stdout.startswith("## gradcheck:")


def test_demo_list_prints_one_name_per_line(cli) -> None:
    result = cli("demo", "--list")
    assert result.exit_code == 0
    names = [line.split()[0] for line in result.stdout.splitlines()]
    assert names == ["sigmoid-mlp", "relu-he-mlp", "dying-relu", "deep-sigmoid", "exploding-relu", "deep-relu-he"]


def test_sigmoid_demo_flags_layer_one_with_the_honest_cause(cli) -> None:
    _, report = cli.json("demo", "sigmoid-mlp")
    first = report["layers"][0]
    assert first["name"] == "net.fc1" and first["status"] == "vanishing" and first["severity"] == "warning"
    finding = next(f for f in report["findings"] if f["layer"] == "net.fc1" and f["kind"] == "vanishing")
    assert finding["view"] == "update"
    assert "not standardised" in finding["message"]
    assert "the backpropagated signal is not the cause" in finding["message"]
    assert "standardise" in finding["fix"]
    # the numbers behind it: per-element gradient spread far narrower in layer 1 than layer 4 (the tutorial's
    # histograms), while dL/dz stays flat along the depth
    rms = {layer["name"]: layer["rms"] for layer in report["layers"]}
    assert rms["net.fc1"] < rms["net.fc4"] / 3
    assert 0.8 < report["signal"]["gain_per_layer"] < 1.25


def test_fixed_demo_is_clean_even_at_warning_level(cli) -> None:
    code, report = cli.json("demo", "relu-he-mlp", "--fail-level", "warning")
    assert code == 0
    assert report["findings"] == []


def test_demo_takes_analyze_options(cli, tmp_path: Path) -> None:
    out = tmp_path / "demo.json"
    result = cli("demo", "sigmoid-mlp", "--steps", "2", "--train-steps", "3", "--output", out, "--format", "markdown")
    assert result.exit_code == 0
    report = json.loads(out.read_text())
    assert report["steps"] == 2 and report["train_steps"] == 3 and len(report["train_loss"]) == 3


def test_python_dash_m_works_like_the_script(mlp_file: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gradcheck_cli", "analyze", str(mlp_file), "--format", "json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["healthy"] is True


def test_help_and_version_do_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from gradcheck_cli.cli import app\n"
        "for args in (['--help'], ['--version'], ['analyze', '--help'], ['demo', '--list']):\n"
        "    try:\n"
        "        app(args)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "False"


GC_PROBE = """
import gc
import torch
from torch import nn

SEEN = []

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        SEEN.append(gc.isenabled())
        return self.fc(x)

model = Net()

def get_batch():
    return torch.randn(16, 8), torch.randint(0, 4, (16,))
"""


def test_the_cli_runs_the_users_code_with_the_garbage_collector_on(write) -> None:
    """main() switches the collector off only while gradcheck's own imports load (cli._tune_process):
    the model file, its forward passes and whatever runs after main() see it on."""
    path = write("gc_probe.py", GC_PROBE)
    code = (
        "import gc, sys\n"
        "from gradcheck_cli.cli import main\n"
        f"sys.argv = ['gradcheck', 'analyze', {str(path)!r}, '--format', 'json', '--steps', '2']\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as exit:\n"
        "    code = exit.code\n"
        "probe = next(m for name, m in sys.modules.items() if name.startswith('gradcheck_user_gc_probe'))\n"
        "print(code, probe.SEEN, gc.isenabled(), file=sys.stderr)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.stderr.strip().splitlines()[-1] == "0 [True, True] True", result.stderr


@pytest.mark.parametrize("seed", ["1", "2"])
def test_demo_verdicts_hold_for_other_seeds(cli, seed: str) -> None:
    _, report = cli.json("demo", "sigmoid-mlp", "--seed", seed)
    assert report["layers"][0]["status"] == "vanishing"
    code, fixed = cli.json("demo", "relu-he-mlp", "--seed", seed, "--fail-level", "warning")
    assert code == 0 and fixed["findings"] == []
