"""Real architectures from their own libraries at default init (tests/corpus.py): clean verdicts on the
healthy ones, the kind theory predicts on the broken ones, and the properties a verdict on them must have."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
from functools import cache
from pathlib import Path

import pytest
import torch
from corpus import Case, cases, images

import gradcheck_cli
from gradcheck_cli.gate import Gate
from gradcheck_cli.render.table import render_text
from gradcheck_cli.report import Report

CASES = {case.name: case for case in cases()}
# The goal: zero errors on the healthy corpus, at most a handful of warnings in all.
MOST_WARNINGS = 3


def _available(case: Case) -> bool:
    return importlib.util.find_spec(case.library) is not None


@cache
def _report(name: str, seed: int = 0) -> Report:
    case = CASES[name]
    if not _available(case):
        pytest.skip(f"{case.library} is not installed")
    torch.manual_seed(seed)
    return gradcheck_cli.analyze(case.build(), case.batches(), seed=seed, **case.settings)


@pytest.mark.parametrize("name", [c.name for c in cases() if c.healthy])
def test_standard_architectures_at_default_init_pass_without_errors(name: str) -> None:
    report = _report(name)
    errors = [f"{f.layer}: {f.message}" for f in report.findings if f.severity == "error"]
    assert not errors, (CASES[name].why, errors)
    assert not report.failing()


def test_the_healthy_corpus_has_at_most_a_handful_of_warnings() -> None:
    warnings = [
        f"{name} {f.layer}: {f.message}"
        for name, case in CASES.items()
        if case.healthy and _available(case)
        for f in _report(name).findings
        if f.severity == "warning"
    ]
    assert len(warnings) <= MOST_WARNINGS, warnings


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", [c.name for c in cases() if not c.healthy])
def test_broken_variants_get_the_kind_theory_predicts(name: str, seed: int) -> None:
    case = CASES[name]
    report = _report(name, seed)
    errors = {f.kind for f in report.findings if f.severity == "error"}
    assert set(case.expect) <= errors, (case.why, [f.message for f in report.findings])
    assert report.failing()


def test_the_signal_view_does_not_depend_on_input_resolution() -> None:
    """VGG-11 without BatchNorm: pooling between the convs changes how many positions each sees; the verdict
    and the fitted gain must not follow the image size."""
    pytest.importorskip("torchvision")
    from corpus import tv_vgg11

    gains = []
    for size in (32, 64, 128):
        torch.manual_seed(0)
        report = gradcheck_cli.analyze(tv_vgg11(), images(size=size, batch=2))
        assert not report.findings, (size, [f.message for f in report.findings])
        gains.append(report.signal.gain_per_layer)
    assert all(g is not None for g in gains)
    assert max(gains) / min(gains) < 1.5, gains  # type: ignore[type-var, operator]


def test_layer_scale_is_not_judged_by_step_size_but_matrices_still_are() -> None:
    """ConvNeXt's layer scale (1e-6) moves by ~1000x its size in one step by design; its convolutions are
    still in the update view."""
    report = _report("tv-convnext")
    scales = [layer for layer in report.layers if layer.parameters and layer.parameters[0].endswith("layer_scale")]
    assert scales and all(layer.scale_only and layer.status == "ok" for layer in scales)
    assert any(name.endswith("block.0") for name in report.update.layers)  # a depthwise conv is judged


def test_a_zero_initialised_head_gates_the_network_and_nothing_is_called_dead() -> None:
    report = _report("tv-vit")
    gated = [layer for layer in report.layers if layer.gated]
    assert len(gated) >= 20 and not any(f.kind == "dead" for f in report.findings)
    assert {layer.status for layer in gated} == {"gated"}  # the table says these were not judged
    assert any("heads.head" in note for note in report.notes)
    assert [f.kind for f in report.findings] == ["unjudged"]
    assert report.failing(fail_on=["unjudged"])  # whatever --fail-level: it has no severity scale


def test_an_mlp_mixer_with_its_zero_head_is_unjudged_not_passed() -> None:
    report = _report("timm-mixer")
    assert [f.kind for f in report.findings] == ["unjudged"]


def test_gpt2_conv1d_blocks_are_weight_layers_of_the_update_view() -> None:
    report = _report("hf-gpt2")
    conv1d = [layer for layer in report.layers if layer.type == "Conv1D"]
    assert conv1d and all(layer.category == "linear" for layer in conv1d)
    assert {layer.name for layer in conv1d} <= set(report.update.layers)


def test_a_tied_tensor_is_one_verdict_and_the_counts_add_up() -> None:
    report = _report("hf-t5")
    model = CASES["hf-t5"].build()
    unique = sum(p.numel() for p in model.parameters())  # named_parameters counts a tied tensor once
    assert sum(layer.params for layer in report.layers) == unique
    aliases = [layer for layer in report.layers if layer.alias_of is not None]
    assert {layer.alias_of for layer in aliases} == {"shared"} and len(aliases) == 3
    assert not any(f.layer in {a.name for a in aliases} and f.view != "signal" for f in report.findings)


def test_residual_nets_are_told_from_plain_chains_by_cutting_them() -> None:
    dense = _report("tv-densenet")
    assert dense.signal.residual is True  # dense connections: a path around every layer
    chaotic = _report("deep-tanh-chaotic")
    assert chaotic.signal.residual is False


def test_a_lora_adapter_with_b_zero_is_gated_not_dead() -> None:
    """LoRA (Hu et al. 2021): B = 0 at init, so A gets exactly zero gradient until B moves."""

    class LoRALinear(torch.nn.Module):
        def __init__(self, base: torch.nn.Linear, rank: int = 4) -> None:
            super().__init__()
            self.base = base.requires_grad_(False)
            self.lora_A = torch.nn.Linear(base.in_features, rank, bias=False)
            self.lora_B = torch.nn.Linear(rank, base.out_features, bias=False)
            torch.nn.init.zeros_(self.lora_B.weight)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.base(x) + self.lora_B(self.lora_A(x))

    torch.manual_seed(0)
    layers = [LoRALinear(torch.nn.Linear(32, 32)) for _ in range(4)]
    model = torch.nn.Sequential(*[m for layer in layers for m in (layer, torch.nn.ReLU())], torch.nn.Linear(32, 4))
    report = gradcheck_cli.analyze(model, (torch.randn(16, 32), torch.randint(0, 4, (16,))))
    lora_a = [layer for layer in report.layers if layer.name.endswith("lora_A")]
    assert len(lora_a) == 4 and all(layer.gated for layer in lora_a)
    assert not [f for f in report.findings if f.severity == "error"], [f.message for f in report.findings]


def test_no_replay_leaves_a_trace_on_the_model() -> None:
    """The confirmation replays (gates opened, chain cut) restore every weight, buffer and gradient."""
    pytest.importorskip("torchvision")
    from corpus import tv_resnet18

    torch.manual_seed(0)
    model = tv_resnet18(zero_init_residual=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gradcheck_cli.analyze(model, images())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())
    assert dataclasses.is_dataclass(_report("tv-resnet18-zero-init"))


ZERO_HEAD = """
import torch
from torch import nn

model = nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(64, 64), nn.ReLU())], nn.Linear(64, 4))
for layer in model[:-1:2]:  # He init, zero biases: critical, no dead units (He et al. 2015)
    nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
    nn.init.zeros_(layer.bias)
nn.init.zeros_(model[-1].weight)  # the zero-initialised head

def get_batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(64, 64, generator=g), torch.randint(0, 4, (64,), generator=g)
"""


def test_a_run_that_judged_nothing_says_so_and_fail_on_unjudged_fails_it(cli, write) -> None:
    path = write("zero_head.py", ZERO_HEAD)
    result = cli("analyze", path, "--quiet")
    assert result.exit_code == 0
    assert "UNJUDGED" in result.stdout and "PASS" not in result.stdout
    code, data = cli.json("analyze", path)
    assert code == 0 and [f["kind"] for f in data["findings"]] == ["unjudged"]
    assert sum(layer["gated"] for layer in data["layers"]) == 6  # every hidden layer, opened and measured
    assert cli("analyze", path, "--fail-on", "unjudged", "--quiet").exit_code == 1


class _SigmoidMLP(torch.nn.Module):
    def __init__(self, functional: bool) -> None:
        super().__init__()
        self.functional = functional
        self.layers = torch.nn.ModuleList(torch.nn.Linear(64, 64) for _ in range(4))
        self.acts = torch.nn.ModuleList(torch.nn.Sigmoid() for _ in range(4))
        self.head = torch.nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer, act in zip(self.layers, self.acts, strict=True):
            x = torch.sigmoid(layer(x)) if self.functional else act(layer(x))
        return self.head(x)


def test_saturation_is_measured_whatever_form_the_activation_takes() -> None:
    """torch.sigmoid and nn.Sigmoid on the same weights: the module path (a pre-hook on nn.Sigmoid) is the
    reference for the functional one (read from the next layer's bounded input). sw2 = 400: pre-activations
    have std ~14 (q = sw2 E[sigmoid^2] ~ 200), so P(|z| > 4.34) ~ 2 (1 - Phi(0.31)) ~ 0.76: saturated."""
    torch.manual_seed(0)
    reference = _SigmoidMLP(functional=False)
    for layer in reference.layers:
        torch.nn.init.normal_(layer.weight, 0.0, (400 / 64) ** 0.5)
    functional = _SigmoidMLP(functional=True)
    functional.load_state_dict(reference.state_dict())
    batch = (torch.randn(64, 64), torch.randint(0, 4, (64,)))
    by_module = gradcheck_cli.analyze(reference, batch)
    by_value = gradcheck_cli.analyze(functional, batch)
    for name in ("layers.0", "layers.1", "layers.2"):
        expected = by_module.layer(name).saturated_fraction
        measured = by_value.layer(name).saturated_fraction
        assert expected is not None and expected > 0.5
        assert measured is not None and abs(measured - expected) < 0.02, (name, expected, measured)
    assert {(f.layer, f.kind) for f in by_value.findings if f.kind == "saturated"} >= {("layers.0", "saturated")}


class _Pooled(torch.nn.Module):
    """A 1x1 conv that passes each channel through into a head, by a ReLU then an average over positions (global
    average pooling), or by a sigmoid of the average: the head reads about the same eight values either way."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv = torch.nn.Conv2d(8, 8, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(8)[:, :, None, None])
            self.conv.bias.zero_()
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.conv(x)
        return self.head(torch.relu(z).mean(dim=(2, 3)) if self.how == "relu" else torch.sigmoid(z.mean(dim=(2, 3))))


@pytest.mark.parametrize("how", ["relu", "sigmoid"])
def test_an_average_of_relu_features_in_0_1_is_no_sigmoid_saturation(how: str) -> None:
    """Six of eight channels average to 0.001-0.002 and two to 0.5 and 0.9: values in [0, 1] spanning most of it,
    as a sigmoid's output does, 6/8 of them under sigmoid(-4.34). Averaged ReLU features are no unit's activation:
    nothing saturates there (before, the conv read 75% saturated, a warning). The same values as a sigmoid's
    output (of logits nearly constant over positions, so of their average) are saturated: 75%."""
    levels = torch.tensor([0.001, 0.0015, 0.002, 0.001, 0.0012, 0.0018, 0.5, 0.9])
    g = torch.Generator().manual_seed(4)
    values = levels[None, :, None, None] * (1 + 0.05 * torch.rand(16, 8, 4, 4, generator=g))
    x = values if how == "relu" else torch.logit(values)
    batch = (x, torch.randint(0, 3, (16,), generator=g))
    conv = gradcheck_cli.analyze(_Pooled(how), batch).layer("conv")
    if how == "relu":
        assert conv.saturated_fraction is None
    else:
        out = torch.sigmoid(x.mean(dim=(2, 3)))  # what the head reads
        expected = float(((out < 0.0129) | (out > 0.9871)).float().mean())
        assert conv.saturated_fraction is not None and abs(conv.saturated_fraction - expected) < 0.05


def test_a_query_projection_reading_a_zero_initialised_token_is_gated_not_dead() -> None:
    """A one-block DeiT classifies from its class token, zero at init (and its position embedding): the LayerNorm
    of a zero vector is 0, so dL/dW_q = dL/dq_cls x 0 = 0 exactly while dL/db_q = dL/dq_cls is not; and q_cls =
    b_q = 0 leaves the keys no gradient at all. The token is a gate that moves on the first step (opened: 1e-3)."""
    report = _report("hf-deit-1")
    layers = {layer.name: layer for layer in report.layers}
    query = next(layer for name, layer in layers.items() if name.endswith("q_proj"))
    key = next(layer for name, layer in layers.items() if name.endswith("k_proj"))
    assert query.grad_norm and query.status == "gated" and key.status == "gated"
    weight = next(p for p in report.parameters if p.name == f"{query.name}.weight")
    assert weight.grad_norm == 0.0
    assert not [f for f in report.findings if f.layer in (query.name, key.name)]


class _ContextBlock(torch.nn.Module):
    """timm's byobnet blocks: a residual branch conv -> BN -> ReLU -> global-context attention (its last
    projection zero-initialised, added to the features) -> conv -> BN whose scale starts at 0 (zero_init_last),
    then a squeeze-excitation on the branch output (attn_last), which at init reads exactly 0."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        nn = torch.nn
        self.conv1, self.bn1 = nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width)
        self.attn = nn.Conv2d(width, 1, 1)
        self.fc1, self.fc2 = nn.Conv2d(width, 8, 1), nn.Conv2d(8, width, 1)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width)
        self.se1, self.se2 = nn.Conv2d(width, 8, 1), nn.Conv2d(8, width, 1)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        weights = torch.softmax(self.attn(y).flatten(2), dim=-1)  # (B, 1, HW)
        context = (y.flatten(2) * weights).sum(-1)[..., None, None]
        y = y + self.fc2(torch.relu(self.fc1(context)))
        y = self.bn2(self.conv2(y))
        y = y * torch.sigmoid(self.se2(torch.relu(self.se1(y.mean(dim=(2, 3), keepdim=True)))))
        return torch.relu(x + y)


def test_gates_behind_gates_and_a_layer_reading_zeros_are_not_dead() -> None:
    """At init the zero BN scale holds every gradient of its branch at exactly 0, and inside the branch the zero
    last projection of the context block holds the context layers' too: the projection gets a gradient only once
    the BN scale moves, and the context layers only once the projection does (gates behind gates: opened in
    turn). The squeeze-excitation after the zero BN reads exactly 0, so its first layer outputs its bias (0) for
    every input and the ReLU after it is 0 by that input, not by its weights: nothing of it is dead either."""
    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), *[_ContextBlock() for _ in range(3)])
    model.append(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)))
    batches = [(torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))) for _ in range(2)]
    report = gradcheck_cli.analyze(model, batches)
    layers = {layer.name: layer for layer in report.layers}
    for block in ("1", "2", "3"):
        for inner in ("attn", "fc1", "fc2", "conv1"):
            assert layers[f"{block}.{inner}"].status == "gated", (block, inner, layers[f"{block}.{inner}"].status)
        assert layers[f"{block}.se1"].input_zero_fraction == 1.0
    assert not [f for f in report.findings if f.severity == "error"], report.findings
    assert not [f for f in report.findings if f.kind == "dead"]


def test_weight_layers_no_view_could_compare_read_unjudged_not_ok() -> None:
    """An LSTM LM has three weight layers, fewer than the min_chain (5) that a signal fit or an update median
    needs: only the LSTM is compared (through time); the embedding and the head were checked for NaN and zeros
    only, and their status says so instead of ok."""
    report = _report("torch-lstm-lm")
    assert report.thresholds["min_chain"] > len(report.layers) == 3
    statuses = {layer.name: (layer.status, layer.views) for layer in report.layers}
    assert statuses == {"embed": ("unjudged", ()), "rnn": ("ok", ("time",)), "head": ("unjudged", ())}
    assert not report.findings  # a status, not a finding: nothing is wrong with them, nothing was compared
    text = render_text(report, Gate.of(report))
    assert "2 weight layer(s) compared by none" in text and "status unjudged: embed, head" in text


def test_in_a_deep_model_every_weight_layer_is_compared() -> None:
    report = _report("hf-gpt2")
    weights = [layer for layer in report.layers if layer.category in ("linear", "conv", "embedding")]
    assert len(weights) == 19  # wte, wpe, 4 blocks x (c_attn, attn.c_proj, c_fc, mlp.c_proj), lm_head (tied)
    assert all(layer.views and layer.status == "ok" for layer in weights), [
        (layer.name, layer.views) for layer in weights if not layer.views
    ]


def test_gated_recurrent_classifiers_decay_through_time_by_design_and_a_closed_forget_gate_does_not() -> None:
    """A default nn.LSTM/nn.GRU read over 64 steps loses about a third of its gradient per step toward the
    first: its gates sit at sigmoid(0) = 1/2 and learn to open, so it is a note, not a finding. A forget gate
    held at sigmoid(-5) is measured decaying faster than any neutral gate does, and fails."""
    for name in ("torch-lstm-classifier", "torch-gru-classifier"):
        report = _report(name)
        rnn = next(layer for layer in report.layers if layer.name == "rnn")
        assert rnn.time_gated and rnn.views == ("time",) and rnn.status == "ok"
        norms = rnn.time_grad_norms
        assert norms is not None and 0 < norms[0] < norms[-1] * 1e-6  # a real decay, measured
        assert any(note.startswith("rnn (") and "halves every" in note for note in report.notes)
    closed = _report("lstm-forget-gate-closed")
    assert [(f.layer, f.view) for f in closed.findings if f.kind == "vanishing"] == [("rnn", "time")]


def test_through_time_a_language_models_loss_at_every_step_is_not_growth() -> None:
    """A GRU language model with its update gates held at z = sigmoid(6): h_t = z h_(t-1) + (1 - z) n_t, so the
    gradient from the last step reaches step t scaled by z^(T-1-t), 0.9975^15 = 0.963 over 16 steps: no decay and
    no growth. Read under the model's loss, each step also collects the losses of every later step (T - t terms,
    compounding over the stack), which used to read as exploding through time (376x). The time view carries the
    last step's gradient alone."""
    report = _report("gru-stack-update-gates-shut")
    z = 1 / (1 + math.exp(-6.0))
    for layer in report.layers:
        if layer.time_grad_norms is not None:
            norms = layer.time_grad_norms
            assert norms[0] / norms[-1] == pytest.approx(z ** (len(norms) - 1), rel=0.03), layer.name
    assert not [f for f in report.findings if f.view == "time"]


class _AuxiliaryHead(torch.nn.Module):
    """A trunk, a head the loss reads, an auxiliary head returned beside it, and a layer the forward never
    calls: only the last one is a bug."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = torch.nn.Linear(8, 16)
        self.head = torch.nn.Linear(16, 4)
        self.aux = torch.nn.Linear(16, 4)
        self.forgotten = torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.relu(self.trunk(x))
        return self.head(h), self.aux(h)


def test_auxiliary_heads_the_loss_does_not_read_are_unmeasured_not_unused() -> None:
    """The default loss reads the first output; a backward from the second reaches `aux` alone, so `aux`
    is a head that was not measured (a note, status unjudged) and `forgotten` still warns unused."""
    torch.manual_seed(0)
    report = gradcheck_cli.analyze(_AuxiliaryHead(), (torch.randn(16, 8), torch.randint(0, 4, (16,))))
    unused = [f.layer for f in report.findings if f.kind == "unused"]
    assert unused == ["forgotten"]
    aux = report.layer("aux")
    assert aux.side_output and aux.status == "unjudged" and aux.grad_norm is None
    assert not report.layer("forgotten").side_output
    assert any("(aux) feed only outputs of the model that the loss does not read" in note for note in report.notes)
    googlenet = _report("tv-googlenet")
    heads = {layer.name for layer in googlenet.layers if layer.side_output}
    assert heads and all(name.startswith(("aux1.", "aux2.")) for name in heads), heads
    assert not [f for f in googlenet.findings if f.kind == "unused"]


class _SqueezeExcite(torch.nn.Module):
    """Conv-BN-ReLU features, then a squeeze-excitation gate (Hu et al. 2018): fc1 reads the globally pooled
    post-ReLU features, all positive and nearly alike across noise images, so the sign of each fc1 unit's
    pre-activation is set by its weights, the same for every image: about half never activate, by chance."""

    def __init__(self, channels: int = 64, squeeze: int = 32) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, channels, 3, padding=1), torch.nn.BatchNorm2d(channels), torch.nn.ReLU()
        )
        self.fc1 = torch.nn.Conv2d(channels, squeeze, 1)
        self.fc2 = torch.nn.Conv2d(squeeze, channels, 1)
        self.head = torch.nn.Linear(channels, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        gate = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))
        return self.head((x * gate).mean((2, 3)))


def test_units_dead_as_often_as_chance_at_init_are_not_a_finding_but_more_are() -> None:
    """At a symmetric random init each unit of a layer reading nearly constant inputs is off for all of them
    with probability 1/2, independently: the count of dead units is Binomial(units, 1/2) at worst. Measured
    fractions near 1/2 are that chance; biases of -3 on fc1 (pre-activations ~N(-3, <1)) kill almost all."""
    from gradcheck_cli.diagnose.activation import CHANCE_DEAD, chance_of_dead

    assert chance_of_dead(2, 3) == pytest.approx(4 / 8)  # {011, 101, 110, 111} of 8 outcomes
    assert chance_of_dead(32, 32) == pytest.approx(2.0**-32)
    assert chance_of_dead(0, 10) == 1.0
    assert chance_of_dead(1200, 2000) == pytest.approx(8.7e-20, rel=0.5)  # normal tail, z = 8.92
    batches = images(size=32, count=3, batch=16)
    fractions = []
    for seed in range(6):
        torch.manual_seed(seed)
        model = _SqueezeExcite()
        report = gradcheck_cli.analyze(model, batches)
        fc1 = report.layer("fc1")
        fraction = fc1.zero_grad_unit_fraction  # F.relu: the units whose weight-gradient row stayed 0
        assert fc1.units == 32 and fraction is not None
        fractions.append(fraction)
        assert not [f for f in report.findings if f.kind == "dead"], (seed, fraction)
        assert chance_of_dead(round(fraction * 32), 32) >= CHANCE_DEAD
    assert abs(sum(fractions) / len(fractions) - 0.5) < 3 * 0.5 / (32 * 6) ** 0.5  # Binomial(32, 1/2) means
    assert max(fractions) > report.thresholds["dead_warning"]  # chance alone crosses the fraction threshold
    with torch.no_grad():
        model.fc1.bias.fill_(-3.0)
    broken = gradcheck_cli.analyze(model, batches)
    assert ("fc1", "dead") in {(f.layer, f.kind) for f in broken.findings}


def test_layers_behind_two_layer_scales_are_explained_by_opening_the_scales() -> None:
    """EdgeNeXt's attention projections sit behind two LayerScales of 1e-6, so their ||g||/||W|| is ~1e-12 of
    an ungated layer's and over role_error below the network median (itself behind one scale). Set to 1 in
    a replay, the scales no longer attenuate them: marked, a note, no finding; the numbers stay measured."""
    report = _report("timm-edgenext")
    behind = [layer for layer in report.layers if layer.behind_scales]
    assert behind and all(".xca." in layer.name for layer in behind), [layer.name for layer in behind]
    median = sorted(x.grad_to_weight for x in report.layers if x.name in report.update.layers)
    reference = median[len(median) // 2]
    assert any((layer.grad_to_weight or 0) * report.thresholds["role_error"] < reference for layer in behind)
    assert not [f for f in report.findings if f.layer in {layer.name for layer in behind}]
    assert any("gate their path (checked by setting those to 1)" in note for note in report.notes)


class _CategoricalResidual(torch.nn.Module):
    """DLRM's pattern: one embedding table per categorical feature, summed with a bottom MLP's output, then one
    residual block whose branch a per-channel scale of 1e-6 gates (LayerScale when `learned`, else a fixed
    buffer of the same values), and a top MLP. He init on the MLPs, torch's on the rest."""

    def __init__(self, learned: bool, tables: int = 8, vocab: int = 20000, dim: int = 16) -> None:
        super().__init__()
        nn = torch.nn
        self.tables = nn.ModuleList(nn.Embedding(vocab, dim) for _ in range(tables))
        self.bottom = nn.Sequential(nn.Linear(13, 64), nn.ReLU(), nn.Linear(64, dim))
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        scale = torch.full((dim,), 1e-6)
        self.scale = nn.Parameter(scale) if learned else nn.Buffer(scale)
        self.top = nn.Sequential(nn.Linear(dim, 32), nn.ReLU(), nn.Linear(32, 2))
        for layer in [*self.bottom, *self.top]:
            if isinstance(layer, nn.Linear):
                nn.init.kaiming_normal_(layer.weight)
                nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dense, ids = x[:, :13], x[:, 13:].long()
        h = self.bottom(dense) + sum(table(ids[:, i]) for i, table in enumerate(self.tables))
        h = h + self.scale * self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(h))))
        return self.top(h)


def test_a_single_block_behind_a_layer_scale_is_judged_against_the_update_views_median() -> None:
    """The block's fc1/fc2 get ~1e-6 of an ungated layer's ||g||/||W|| (the scale multiplies their path) and have
    no peers. The scales replay must measure them against the median the update view compares with (the dense
    layers': eight embedding tables, each ~1e-2 of a dense layer, would put the median among them, where the
    block sits less than role_error below), and a layer it explains has no finding, peers or none. A fixed
    buffer of the same values never opens: still an error."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 20000, (64, 8), generator=g).float()
    batch = (torch.cat([torch.randn(64, 13, generator=g), ids], 1), torch.randint(0, 2, (64,), generator=g))
    torch.manual_seed(0)
    learned = gradcheck_cli.analyze(_CategoricalResidual(learned=True), batch)
    dense = sorted(x.grad_to_weight or 0.0 for x in learned.layers if x.name.startswith(("bottom.", "top.", "fc")))
    reference = (dense[2] + dense[3]) / 2  # of six: bottom.0, bottom.2, fc1, fc2, top.0, top.2
    tables = sorted(x.grad_to_weight or 0.0 for x in learned.layers if x.name.startswith("tables."))
    role_error = learned.thresholds["role_error"]
    for name in ("fc1", "fc2"):
        layer = learned.layer(name)
        assert (layer.grad_to_weight or 0.0) * role_error < reference, name
        assert layer.behind_scales, name
    assert (learned.layer("fc2").grad_to_weight or 0.0) * role_error > tables[len(tables) // 2]  # ~6x
    assert not learned.findings, [(f.layer, f.kind, f.severity) for f in learned.findings]
    torch.manual_seed(0)
    fixed = gradcheck_cli.analyze(_CategoricalResidual(learned=False), batch)
    assert {("fc1", "error"), ("fc2", "error")} <= {(f.layer, f.severity) for f in fixed.findings}


def test_a_role_spanning_stages_and_levels_is_judged_among_its_repeats() -> None:
    """FocalNet's focal_layers.{0,1} (3x3 and 5x5 depthwise convs) share a role name across levels and stages: the
    first stage's second level sits over balance_warning below that name's median, yet level with its repeat
    in the other block of its stage (the same number of parameters). Flagged only when both say slow."""
    report = _report("timm-focalnet")
    role = [x for x in report.layers if ".focal_layers." in x.name and x.category == "conv"]
    values = sorted(x.grad_to_weight or 0.0 for x in role)
    median = (values[len(values) // 2 - 1] + values[len(values) // 2]) / 2
    first = [x for x in role if x.name.startswith("layers.0.") and ".focal_layers.1." in x.name]
    assert len(first) == 2 and all((x.grad_to_weight or 0.0) * 10 < median for x in first)
    a, b = (x.grad_to_weight or 0.0 for x in first)
    assert max(a, b) / min(a, b) < 2
    assert not [f for f in report.findings if f.view == "update"]


class _DenseBlocks(torch.nn.Module):
    """RDNet's pattern: each block appends features to its input, scaled per channel (LayerScale when `learned`,
    else a fixed buffer of the same values), and a depthwise conv reads every channel alone."""

    def __init__(self, learned: bool, width: int = 16, blocks: int = 3) -> None:
        super().__init__()
        nn = torch.nn
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.grow = nn.ModuleList(nn.Conv2d(width * (1 + i), width, 1) for i in range(blocks))
        scales = [torch.full((1, width, 1, 1), 1e-6) for _ in range(blocks)]
        if learned:
            self.scales = nn.ParameterList(nn.Parameter(scale) for scale in scales)
        else:
            for i, scale in enumerate(scales):
                self.register_buffer(f"fixed{i}", scale)
        self.learned = learned
        self.dw = nn.Conv2d(width * (1 + blocks), width * (1 + blocks), 3, padding=1, groups=width * (1 + blocks))
        self.head = nn.Linear(width * (1 + blocks), 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        for i, grow in enumerate(self.grow):
            scale = self.scales[i] if self.learned else getattr(self, f"fixed{i}")
            h = torch.cat([h, scale * torch.nn.functional.gelu(grow(h))], dim=1)
        return self.head(torch.nn.functional.gelu(self.dw(h)).mean((2, 3)))


def test_units_starved_only_by_a_layer_scale_on_what_they_read_are_not_dead() -> None:
    """A depthwise conv's unit c gets dL/dW_c = sum dL/dz_c x_c: the 48 of its 64 channels that blocks scaled by
    1e-6 give rows ~1e-6 of the others, under the starved-unit floor (1e-5 of the RMS row), so 75% read dead
    before. A learned LayerScale opens (set to 1 in the replay, they are ordinary rows): marked, no finding. The
    same attenuation by a fixed buffer never opens: still dead."""
    torch.manual_seed(0)
    batch = (torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,)))
    learned = gradcheck_cli.analyze(_DenseBlocks(learned=True), batch)
    assert learned.layer("dw").zero_grad_unit_fraction == pytest.approx(0.75)
    assert learned.layer("dw").behind_scales
    assert not [f for f in learned.findings if f.layer == "dw"]
    torch.manual_seed(0)
    fixed = gradcheck_cli.analyze(_DenseBlocks(learned=False), batch)
    assert fixed.layer("dw").zero_grad_unit_fraction == pytest.approx(0.75)
    assert ("dw", "dead") in {(f.layer, f.kind) for f in fixed.findings}


CLOSED_CELL = """
import sys
sys.path.insert(0, {tests!r})
import torch
from corpus import HandWrittenCell, sequences

torch.manual_seed(0)
model = HandWrittenCell("lstm", forget_bias=-5.0)


def batches():
    return sequences()
"""


def test_a_gradient_that_reaches_the_first_steps_as_exactly_zero_reads_in_the_table(cli, write) -> None:
    """The hand-written LSTM with its forget gate held closed: the first steps get exactly 0 (a factor of 0),
    which the table shows as the status without a number, not as a crash."""
    path = write("closed_cell.py", CLOSED_CELL.format(tests=str(Path(__file__).parent)))
    result = cli("analyze", path)
    assert result.exit_code == 1, result.stdout
    assert "Traceback" not in result.stdout
    assert re.search(r"x2h\s.*vanishing \[time\]", result.stdout)
    assert "exactly 0 in float32" in result.stdout
