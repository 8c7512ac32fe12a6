"""Issue 5's outputs, each read back by a parser as a user's tool would: the PNG/SVG by its bytes, JUnit with
xml.etree, TensorBoard events with tensorboard's EventAccumulator, the gradients with safetensors.load_file
against gradients computed here with plain autograd; GitHub annotations from stderr."""

from __future__ import annotations

import json
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
from conftest import MLP_FILE, Cli
from torch import nn

import gradcheck_cli
from gradcheck_cli.gate import Gate
from gradcheck_cli.reduce import VALUE_BINS, value_histogram
from gradcheck_cli.render import github
from gradcheck_cli.report import Report

SCHEMA = json.loads((Path(__file__).parents[1] / "gradcheck_cli" / "report.schema.json").read_text())
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# 24 tanh layers at sigma_w^2 = 0.5 (ordered phase): dL/dz shrinks x0.7 per layer toward the input, so the
# first layers are flagged vanishing with errors; fast enough for a CLI test.
VANISHING = """
import torch
from torch import nn

def build_model():
    torch.manual_seed(0)
    layers = []
    for _ in range(24):
        linear = nn.Linear(32, 32)
        nn.init.normal_(linear.weight, 0.0, (0.5 / 32) ** 0.5)
        nn.init.zeros_(linear.bias)
        layers += [linear, nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(32, 4))

def get_batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(16, 32, generator=g), torch.randint(0, 4, (16,), generator=g)
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One `gradcheck analyze` with every file output at once (the outputs are independent of each other)."""
    folder = tmp_path_factory.mktemp("outputs")
    model = folder / "mlp_model.py"
    model.write_text(textwrap.dedent(MLP_FILE))
    paths = {
        "plot": folder / "flow.png",
        "tensorboard": folder / "tb",
        "save_grads": folder / "grads.safetensors",
        "junit": folder / "report.xml",
        "json": folder / "report.json",
    }
    cli = Cli()
    files = ["--plot", paths["plot"], "--tensorboard", paths["tensorboard"], "--save-grads", paths["save_grads"]]
    result = cli("analyze", model, "--format", "junit", "--output", paths["junit"], *files, "--steps", "2")
    assert result.exit_code == 0, result.output
    as_json = cli("analyze", model, "--format", "json", "--output", paths["json"], "--steps", "2", "--plot",
                  folder / "again.svg")  # fmt: skip
    assert as_json.exit_code == 0, as_json.output
    return {"folder": folder, "model": model, "stdout": result.stdout, **paths}


# -- the report carries what the pictures need ------------------------------------------------------------


def test_value_histograms_count_every_value_between_the_extremes() -> None:
    torch.manual_seed(0)
    weight, bias = torch.randn(16, 8), torch.randn(16) * 3
    limit, counts = value_histogram([weight, bias])
    assert float(limit) == pytest.approx(max(weight.abs().max(), bias.abs().max()).item())
    assert counts.sum().item() == pytest.approx(16 * 8 + 16)
    assert len(counts) == VALUE_BINS
    everything = torch.cat([weight.reshape(-1), bias])
    expected = torch.histc(everything / limit, bins=VALUE_BINS, min=-1, max=1)
    assert torch.equal(counts, expected)


def test_value_histograms_are_off_by_default_and_per_step_when_asked() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    batch = (torch.randn(12, 8), torch.randint(0, 4, (12,)))
    plain = gradcheck_cli.analyze(model, batch, steps=2)
    assert all(layer.value_histograms is None for layer in plain.layers)
    report = gradcheck_cli.analyze(model, batch, steps=2, value_histograms=True)
    model.zero_grad()
    nn.functional.cross_entropy(model(batch[0]), batch[1]).backward()
    for layer, module in zip(report.layers, (model[0], model[2]), strict=True):
        assert [h.step for h in layer.value_histograms or ()] == [0, 1]
        first = (layer.value_histograms or ())[0]
        assert sum(first.counts) == layer.params
        largest = max(module.weight.grad.abs().max().item(), module.bias.grad.abs().max().item())
        assert first.limit == pytest.approx(largest, rel=1e-6)


def test_report_round_trips_through_json_and_matches_the_schema(run: dict[str, Any]) -> None:
    data = json.loads(run["json"].read_text())
    jsonschema.validate(data, SCHEMA)
    report = Report.from_dict(data)
    assert json.loads(report.to_json()) == data
    assert len(data["histogram_edges"]) == len(data["layers"][0]["histogram"]) + 1
    assert data["layers"][0]["value_histograms"][0]["step"] == 0  # asked for by --plot


def test_from_dict_refuses_other_documents() -> None:
    with pytest.raises(ValueError, match=r"gradcheck\.report/1"):
        Report.from_dict({"schema": "something/2"})
    with pytest.raises(ValueError, match="malformed"):
        Report.from_dict({"schema": "gradcheck.report/1", "model": "M"})


# -- --plot ---------------------------------------------------------------------------------------------


def test_plot_writes_a_png_and_an_svg(run: dict[str, Any]) -> None:
    png = run["plot"].read_bytes()
    assert png.startswith(PNG_MAGIC)
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width >= 1200 and height >= 700
    svg = (run["folder"] / "again.svg").read_text()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    assert "signal view" in svg and "update view" in svg
    assert not [p.name for p in run["folder"].iterdir() if p.name.startswith(".")]  # no temporary files left


def test_plot_is_drawn_from_the_json_report_alone(run: dict[str, Any], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from gradcheck_cli.render import plot

    report = Report.from_dict(json.loads(run["json"].read_text()))
    plot.save(report, tmp_path / "from_json.png", Gate.of(report, ["vanishing"], "error"))
    assert (tmp_path / "from_json.png").read_bytes().startswith(PNG_MAGIC)


def test_plot_marks_flagged_layers_and_switches_to_a_heat_map_for_deep_models(cli, write, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from gradcheck_cli.render import plot

    path = write("vanishing.py", VANISHING)
    code, data = cli.json("analyze", path, "--fail-on", "vanishing")
    assert code == 1
    report = Report.from_dict(data)
    figure = plot.build(report, Gate.of(report, ["vanishing"], "error"))
    texts = [t.get_text() for ax in figure.get_axes() for t in ax.texts]
    assert "vanishing" in texts  # the kind written beside the flagged run
    assert any(
        len(ax.collections) and ax.get_title(loc="left").startswith("gradient magnitudes per layer")
        for ax in figure.get_axes()
    )
    figure.savefig(tmp_path / "deep.png")


@pytest.mark.parametrize(("suffix", "message"), [(".jpg", "use .png or .svg"), (".png", "does not exist")])
def test_plot_refuses_bad_paths_before_running(cli, mlp_file: Path, tmp_path: Path, suffix: str, message: str) -> None:
    target = tmp_path / ("missing/flow" if message == "does not exist" else "flow")
    result = cli("analyze", mlp_file, "--plot", f"{target}{suffix}")
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output


def test_missing_extras_give_one_line_and_exit_2(cli, mlp_file: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    result = cli("analyze", mlp_file, "--plot", tmp_path / "f.png")
    assert result.exit_code == 2
    assert result.stderr.strip() == 'error: --plot needs matplotlib: pip install "gradcheck-cli[plot]"'
    result = cli("analyze", mlp_file, "--tensorboard", tmp_path / "tb")
    assert result.exit_code == 2
    assert result.stderr.strip() == 'error: --tensorboard needs tensorboard: pip install "gradcheck-cli[tensorboard]"'


# -- --tensorboard ---------------------------------------------------------------------------------------


def test_tensorboard_events_hold_histograms_and_norms_per_layer(run: dict[str, Any]) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run["tensorboard"]), size_guidance={"histograms": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    report = Report.from_dict(json.loads(run["json"].read_text()))
    for layer in ("0", "2", "4"):
        assert f"gradients/{layer}" in tags["histograms"]
        for quantity in ("grad_norm", "output_grad_norm", "grad_to_weight"):
            assert f"{quantity}/{layer}" in tags["scalars"]
    assert "loss" in tags["scalars"]
    histograms = events.Histograms("gradients/0")
    assert [h.step for h in histograms] == [0, 1]
    assert histograms[0].histogram_value.num == report.layer("0").params
    norms = [s.value for s in events.Scalars("grad_norm/2")]
    assert norms == pytest.approx(list(report.layer("2").grad_norm_steps), rel=1e-6)


# -- --save-grads ----------------------------------------------------------------------------------------


def test_saved_gradients_equal_plain_autograd(run: dict[str, Any]) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    saved = load_file(str(run["save_grads"]))
    namespace: dict[str, Any] = {}
    torch.manual_seed(0)  # gradcheck seeds with --seed (0) before importing the model file
    exec(compile(run["model"].read_text(), str(run["model"]), "exec"), namespace)
    model, (inputs, targets) = namespace["model"], namespace["get_batch"]()
    nn.functional.cross_entropy(model(inputs), targets).backward()
    expected = {
        f"step{step}/{name.replace('.', '/', 1)}": p.grad for step in (0, 1) for name, p in model.named_parameters()
    }
    assert set(saved) == set(expected)
    for key, grad in expected.items():
        assert torch.equal(saved[key], grad), key  # bit for bit: the same passes, the same bytes
    with safe_open(str(run["save_grads"]), "pt") as handle:
        metadata = handle.metadata()
    assert json.loads(metadata["step1/2/weight"]) == {"step": 1, "layer": "2", "parameter": "2.weight", "layers": ["2"]}
    assert metadata["format"] == "gradcheck.grads/1"


def test_saved_gradients_of_tied_and_sparse_and_half_tensors(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(20, 8, sparse=True)
            self.head = nn.Linear(8, 20, bias=False)
            self.head.weight = self.embed.weight
            self.scale = nn.Parameter(torch.ones(8, dtype=torch.float16))

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.embed(ids) * self.scale.float())

    model = Tied()
    ids = torch.randint(0, 20, (4, 5))
    gradcheck_cli.analyze(model, (ids, ids), steps=1, save_grads=tmp_path / "g.safetensors")
    saved = load_file(str(tmp_path / "g.safetensors"))
    assert set(saved) == {"step0/embed/weight", "step0/(model)/scale"}  # the tied tensor once, the root as (model)
    assert saved["step0/(model)/scale"].dtype == torch.float16
    assert saved["step0/embed/weight"].shape == (20, 8)


def test_save_grads_needs_a_safetensors_name(cli, mlp_file: Path, tmp_path: Path) -> None:
    result = cli("analyze", mlp_file, "--save-grads", tmp_path / "grads.pt")
    assert result.exit_code == 2 and "not a .safetensors file" in result.stderr


# -- --format junit --------------------------------------------------------------------------------------


def test_junit_has_a_testcase_per_layer_and_a_failure_per_failing_finding(cli, write, tmp_path: Path) -> None:
    path = write("vanishing.py", VANISHING)
    result = cli("analyze", path, "--format", "junit", "--fail-on", "vanishing", "--output", tmp_path / "r.xml")
    assert result.exit_code == 1
    root = ET.fromstring(result.stdout)
    assert ET.parse(tmp_path / "r.xml").getroot().attrib == root.attrib
    suite = root.find("testsuite")
    assert suite is not None and suite.get("name") == "gradcheck"
    cases = suite.findall("testcase")
    _, data = cli.json("analyze", path, "--fail-on", "vanishing")
    assert [c.get("name") for c in cases] == [layer["name"] for layer in data["layers"]]
    failing = [f for f in data["findings"] if f["kind"] == "vanishing" and f["severity"] == "error"]
    failures = [(c.get("name"), f.get("type")) for c in cases for f in c.findall("failure")]
    covered = {name for f in failing for name in (f["layer"], *f["also"])}  # one trend covers several layers
    assert failures == [(c.get("name"), "vanishing") for c in cases if c.get("name") in covered] and failures
    assert suite.get("failures") == str(len({name for name, _ in failures}))
    assert suite.get("tests") == str(len(cases))
    warnings = [f for f in data["findings"] if f["severity"] == "warning"]
    outs = "".join(c.findtext("system-out") or "" for c in cases)
    assert all(f["message"] in outs for f in warnings)


def test_junit_of_a_healthy_model(run: dict[str, Any]) -> None:
    root = ET.fromstring(run["stdout"])
    assert root.get("failures") == "0" and root.get("tests") == "3"
    assert ET.parse(run["junit"]).getroot().get("tests") == "3"


# -- GitHub annotations ----------------------------------------------------------------------------------


def test_github_annotations_go_to_stderr_and_keep_json_clean(write) -> None:
    path = write("vanishing.py", VANISHING)
    cli = Cli()
    cli.runner = type(cli.runner)(env={"COLUMNS": "160", "NO_COLOR": "1", "GITHUB_ACTIONS": "true"})
    result = cli("analyze", path, "--format", "json", "--fail-on", "vanishing")
    assert result.exit_code == 1
    data = json.loads(result.stdout)  # stdout is the document, nothing else
    lines = result.stderr.splitlines()
    errors = [line for line in lines if line.startswith("::error ")]
    warnings = [line for line in lines if line.startswith("::warning ")]
    assert len(errors) + len(warnings) == len(data["findings"])
    assert errors and errors[0].startswith("::error title=gradcheck vanishing,file=")
    assert all(line.count("::") == 2 for line in errors + warnings)  # one command per line, message escaped


def test_no_annotations_outside_github(cli, write) -> None:
    result = cli("analyze", write("vanishing.py", VANISHING), "--format", "json")
    assert "::error" not in result.stderr and "::warning" not in result.stderr


def test_annotation_escaping() -> None:
    line = github.command("error", "gradcheck a:b,c", "50% of\nunits", "dir/model.py")
    assert line == "::error title=gradcheck a%3Ab%2Cc,file=dir/model.py::50%25 of%0Aunits"
    assert github.enabled({"GITHUB_ACTIONS": "true"}) and not github.enabled({})


# -- the terminal ---------------------------------------------------------------------------------------


def test_table_shows_a_histogram_column_per_layer(cli, mlp_file: Path) -> None:
    result = cli("analyze", mlp_file)
    assert "|g| 1e" in result.stdout  # the shared axis of the sparklines
    rows = [line for line in result.stdout.splitlines() if line.startswith(("0 ", "2 ", "4 "))]
    assert len(rows) == 3 and all(any(ch in row for ch in "▁▂▃▄▅▆▇█") for row in rows)


def test_no_progress_bar_when_stderr_is_not_a_terminal(cli, mlp_file: Path) -> None:
    result = cli("analyze", mlp_file)
    assert result.stderr == ""
    assert "forward/backward" not in result.stdout


def test_nan_gradients_still_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from gradcheck_cli.render import plot

    class Bad(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.log(self.a(x)))  # log of negatives: NaN

    report = gradcheck_cli.analyze(Bad(), (torch.randn(8, 4), torch.randint(0, 2, (8,))), value_histograms=True)
    assert not report.healthy
    plot.save(report, tmp_path / "nan.png", Gate.of(report, ["nan"], "error"))
    assert (tmp_path / "nan.png").stat().st_size > 10_000
