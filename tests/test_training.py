"""The watched training run (--train-steps): every number against the same loop written out with torch, and
the training view's findings on runs whose trouble is built in (labels from construction and from the
dtype's precision), plus a healthy run that must stay clean."""

from __future__ import annotations

import copy
import gc
import json
import math
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import gradcheck_cli
from gradcheck_cli.report import Report

SCHEMA = json.loads((Path(gradcheck_cli.__file__).parent / "report.schema.json").read_text())


def he_mlp(widths: tuple[int, ...] = (20, 64, 64, 64, 10), seed: int = 0) -> nn.Sequential:
    """ReLU MLP at the critical initialisation (He et al. 2015: kaiming_normal_, zero biases)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        linear = nn.Linear(widths[i], widths[i + 1])
        nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
        nn.init.zeros_(linear.bias)
        layers += [linear, nn.ReLU()] if i < len(widths) - 2 else [linear]
    return nn.Sequential(*layers)


def class_batches(count: int, size: int = 32, features: int = 20, seed: int = 0) -> list[tuple[torch.Tensor, Any]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, features, generator=generator), torch.randint(0, 10, (size,), generator=generator))
        for _ in range(count)
    ]


def reference_run(
    model: nn.Module,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
    clip: float | None = None,
) -> dict[str, Any]:
    """The training loop a user writes, measuring by hand what the watched run reports."""
    model = copy.deepcopy(model)
    opt = optimizer(list(model.parameters()))
    weights = {name: m.weight for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    out: dict[str, Any] = {"ratio": {name: [] for name in weights}, "grad": {name: [] for name in weights}}
    out["norm"], out["loss"] = [], []
    for x, y in batches:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        params = [p for p in model.parameters() if p.grad is not None]
        out["norm"].append(float(torch.sqrt(sum(p.grad.double().pow(2).sum() for p in params))))
        modules = dict(model.named_modules())
        for name in weights:
            grads = [p.grad.double().pow(2).sum() for p in modules[name].parameters()]
            out["grad"][name].append(float(torch.sqrt(sum(grads))))
        before = {name: w.detach().clone() for name, w in weights.items()}
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        for name, w in weights.items():
            delta = (w.detach().double() - before[name].double()).norm()
            out["ratio"][name].append(float(delta / before[name].double().norm()))
        out["loss"].append(float(loss.detach()))
    return out


def close(a: float, b: float, rel: float = 1e-4) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-12)


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("adam", lambda p: torch.optim.Adam(p, lr=1e-2)),
        ("adamw", lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.01)),
        ("momentum", lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)),
        ("sgd", lambda p: torch.optim.SGD(p, lr=0.05)),
    ],
)
def test_update_ratios_and_norms_equal_the_loop_written_out(name: str, make: Any) -> None:
    model = he_mlp()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    batches = class_batches(6)
    lr = 0.05 if name in ("sgd", "momentum") else 1e-2
    report = gradcheck_cli.analyze(model, batches, "cross-entropy", steps=1, train_steps=5, optimizer=name, lr=lr)
    expected = reference_run(model, batches[:5], make)
    training = report.training
    assert training is not None and training.steps == 5 and training.nan_step is None
    assert training.optimizer.startswith(name)
    for step in range(5):
        assert close(training.loss[step], expected["loss"][step], 1e-5)
        assert close(training.grad_norm[step], expected["norm"][step])
    for layer_name, ratios in expected["ratio"].items():
        watched = training.layer(layer_name)
        assert watched is not None
        for step in range(5):
            assert watched.update_ratio[step] is not None
            assert close(watched.update_ratio[step], ratios[step]), (layer_name, step)
            assert close(watched.grad_norm[step] or 0.0, expected["grad"][layer_name][step])
    # the model is put back: the weights the run started from, and no optimizer left holding it
    for key, value in model.state_dict().items():
        assert torch.equal(value, initial[key]), key


def test_clip_acts_as_clip_grad_norm_and_is_reported() -> None:
    model = he_mlp()
    batches = class_batches(6)
    report = gradcheck_cli.analyze(
        model, batches, "cross-entropy", steps=1, train_steps=5, optimizer="sgd", lr=0.1, clip=0.05
    )
    expected = reference_run(model, batches[:5], lambda p: torch.optim.SGD(p, lr=0.1), clip=0.05)
    training = report.training
    assert training is not None and training.clip == 0.05
    assert training.clipped == tuple(n > 0.05 for n in expected["norm"])
    for layer_name, ratios in expected["ratio"].items():
        watched = training.layer(layer_name)
        assert watched is not None
        assert all(close(a or 0.0, b) for a, b in zip(watched.update_ratio, ratios, strict=True))
    # the norm before clipping is over 0.05 on every step: the clip decides every step's size
    clipping = [f for f in report.findings if f.view == "training" and "--clip" in f.message]
    assert all(training.clipped) and clipping and clipping[0].kind == "exploding"


def test_a_healthy_adamw_run_has_no_findings() -> None:
    """He-initialised ReLU MLP (chi1 = 1), standardised inputs, AdamW at lr 1e-3: nothing to report."""
    report = gradcheck_cli.analyze(
        he_mlp(), class_batches(25), "cross-entropy", steps=3, train_steps=20, optimizer="adamw", lr=1e-3
    )
    assert report.findings == [], [f.message for f in report.findings]
    assert report.training is not None and report.training.loss[-1] < report.training.loss[0]
    assert report.update.quantity == "update_ratio"


class PoissonNet(nn.Module):
    """A count regressor with a log link: the loss exp(out) - y * out overflows float32 once out > 88.7, which
    Adam reaches within a few steps at lr 3 (each step moves every weight by ~lr whatever the gradient)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # type: ignore[no-any-return]


def poisson_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.poisson_nll_loss(out, target, log_input=True)


def poisson_batches(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        (torch.randn(32, 8, generator=generator), torch.poisson(torch.full((32, 1), 3.0), generator=generator))
        for _ in range(count)
    ]


def test_divergence_under_adam_names_the_step_and_the_saved_batch_replays_it(tmp_path: Path) -> None:
    model = PoissonNet()
    bad = tmp_path / "bad.safetensors"
    report = gradcheck_cli.analyze(
        model, poisson_batches(8), poisson_loss, steps=1, train_steps=20, optimizer="adam", lr=3.0, save_bad_batch=bad
    )
    training = report.training
    assert training is not None and training.nan_step is not None
    assert training.steps == training.nan_step + 1 < 20  # the run stopped there
    assert not (math.isfinite(training.loss[-1]) and math.isfinite(training.grad_norm[-1]))
    nan = [f for f in report.findings if f.kind == "nan" and f.view == "training"]
    assert nan and nan[0].severity == "error" and f"step {training.nan_step + 1}" in nan[0].message
    assert training.nan_origin is not None and training.bad_batch == str(bad)
    # the replay, written out: the saved weights and batch give the same non-finite loss or gradients
    tensors = load_file(str(bad))
    fresh = PoissonNet()
    fresh.load_state_dict(load_file(str(tmp_path / "bad.weights.safetensors")))
    loss = poisson_loss(fresh(tensors["inputs"]), tensors["targets"])
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in fresh.parameters()])
    assert not (torch.isfinite(loss) and torch.isfinite(grads).all())
    # and the tool, given them with --data/--weights semantics, finds it in its first measured step, where
    # the watched run's replay found it
    replay = gradcheck_cli.analyze(fresh, (tensors["inputs"], tensors["targets"]), poisson_loss, steps=1)
    assert replay.nan_origin is not None and replay.nan_origin.phase == training.nan_origin.phase
    assert not replay.healthy


def regression_batches(count: int, bad: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """y = x @ w_true + noise; batch `bad` has its inputs scaled by 100 (a corrupted batch)."""
    generator = torch.Generator().manual_seed(0)
    w_true = torch.randn(20, 1, generator=generator)
    batches = []
    for index in range(count):
        x = torch.randn(32, 20, generator=generator)
        y = x @ w_true + 0.1 * torch.randn(32, 1, generator=generator)
        batches.append((x * 100 if index == bad else x, y))
    return batches


def test_one_bad_batch_is_a_spike_at_its_step() -> None:
    batches = regression_batches(25, bad=12)
    report = gradcheck_cli.analyze(
        he_mlp((20, 64, 64, 1)), batches, "mse", steps=2, train_steps=20, optimizer="adamw", lr=1e-3
    )
    spikes = [f for f in report.findings if f.view == "training" and f.kind == "exploding"]
    assert spikes, [f.message for f in report.findings]
    # batch 12 is the 13th step; the loss and the gradient norm both jump there (inputs x100: the output and
    # dL/dW of the first layer scale by 100 or more)
    assert all(f.message.startswith("step 13:") for f in spikes)
    assert {"loss", "gradient norm"} <= {
        word for f in spikes for word in ("loss", "gradient norm") if word in f.message
    }
    assert any(f.severity == "error" for f in spikes)
    clean = gradcheck_cli.analyze(
        he_mlp((20, 64, 64, 1)), regression_batches(25), "mse", steps=2, train_steps=20, optimizer="adamw", lr=1e-3
    )
    assert not [f for f in clean.findings if f.view == "training"]


def test_relu_units_that_die_under_large_sgd_steps() -> None:
    """The dying-relu demo's setup: at lr 1.0 (100x the tutorial's) on non-negative digit images, one large
    step drives ReLU units' pre-activations below 0 for every input; at lr 0.05 none dies."""
    from gradcheck_cli.demos import relu_he_mlp, synthetic_digits

    torch.manual_seed(0)
    dying = gradcheck_cli.analyze(
        relu_he_mlp(), synthetic_digits(33, 0), "cross-entropy", train_steps=30, optimizer="sgd", lr=1.0
    )
    died = [f for f in dying.findings if f.kind == "dead" and f.view == "training"]
    assert len(died) >= 2, [f.message for f in dying.findings]
    assert dying.training is not None
    for finding in died:
        series = [d for d in (dying.training.layer(finding.layer).dead_fraction) if d is not None]  # type: ignore[union-attr]
        assert series[-1] - series[0] >= 0.5  # the threshold the finding says it passed
        assert "the first died at step" in finding.message
    torch.manual_seed(0)
    gentle = gradcheck_cli.analyze(
        relu_he_mlp(), synthetic_digits(33, 0), "cross-entropy", train_steps=30, optimizer="sgd", lr=0.05
    )
    assert not [f for f in gentle.findings if f.kind == "dead"]


class HalfPrecisionMiddle(nn.Module):
    """fp32 net with one bfloat16 Linear: bf16 keeps 8 significant bits, so an update smaller than half the
    spacing of the weight's value (2^-9 to 2^-8 of it) rounds away."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(20, 64)
        self.middle = nn.Linear(64, 64).to(torch.bfloat16)
        self.last = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.first(x))
        h = torch.relu(self.middle(h.to(torch.bfloat16))).float()
        return self.last(h)  # type: ignore[no-any-return]


def test_bf16_updates_below_precision_are_lost() -> None:
    # Adam moves each weight by about lr: 1e-5 against |w| ~ U(0, 1/8), relative ~2e-4, far below bf16's 2^-9
    # for all but the weights within 2.6e-3 of 0 (2% of them); at lr 1e-2 the steps are far above it.
    stalled = gradcheck_cli.analyze(
        HalfPrecisionMiddle(), class_batches(10), "cross-entropy", steps=1, train_steps=6, optimizer="adam", lr=1e-5
    )
    lost = [f for f in stalled.findings if f.view == "numeric" and f.kind == "vanishing"]
    assert [f.layer for f in lost] == ["middle"] and lost[0].severity == "error"
    assert stalled.training is not None
    middle = stalled.training.layer("middle")
    assert middle is not None and all((f or 0) > 0.9 for f in middle.stalled_fraction)
    first = stalled.training.layer("first")
    # float32 weights are not judged for it: float32 is the precision master weights are kept in
    assert first is not None and all(f is None for f in first.stalled_fraction)
    moving = gradcheck_cli.analyze(
        HalfPrecisionMiddle(), class_batches(10), "cross-entropy", steps=1, train_steps=6, optimizer="adam", lr=1e-2
    )
    assert not [f for f in moving.findings if f.view == "numeric" and f.kind == "vanishing"]


def test_parameters_the_optimizer_leaves_out_do_not_stall() -> None:
    """Linear probing: an optimizer over the head only keeps the body still on purpose."""
    model = he_mlp()

    def head_only(m: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.Adam(m[-1].parameters(), lr=1e-3)  # type: ignore[index]

    from gradcheck_cli.api import run
    from gradcheck_cli.optimizers import OptimizerSource
    from gradcheck_cli.options import Options

    report = run(
        model,
        class_batches(6),
        "cross-entropy",
        Options(train_steps=4, steps=1),
        optimizer=OptimizerSource("head_only", head_only),
    )
    assert not [f for f in report.findings if f.view in ("numeric", "training")]
    assert report.training is not None and report.training.optimizer.startswith("head_only: Adam")


# -- the command line ---------------------------------------------------------------------------------------

MODEL = """
    import torch
    from torch import nn

    def build_model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))

    def get_batch():
        g = torch.Generator().manual_seed(0)
        return torch.randn(16, 20, generator=g), torch.randint(0, 10, (16,), generator=g)
"""


def test_cli_json_training_section_follows_the_schema(cli: Any, write: Any) -> None:
    model = write("model.py", MODEL)
    code, report = cli.json("analyze", model, "--train-steps", "4", "--optimizer", "adamw", "--lr", "1e-3")
    assert code == 0
    jsonschema.validate(report, SCHEMA)
    training = report["training"]
    assert training["steps"] == 4 and training["optimizer"].startswith("adamw (lr 0.001")
    assert all(len(training[key]) == 4 for key in ("loss", "grad_norm", "clipped", "skipped", "lr"))
    assert all(len(layer["update_ratio"]) == 4 for layer in training["layers"])
    assert report["update"]["quantity"] == "update_ratio"
    assert Report.from_dict(report).training == Report.from_dict(json.loads(json.dumps(report))).training


def test_model_file_optimizer_and_scheduler_are_used(cli: Any, write: Any) -> None:
    model = write(
        "model.py",
        MODEL
        + """
    def build_optimizer(model):
        return torch.optim.SGD(model.parameters(), lr=0.1)

    def build_scheduler(optimizer):
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
""",
    )
    code, report = cli.json("analyze", model, "--train-steps", "3")
    assert code == 0
    training = report["training"]
    assert training["optimizer"] == "build_optimizer(): SGD (lr 0.1), scheduler StepLR"
    assert training["lr"] == [0.1, 0.05, 0.025]  # the lr each step ran at


def test_optimizer_state_is_dropped_after_the_run() -> None:
    refs: list[weakref.ref[torch.optim.Optimizer]] = []

    def build(m: nn.Module) -> torch.optim.Optimizer:
        opt = torch.optim.Adam(m.parameters(), lr=1e-3)
        refs.append(weakref.ref(opt))
        return opt

    from gradcheck_cli.api import run
    from gradcheck_cli.optimizers import OptimizerSource
    from gradcheck_cli.options import Options

    run(
        he_mlp(),
        class_batches(4),
        "cross-entropy",
        Options(train_steps=2, steps=1),
        optimizer=OptimizerSource("b", build),
    )
    gc.collect()
    assert refs and refs[0]() is None


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--optimizer", "rmsprop"), "unknown --optimizer 'rmsprop'"),
        (("--optimizer", "opt.py:missing"), "has no function 'missing'"),
        (("--clip", "0"), "--clip must be a positive norm"),
        (("--weight-decay", "-1"), "--weight-decay must be 0 or more"),
        (("--save-bad-batch", "bad.txt"), "not a .safetensors file"),
    ],
)
def test_bad_training_options_are_one_line(cli: Any, write: Any, args: tuple[str, ...], needle: str) -> None:
    model = write("model.py", MODEL)
    write("opt.py", "def make(model):\n    return None\n")
    result = cli(
        "analyze", model, "--train-steps", "2", *[str(model.parent / a) if a.startswith("opt.py") else a for a in args]
    )
    assert result.exit_code == 2, result.output
    assert needle in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 2


def test_an_optimizer_function_that_returns_no_optimizer(cli: Any, write: Any) -> None:
    model = write("model.py", MODEL)
    opt = write("opt.py", "def make(model):\n    return None\n")
    result = cli("analyze", model, "--train-steps", "2", "--optimizer", f"{opt}:make")
    assert result.exit_code == 2 and "returned NoneType, not a torch.optim.Optimizer" in result.stderr


def test_save_bad_batch_never_overwrites_an_input(cli: Any, write: Any, tmp_path: Path) -> None:
    model = write("model.py", MODEL)
    weights = tmp_path / "w.weights.safetensors"
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
    before = weights.read_bytes()
    # --save-bad-batch w.safetensors would write its weights to w.weights.safetensors: the input
    result = cli("analyze", model, "-w", weights, "--train-steps", "2", "--save-bad-batch", tmp_path / "w.safetensors")
    assert result.exit_code == 2 and "is the --weights file this run reads" in result.stderr
    assert weights.read_bytes() == before


def test_table_shows_the_watched_run(cli: Any, write: Any) -> None:
    model = write("model.py", MODEL)
    result = cli("analyze", model, "--train-steps", "5", "--optimizer", "adam", "--lr", "1e-3")
    assert result.exit_code == 0, result.output
    assert "3 step(s) after 5 watched adam step(s)" in result.stdout
    assert "‖g‖ over 5 steps" in result.stdout and "‖ΔW‖/‖W‖" in result.stdout
    assert "training: 5 step(s) of adam (lr 0.001, weight decay 0)" in result.stdout


def test_fp16_loss_scale_is_recorded() -> None:
    report = gradcheck_cli.analyze(he_mlp(), class_batches(5), "cross-entropy", steps=1, train_steps=3, amp="fp16")
    assert report.training is not None and report.training.loss_scale is not None
    assert len(report.training.loss_scale) == 3 and report.training.loss_scale[0] == 2.0**16


def test_tensorboard_and_plot_show_the_watched_steps(cli: Any, write: Any, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    pytest.importorskip("matplotlib")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = write("model.py", MODEL)
    board, plot, out = tmp_path / "tb", tmp_path / "run.png", tmp_path / "run.json"
    result = cli(
        "analyze",
        model,
        "--train-steps",
        "4",
        "--optimizer",
        "adam",
        "--lr",
        "1e-3",
        "--steps",
        "2",
        "--tensorboard",
        board,
        "--plot",
        plot,
        "--output",
        out,
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    assert plot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    report = Report.from_dict(json.loads(out.read_text()))
    assert report.training is not None
    events = EventAccumulator(str(board), size_guidance={"histograms": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert {"train/loss", "train/grad_norm", "train/clipped", "train/lr"} <= set(tags["scalars"])
    assert [s.step for s in events.Scalars("train/loss")] == [0, 1, 2, 3]
    assert [s.value for s in events.Scalars("train/loss")] == pytest.approx(list(report.training.loss), rel=1e-6)
    ratios = [s.value for s in events.Scalars("train_update_ratio/2")]
    assert ratios == pytest.approx(list(report.training.layer("2").update_ratio), rel=1e-6)  # type: ignore[union-attr]
    spread = events.Histograms("train/log10_update_ratio")
    assert [h.step for h in spread] == [0, 1, 2, 3] and spread[0].histogram_value.num == 3
    # the measurement steps come after the watched ones
    assert [s.step for s in events.Scalars("loss")] == [4, 5]


def test_dying_relu_demo_shows_units_dying_step_by_step(cli: Any) -> None:
    result = cli("demo", "dying-relu")
    assert result.exit_code == 1, result.output  # most units of fc3/fc4 never activate after training: errors
    assert "after 60 watched sgd step(s)" in result.stdout and "dead units, 0-100%" in result.stdout
    assert "dead [training]: its units died during training" in result.stdout
    # a flag given wins over the demo's own settings: at the tutorial's lr nothing dies
    gentle = cli("demo", "dying-relu", "--lr", "0.05", "--train-steps", "20")
    assert "dead [training]" not in gentle.stdout and "after 20 watched sgd step(s)" in gentle.stdout
