"""TARGET conventions, weights, --data specs and --loss choices, through the API the CLI uses."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file, save_model

from gradcheck_cli.api import analyze_target
from gradcheck_cli.errors import UserError
from gradcheck_cli.resolve.specs import parse_data_spec, parse_target

NET = "nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))"
HEADER = "import torch\nfrom torch import nn\n"


def _file(write, name: str, body: str) -> str:
    return str(write(name, HEADER + body))


# -- TARGET -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "source", "is_file", "name"),
    [
        ("model.py", "model.py", True, None),
        ("dir/model.py:Net", "dir/model.py", True, "Net"),
        ("pkg.models:build", "pkg.models", False, "build"),
        ("pkg.models", "pkg.models", False, None),
        ("C:\\models\\m.py", "C:\\models\\m.py", True, None),
        ("C:\\models\\m.py:Net", "C:\\models\\m.py", True, "Net"),
        ("model.py:ns.Net", "model.py", True, "ns.Net"),
        ("m:Net", "m", False, "Net"),
        ("C:m.py", "C:m.py", True, None),
    ],
)
def test_parse_target(spec: str, source: str, is_file: bool, name: str | None) -> None:
    target = parse_target(spec)
    assert (target.source, target.is_file, target.name) == (source, is_file, name)


@pytest.mark.parametrize("spec", ["", "model.py:", "model.py:1abc", "not a target!"])
def test_parse_target_rejects(spec: str) -> None:
    with pytest.raises(UserError):
        parse_target(spec)


@pytest.mark.parametrize(
    ("body", "target_suffix"),
    [
        (f"model = {NET}\n", ""),
        (f"def build_model():\n    return {NET}\n", ""),
        (f"def get_model():\n    return {NET}\n", ""),
        (f"def create_model():\n    return {NET}\n", ""),
        (
            "class Net(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
            f"        self.body = {NET}\n    def forward(self, x):\n        return self.body(x)\n",
            "",
        ),
        (f"my_net = {NET}\n", ":my_net"),
        (f"def make():\n    return {NET}\n", ":make"),
    ],
)
def test_model_conventions(write, body: str, target_suffix: str) -> None:
    path = _file(write, "conv.py", body)
    report = analyze_target(path + target_suffix, data="randn:6,8", steps=1)
    assert [layer.type for layer in report.layers] == ["Linear", "Linear"]
    assert all(layer.grad_norm for layer in report.layers)


def test_model_variable_wins_over_factories_and_classes(write) -> None:
    body = (
        "class Other(nn.Module):\n    def forward(self, x):\n        return x\n"
        f"model = nn.Sequential(nn.Linear(8, 3))\ndef build_model():\n    return {NET}\n"
    )
    report = analyze_target(_file(write, "pick.py", body), data="randn:4,8", steps=1)
    assert [layer.name for layer in report.layers] == ["0"]


def test_model_option_and_target_name(write) -> None:
    body = f"a = {NET}\nb = nn.Sequential(nn.Linear(8, 2))\n"
    path = _file(write, "two.py", body)
    assert len(analyze_target(path, model_name="b", data="randn:4,8", steps=1).layers) == 1
    assert len(analyze_target(path + ":a", data="randn:4,8", steps=1).layers) == 2
    with pytest.raises(UserError, match="give the name once"):
        analyze_target(path + ":a", model_name="b", data="randn:4,8")


def test_several_classes_are_listed(write) -> None:
    body = "".join(
        f"class {n}(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        f"        self.fc = nn.Linear(8, 2)\n    def forward(self, x):\n        return self.fc(x)\n"
        for n in ("Alpha", "Beta")
    )
    with pytest.raises(UserError, match="several models: Alpha, Beta") as info:
        analyze_target(_file(write, "several.py", body), data="randn:4,8")
    assert "several.py:Alpha" in info.value.hint


def test_unknown_name_lists_candidates(write) -> None:
    path = _file(write, "named.py", f"net = {NET}\n")
    with pytest.raises(UserError, match="no attribute 'nope'") as info:
        analyze_target(path + ":nope", data="randn:4,8")
    assert "net" in info.value.hint


def test_package_module_target(tmp_path: Path, monkeypatch) -> None:
    package = tmp_path / "zoo_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(HEADER + f"def small():\n    return {NET}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    report = analyze_target("zoo_pkg.nets:small", data="randn:4,8", steps=1)
    assert report.target == "zoo_pkg.nets:small"
    assert not list(package.rglob("__pycache__")), "importing must not write bytecode next to user files"


def test_importing_a_model_file_writes_nothing(write, tmp_path: Path) -> None:
    path = _file(write, "clean.py", f"model = {NET}\n")
    analyze_target(path, data="randn:4,8", steps=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean.py"]


# -- weights ----------------------------------------------------------------------------------------------


TIED = """
class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(40, 8)
        self.head = nn.Linear(8, 40, bias=False)
        self.head.weight = self.embed.weight
    def forward(self, ids):
        return self.head(torch.tanh(self.embed(ids)))
"""


def test_weights_load_including_tied_tensors(write, tmp_path: Path) -> None:
    path = _file(write, "tied.py", TIED)
    namespace: dict = {}
    exec(compile(HEADER + TIED, "tied", "exec"), namespace)
    trained = namespace["TiedLM"]()
    with torch.no_grad():
        trained.embed.weight.fill_(0.25)
    weights = tmp_path / "tied.safetensors"
    save_model(trained, str(weights))  # stores the shared tensor once
    report = analyze_target(path, weights=str(weights), data="randint:40:4,5", steps=1)
    record = next(p for p in report.parameters if p.name == "embed.weight")
    assert record.weight_norm == pytest.approx(0.25 * (40 * 8) ** 0.5, rel=1e-6)


def test_weights_with_wrong_shape_or_keys(write, tmp_path: Path) -> None:
    path = _file(write, "w.py", f"model = {NET}\n")
    bad_shape = tmp_path / "shape.safetensors"
    save_file({"0.weight": torch.zeros(16, 9), "0.bias": torch.zeros(16)}, str(bad_shape))
    with pytest.raises(UserError, match=r"shape mismatch for 0.weight \(16, 9\) vs model \(16, 8\)"):
        analyze_target(path, weights=str(bad_shape), data="randn:4,8")
    partial = tmp_path / "partial.safetensors"
    save_file({"0.weight": torch.zeros(16, 8), "extra": torch.zeros(1)}, str(partial))
    with pytest.raises(UserError, match=r"missing 3 key.*unexpected 1 key") as info:
        analyze_target(path, weights=str(partial), data="randn:4,8")
    assert "--no-strict" in info.value.hint
    report = analyze_target(path, weights=str(partial), strict=False, data="randn:4,8", steps=1)
    assert any("kept their initial values" in note for note in report.notes)
    assert report.layer("0").weight_norm < 1.0  # zeros were loaded into the weight, the bias kept its init


# -- data -------------------------------------------------------------------------------------------------


def test_data_safetensors_is_cut_into_consecutive_batches(write, tmp_path: Path) -> None:
    path = _file(write, "m.py", f"model = {NET}\n")
    inputs = torch.randn(10, 8)
    targets = torch.randint(0, 4, (10,))
    data = tmp_path / "data.safetensors"
    save_file({"inputs": inputs, "targets": targets}, str(data))
    model = None

    def loss_of(start: int, stop: int) -> float:
        nonlocal model
        from gradcheck_cli.resolve.modules import import_file

        model = import_file(Path(path)).model
        return F.cross_entropy(model(inputs[start:stop]), targets[start:stop]).item()

    report = analyze_target(path, data=str(data), batch_size=4, steps=3)
    assert report.loss_name == "cross-entropy"
    assert report.loss == pytest.approx([loss_of(0, 4), loss_of(4, 8), loss_of(8, 10)], rel=1e-5)


def test_data_python_function_one_batch_iterable_and_dataloader(write) -> None:
    path = _file(write, "m2.py", f"model = {NET}\n")
    data = _file(
        write,
        "data_fns.py",
        "from torch.utils.data import DataLoader, TensorDataset\n"
        "def one():\n    return torch.randn(5, 8), torch.randint(0, 4, (5,))\n"
        "def many():\n    for _ in range(2):\n        yield torch.randn(5, 8)\n"
        "def loader():\n"
        "    dataset = TensorDataset(torch.randn(20, 8), torch.randint(0, 4, (20,)))\n"
        "    return DataLoader(dataset, batch_size=5)\n"
        "def as_dict():\n    return {'input': torch.randn(5, 8)}\n",
    )
    assert analyze_target(path, data=f"{data}:one", steps=2).loss_name == "cross-entropy"
    assert analyze_target(path, data=f"{data}:many", steps=3).loss_name == "random-projection"
    report = analyze_target(path, data=f"{data}:loader", steps=3)
    assert report.batch_size == 5 and len(report.loss) == 3
    assert analyze_target(path, data=f"{data}:as_dict", steps=1).loss_name == "random-projection"


def test_data_random_specs(write) -> None:
    path = _file(write, "m3.py", f"model = {NET}\n")
    report = analyze_target(path, data="randn:7,8", steps=1)
    assert report.batch_size == 7
    lm = _file(write, "lm.py", "model = nn.Sequential(nn.Embedding(30, 4), nn.Flatten(), nn.Linear(20, 3))\n")
    assert analyze_target(lm, data="randint:30:6,5", steps=1).batch_size == 6


@pytest.mark.parametrize(
    ("spec", "kind"),
    [
        ("randn:2,3", "randn"),
        ("randint:10:2,3", "randint"),
        ("x.safetensors", "safetensors"),
        ("d.py:fn", "python"),
    ],
)
def test_parse_data_spec(spec: str, kind: str) -> None:
    assert parse_data_spec(spec).kind == kind


@pytest.mark.parametrize("spec", ["randn:", "randn:0,3", "randn:a,b", "randint:3", "randint:0:2,2", "data.csv"])
def test_parse_data_spec_rejects(spec: str) -> None:
    with pytest.raises(UserError):
        parse_data_spec(spec)


def test_model_file_get_batch_and_batches(write) -> None:
    one = _file(
        write,
        "gb.py",
        f"model = {NET}\ndef get_batch():\n    return torch.randn(3, 8), torch.randint(0, 4, (3,))\n",
    )
    assert analyze_target(one, steps=2).batch_size == 3
    many = _file(write, "bs.py", f"model = {NET}\ndef batches():\n    return [torch.randn(2, 8), torch.randn(2, 8)]\n")
    report = analyze_target(many, steps=2)
    assert report.batch_size == 2 and report.loss_name == "random-projection"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("model = nn.Sequential(nn.Linear(8, 3))\n", "randn:32,8"),
        ("model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))\n", "randn:32,3,32,32"),
        ("model = nn.Sequential(nn.Embedding(50, 4), nn.Flatten(), nn.Linear(64, 2))\n", "randint:50:32,16"),
    ],
)
def test_synthetic_input_from_the_first_layer(write, body: str, expected: str) -> None:
    report = analyze_target(_file(write, "infer.py", body), steps=1)
    assert any(expected in note for note in report.notes)


def test_no_data_and_no_inferable_input_asks_for_data(write) -> None:
    body = (
        "class Odd(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.scale = nn.Parameter(torch.ones(3))\n    def forward(self, x):\n        return x * self.scale\n"
    )
    with pytest.raises(UserError, match="cannot tell what input") as info:
        analyze_target(_file(write, "odd.py", body))
    assert "--data" in info.value.hint


def test_dict_batches_are_keyword_arguments(write) -> None:
    body = """
class Hub(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.head = nn.Linear(8, 20)
    def forward(self, input_ids, labels=None):
        logits = self.head(self.embed(input_ids))
        loss = None if labels is None else nn.functional.cross_entropy(logits.reshape(-1, 20), labels.reshape(-1))
        return {"loss": loss, "logits": logits}
def get_batch():
    ids = torch.randint(0, 20, (4, 6))
    return {"input_ids": ids, "labels": ids}
"""
    report = analyze_target(_file(write, "hub.py", body), steps=1)
    assert report.loss_name == "output.loss"


# -- losses -----------------------------------------------------------------------------------------------


def test_loss_choices(write) -> None:
    reg = _file(write, "reg.py", f"model = {NET}\ndef get_batch():\n    return torch.randn(5, 8), torch.randn(5, 4)\n")
    assert analyze_target(reg, steps=1).loss_name == "mse"
    custom = _file(
        write, "custom.py", f"model = {NET}\ndef loss_fn(output, targets):\n    return output.pow(2).mean()\n"
    )
    assert analyze_target(custom, data="randn:4,8", steps=1).loss_name == "loss_fn (model file)"
    loss_file = _file(write, "losses.py", "def l1(output, targets):\n    return output.abs().mean()\n")
    assert analyze_target(reg, loss=f"{loss_file}:l1", steps=1).loss_name == "l1"
    plain = _file(write, "plain.py", f"model = {NET}\n")
    report = analyze_target(plain, data="randn:4,8", loss="cross-entropy", steps=1)
    assert report.loss_name == "cross-entropy"  # synthetic class ids when the data has no targets
    with pytest.raises(UserError, match="unknown loss"):
        analyze_target(plain, data="randn:4,8", loss="hinge")


def test_random_projection_gradient_is_the_seeded_direction(write) -> None:
    """With no targets, dL/d(output) = R / batch for a fixed Gaussian R (independent check of the claim)."""
    path = _file(write, "proj.py", "model = nn.Sequential(nn.Linear(8, 6))\n")
    report = analyze_target(path, data="randn:5,8", steps=1, seed=11)
    from gradcheck_cli.resolve.modules import import_file

    model = import_file(Path(path)).model
    x = torch.randn((5, 8), generator=torch.Generator().manual_seed(11))
    direction = torch.randn((5, 6), generator=torch.Generator().manual_seed(11)) / 6**0.5
    out = model(x)
    (out * direction).sum().div(5).backward()
    assert report.parameters[0].grad_norm == pytest.approx(model[0].weight.grad.norm().item(), rel=1e-5)
    assert report.loss_name == "random-projection"
