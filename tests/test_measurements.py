"""Every number gradcheck reports, checked against autograd written out independently in the test."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradcheck_cli


def _batches(count: int, features: int = 8, classes: int = 4, size: int = 12, seed: int = 3) -> list[tuple]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, features, generator=g), torch.randint(0, classes, (size,), generator=g))
        for _ in range(count)
    ]


def _reference_sequential(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor) -> tuple[dict, dict]:
    """Per-parameter gradients and per-module dL/dz, by plain autograd with retain_grad."""
    outputs = {}
    h = x
    for name, module in model.named_children():
        h = module(h)
        if any(True for _ in module.parameters()):
            h.retain_grad()
            outputs[name] = h
    model.zero_grad(set_to_none=True)
    F.cross_entropy(h, y).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads, {name: out.grad for name, out in outputs.items()}


def test_parameter_and_layer_norms_match_autograd() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    batches = _batches(3)
    report = gradcheck_cli.analyze(model, batches, steps=3)

    per_step = [_reference_sequential(model, x, y) for x, y in batches]
    for record in report.parameters:
        norms = [grads[record.name].norm().item() for grads, _ in per_step]
        assert record.grad_norm_steps == pytest.approx(norms, rel=1e-5)
        assert record.grad_norm == pytest.approx(sum(norms) / 3, rel=1e-5)
        assert record.max_abs == pytest.approx(max(grads[record.name].abs().max().item() for grads, _ in per_step))
        assert record.weight_norm == pytest.approx(dict(model.named_parameters())[record.name].norm().item())
        zeros = sum(float((grads[record.name] == 0).sum()) for grads, _ in per_step) / 3
        assert record.zero_fraction == pytest.approx(zeros / record.numel)
        assert record.rms == pytest.approx(record.grad_norm / math.sqrt(record.numel))

    for layer in report.layers:
        weight = dict(model.named_parameters())[f"{layer.name}.weight"]
        expected = [
            math.sqrt(grads[f"{layer.name}.weight"].norm() ** 2 + grads[f"{layer.name}.bias"].norm() ** 2)
            for grads, _ in per_step
        ]
        assert layer.grad_norm_steps == pytest.approx(expected, rel=1e-5)
        # grad_to_weight is over the weight matrix only (biases start at 0 and would make it meaningless)
        ratios = sorted(grads[f"{layer.name}.weight"].norm().item() / weight.norm().item() for grads, _ in per_step)
        assert layer.grad_to_weight == pytest.approx(ratios[1], rel=1e-5)  # median of 3
        dz = [outs[layer.name].norm().item() for _, outs in per_step]
        assert layer.output_grad_norm_steps == pytest.approx(dz, rel=1e-5)
        assert layer.output_grad_norm == pytest.approx(sum(dz) / 3, rel=1e-5)


def test_output_gradient_is_taken_before_an_inplace_relu() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(inplace=True), nn.Linear(16, 4))
    ((x, y),) = _batches(1)
    report = gradcheck_cli.analyze(model, (x, y), steps=1)
    z = model[0](x)
    z.retain_grad()
    F.cross_entropy(model[2](F.relu(z)), y).backward()
    assert report.layer("0").output_grad_norm == pytest.approx(z.grad.norm().item(), rel=1e-5)


class SharedTwice(nn.Module):
    """One Linear applied twice per forward (weight sharing, as in a recurrence)."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


def test_module_called_twice_reports_the_norm_over_both_calls() -> None:
    model = SharedTwice()
    ((x, y),) = _batches(1)
    report = gradcheck_cli.analyze(model, (x, y), steps=1)
    first = model.shared(x)
    first.retain_grad()
    second = model.shared(torch.tanh(first))
    second.retain_grad()
    F.cross_entropy(model.head(torch.tanh(second)), y).backward()
    expected = math.sqrt(first.grad.norm() ** 2 + second.grad.norm() ** 2)
    layer = report.layer("shared")
    assert layer.calls == 2
    assert layer.output_grad_norm == pytest.approx(expected, rel=1e-5)
    assert layer.grad_norm == pytest.approx(
        math.sqrt(model.shared.weight.grad.norm() ** 2 + model.shared.bias.grad.norm() ** 2), rel=1e-5
    )


class TiedLM(nn.Module):
    def __init__(self, vocab: int = 50, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.embed(ids))))


def test_tied_weights_are_one_parameter_owned_by_both_layers() -> None:
    model = TiedLM()
    ids = torch.randint(0, 50, (4, 6))
    targets = torch.randint(0, 50, (4, 6))
    report = gradcheck_cli.analyze(model, (ids, targets), steps=1)
    names = [p.name for p in report.parameters]
    assert names.count("embed.weight") == 1 and "head.weight" not in names
    tied = next(p for p in report.parameters if p.name == "embed.weight")
    assert set(tied.layers) == {"embed", "head"}
    logits = model(ids)
    (grad,) = torch.autograd.grad(F.cross_entropy(logits.reshape(-1, 50), targets.reshape(-1)), [model.embed.weight])
    assert tied.grad_norm == pytest.approx(grad.norm().item(), rel=1e-5)
    assert report.layer("head").grad_norm == pytest.approx(grad.norm().item(), rel=1e-5)


@pytest.mark.parametrize("sparse", [False, True])
def test_embedding_update_ratio_uses_only_the_rows_looked_up(sparse: bool) -> None:
    model = nn.Sequential(nn.Embedding(1000, 8, sparse=sparse), nn.Flatten(), nn.Linear(8 * 5, 3))
    ids = torch.randint(0, 1000, (6, 5))
    targets = torch.randint(0, 3, (6,))
    report = gradcheck_cli.analyze(model, (ids, targets), steps=1)
    weight = model[0].weight
    (grad,) = torch.autograd.grad(F.cross_entropy(model(ids), targets), [weight])
    grad = grad.to_dense()
    rows = ids.unique()
    layer = report.layer("0")
    assert layer.grad_norm == pytest.approx(grad.norm().item(), rel=1e-5)
    assert layer.grad_to_weight == pytest.approx(grad.norm().item() / weight[rows].norm().item(), rel=1e-5)
    param = report.parameters[0]
    assert param.zero_fraction == pytest.approx(float((grad == 0).sum()) / grad.numel())


class PartlyUsed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)
        self.used = nn.Linear(8, 4)
        self.spare = nn.Linear(8, 4)  # trainable, never called
        self.cut = nn.Linear(8, 8)  # trainable and called, but its output is detached

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(torch.relu(self.frozen(x)) + self.cut(x).detach())


def test_frozen_and_unused_layers() -> None:
    report = gradcheck_cli.analyze(PartlyUsed(), _batches(1)[0], steps=2)
    assert report.layer("frozen").status == "frozen"
    assert report.layer("frozen").grad_norm is None
    spare = report.layer("spare")
    assert spare.status == "unused" and spare.forward_index is None
    assert [f.kind for f in report.findings if f.layer == "spare"] == ["unused"]
    cut = report.layer("cut")
    assert cut.status == "unused" and cut.forward_index is not None
    (spare_finding,) = [f for f in report.findings if f.layer == "spare"]
    (cut_finding,) = [f for f in report.findings if f.layer == "cut"]
    assert "never called" in spare_finding.message and "detached" in cut_finding.message
    frozen_params = [p for p in report.parameters if p.name.startswith("frozen")]
    assert all(not p.requires_grad and p.grad_norm is None for p in frozen_params)


class ZeroWidth(nn.Module):
    """A layer with no units beside a real one, concatenated: Hugging Face's MobileBERT head builds
    nn.Linear(vocab, hidden - embedding), which is empty when the two sizes are equal."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(8, 16)
        self.empty = nn.Linear(8, 0)  # weight (0, 8), bias (0,)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([self.body(x), self.empty(x)], dim=1)
        return self.head(torch.relu(h))


def test_an_empty_layer_is_measured_without_error() -> None:
    torch.manual_seed(0)
    model = ZeroWidth()
    x, y = torch.randn(8, 8), torch.randint(0, 4, (8,))
    report = gradcheck_cli.analyze(model, [(x, y)], steps=1)
    F.cross_entropy(model(x), y).backward()
    layers = {layer.name: layer for layer in report.layers}
    assert layers["empty"].params == 0 and layers["empty"].grad_norm == 0.0
    assert model.body.weight.grad is not None
    expected = math.sqrt(model.body.weight.grad.square().sum().item() + model.body.bias.grad.square().sum().item())
    assert layers["body"].grad_norm == pytest.approx(expected, rel=1e-5)


def test_dead_units_are_counted_per_unit_over_all_batches() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    with torch.no_grad():
        model[0].bias[:3] = -100.0  # units 0..2 can never activate; 3..5 sometimes do
        model[0].bias[3:] = 100.0
    report = gradcheck_cli.analyze(model, _batches(3, features=4, classes=2), steps=3)
    layer = report.layer("0")
    assert layer.dead_fraction == pytest.approx(0.5)
    assert layer.zero_grad_unit_fraction == pytest.approx(0.5)


def test_saturation_fraction_counts_inputs_past_the_knee() -> None:
    model = nn.Sequential(nn.Linear(4, 64), nn.Sigmoid(), nn.Linear(64, 2))
    x, y = _batches(1, features=4, classes=2)[0]
    report = gradcheck_cli.analyze(model, (x, y), steps=1)
    z = model[0](x)
    expected = float((z.abs() > 4.34).float().mean())
    assert report.layer("0").saturated_fraction == pytest.approx(expected)


def test_input_statistics_of_the_first_layer() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.tensor([[0.0, 0.0, 3.0, 4.0]] * 5)
    report = gradcheck_cli.analyze(model, (x, torch.zeros(5, dtype=torch.long)), steps=1)
    first = report.layer("0")
    assert first.input_rms == pytest.approx(math.sqrt((9 + 16) / 4))
    assert first.input_zero_fraction == pytest.approx(0.5)


def test_histograms_count_every_nonzero_gradient_value() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    report = gradcheck_cli.analyze(model, _batches(2), steps=2)
    for layer in report.layers:
        nonzero = layer.trainable_params * 2 * (1 - (layer.zero_fraction or 0.0))
        assert sum(layer.histogram or ()) == pytest.approx(nonzero, abs=0.5)


def test_loss_is_recorded_per_step() -> None:
    model = nn.Sequential(nn.Linear(8, 4))
    batches = _batches(2)
    report = gradcheck_cli.analyze(model, batches, steps=2)
    expected = [F.cross_entropy(model(x), y).item() for x, y in batches]
    assert report.loss == pytest.approx(expected, rel=1e-6)
    assert report.loss_name == "cross-entropy"


def test_custom_normalisation_classes_count_as_norm_layers() -> None:
    """A model's own LayerNorm/RMSNorm (1-D scale and shift, "Norm" in the class name) is a norm layer, and a
    layer feeding it is known to be scale-invariant."""

    class RMSNorm(nn.Module):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.gain = nn.Parameter(torch.ones(width))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * self.gain

    model = nn.Sequential(nn.Linear(8, 16), RMSNorm(16), nn.ReLU(), nn.Linear(16, 4))
    report = gradcheck_cli.analyze(model, _batches(1)[0], steps=1)
    assert report.layer("1").category == "norm"
    assert report.layer("0").feeds_norm and not report.layer("3").feeds_norm


def test_a_layer_normalised_through_an_activation_is_scale_invariant() -> None:
    """conv -> ReLU -> BatchNorm: BN(relu(a z)) = BN(relu(z)) for a > 0, so the loss ignores the conv's weight
    scale (checked here by scaling it), as when BatchNorm reads the conv's output itself; ReLU saves only its
    result, so the conv's output tensor is gone by the time BatchNorm runs. GELU and SiLU are homogeneous in
    both limits and count too; tanh (neither in its middle range) does not."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,))
    for act, invariant in ((nn.ReLU(), True), (nn.GELU(), True), (nn.SiLU(), True), (nn.Tanh(), False)):
        model = nn.Sequential(
            nn.Conv2d(3, 8, 3), act, nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 36, 16), nn.ReLU(), nn.Linear(16, 4)
        )
        if isinstance(act, nn.ReLU):
            before = F.cross_entropy(model(x), y)
            with torch.no_grad():
                model[0].weight.mul_(7.0)
                model[0].bias.mul_(7.0)
            assert F.cross_entropy(model(x), y).item() == pytest.approx(before.item(), rel=1e-4)
        report = gradcheck_cli.analyze(model, (x, y), steps=1)
        assert report.layer("0").feeds_norm is invariant, type(act).__name__
        assert not report.layer("4").feeds_norm


def test_normalised_layers_do_not_set_the_network_median() -> None:
    """A BatchNorm net's convs scaled by 0.01: the same function (scale invariance, checked; eps 1e-10), their
    ||g||/||W|| 10^4x larger (g scales by 1/a, W by a). The head's speed is judged against the layers whose scale
    matters (the two linear layers here, their median written out from autograd), not against the convs'."""
    torch.manual_seed(0)
    x, y = torch.randn(32, 3, 8, 8), torch.randint(0, 4, (32,))

    def conv(cin: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8, eps=1e-10), nn.ReLU()]

    model = nn.Sequential(
        *conv(3), *conv(8), *conv(8), *conv(8), nn.Flatten(), nn.Linear(8 * 64, 32), nn.ReLU(), nn.Linear(32, 4)
    )
    before = F.cross_entropy(model(x), y).item()
    with torch.no_grad():
        for module in model:
            if isinstance(module, nn.Conv2d):
                module.weight.mul_(0.01)
    model.zero_grad()
    loss = F.cross_entropy(model(x), y)
    assert loss.item() == pytest.approx(before, rel=1e-4)
    loss.backward()
    ratios = {i: (m.weight.grad.norm() / m.weight.norm()).item() for i, m in enumerate(model) if hasattr(m, "weight")}
    linear = sorted(ratios[i] for i in (13, 15))
    assert min(ratios[i] for i in (0, 3, 6, 9)) > 100 * max(linear)  # the convs' values would set any median
    model.zero_grad()
    model.train()
    report = gradcheck_cli.analyze(model, (x, y), steps=1)
    assert all(report.layer(str(i)).feeds_norm for i in (0, 3, 6, 9))
    assert report.update.median_grad_to_weight == pytest.approx(sum(linear) / 2, rel=1e-3)
    assert not [f for f in report.findings if f.view == "update"]


def test_a_head_tied_to_an_embedding_with_its_own_bias_is_not_judged_twice() -> None:
    """Funnel's pattern: the output head reuses the word embeddings' table (N(0, 1) in torch, an embedding's own
    scale) and adds a bias of its own. The table is one tensor with one gradient (both uses summed, written out
    here by autograd) and one verdict, on its first owner, the embedding, which is not compared with dense
    layers; the head, of its own only a bias, is not compared either (before, it read ~50x below the median)."""

    class TiedLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(64, 32)
            self.body = nn.Sequential(*(nn.Sequential(nn.Linear(32, 32), nn.Tanh()) for _ in range(4)))
            self.head = nn.Linear(32, 64)
            self.head.weight = self.emb.weight

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.body(self.emb(ids)))

    torch.manual_seed(0)
    model = TiedLM()
    ids, targets = torch.randint(0, 64, (16,)), torch.randint(0, 64, (16,))
    F.cross_entropy(model(ids), targets).backward()
    table = model.emb.weight
    # an embedding's ratio is over the rows that got a gradient (the rows looked up): here every row, by the head
    touched = table.grad.abs().sum(dim=1) > 0
    assert touched.all()
    expected = (table.grad[touched].norm() / table.detach()[touched].norm()).item()
    model.zero_grad()
    report = gradcheck_cli.analyze(model, (ids, targets), steps=1)
    assert report.layer("emb").grad_to_weight == pytest.approx(expected, rel=1e-4)
    assert report.layer("head").scale_only
    assert not [f for f in report.findings if f.layer in ("head", "emb") and f.view == "update"]


def test_batched_histograms_match_log2_binning_written_out() -> None:
    """Independent binning: floor(log2 |g|) in float64, clipped to the range, zeros left out, times the scale."""
    from gradcheck_cli.reduce import histograms_of
    from gradcheck_cli.series import HISTOGRAM_BINS, HISTOGRAM_HIGH, HISTOGRAM_LOW

    g = torch.Generator().manual_seed(0)
    first = torch.randn(1000, generator=g) * 10.0 ** torch.randint(-15, 6, (1000,), generator=g).float()
    first[::7] = 0.0
    first[:3] = torch.tensor([1e-45, -3e-39, 1e30])  # a subnormal, a subnormal, far above the range
    second = torch.randn(50, generator=g)
    rows = histograms_of([first, second], [1.0, 3.0])
    for row, values, scale in ((rows[0], first, 1.0), (rows[1], second, 3.0)):
        nonzero = values[values != 0].double().abs()
        bins = torch.floor(torch.log2(nonzero)).long().clamp(HISTOGRAM_LOW, HISTOGRAM_HIGH - 1) - HISTOGRAM_LOW
        expected = torch.bincount(bins, minlength=HISTOGRAM_BINS).double() * scale
        assert torch.equal(row.double(), expected)


def test_histograms_of_large_tensors_are_scaled_to_all_elements() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 512), nn.Tanh(), nn.Linear(512, 10))  # 524k weights: sampled
    report = gradcheck_cli.analyze(model, (torch.randn(64, 1024), torch.randint(0, 10, (64,))), steps=1)
    first = report.layers[0]
    nonzero = first.params * (1 - first.zero_fraction)
    assert sum(first.histogram or ()) == pytest.approx(nonzero, rel=0.01)


def test_float64_models_give_the_float32_numbers_within_precision() -> None:
    """A .double() model used to crash (vector_norm refuses to narrow float64); its numbers are float32's."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    inputs, targets = torch.randn(16, 8), torch.randint(0, 4, (16,))
    single = gradcheck_cli.analyze(model, (inputs, targets))
    double = gradcheck_cli.analyze(model.double(), (inputs.double(), targets))
    for a, b in zip(single.layers, double.layers, strict=True):
        for key in ("grad_norm", "weight_norm", "grad_to_weight", "output_grad_norm"):
            assert getattr(b, key) == pytest.approx(getattr(a, key), rel=1e-5), (a.name, key)
    assert [f.kind for f in double.findings] == [f.kind for f in single.findings]


def test_a_parametrized_linear_is_one_layer_with_its_real_weight() -> None:
    """weight_norm / spectral_norm / orthogonal keep the tensors that train under `parametrizations.weight`:
    the Linear is one layer owning them, its ||g||/||W|| is over them (not its bias alone), and the
    parametrization modules, which pass dL/dW rather than a signal, are no rows of their own."""
    from torch.nn.utils import parametrizations

    torch.manual_seed(0)
    model = nn.Sequential(
        parametrizations.weight_norm(nn.Linear(8, 16)), nn.ReLU(),
        parametrizations.spectral_norm(nn.Linear(16, 16)), nn.ReLU(),
        parametrizations.orthogonal(nn.Linear(16, 16)), nn.ReLU(), nn.Linear(16, 4),
    )  # fmt: skip
    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
    report = gradcheck_cli.analyze(model, (x, y), steps=1)
    assert [(layer.name, layer.type) for layer in report.layers] == [
        ("0", "Linear"), ("2", "Linear"), ("4", "Linear"), ("6", "Linear")
    ]  # fmt: skip
    assert "0.parametrizations.weight.original1" in report.layer("0").parameters
    # autograd written out: the same loss, the matrix tensor that trains (weight_norm's direction v)
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    v = model[0].parametrizations.weight.original1
    assert v.grad is not None
    assert report.layer("0").grad_to_weight == pytest.approx(float(v.grad.norm() / v.detach().norm()), rel=1e-5)
    assert sum(layer.params for layer in report.layers) == sum(p.numel() for p in model.parameters())


def test_analyses_of_many_models_keep_no_sampling_indices_between_runs() -> None:
    """The sampling indices are 512 KiB per distinct tensor size; before, every size ever seen stayed cached
    for the life of the process (50 models of different widths: +63 MiB)."""
    from gradcheck_cli.reduce import SAMPLE_SIZE, _sample_index

    for width in range(300, 310):
        model = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 2))  # width^2 > SAMPLE_SIZE
        assert width * width > SAMPLE_SIZE
        gradcheck_cli.analyze(model, (torch.randn(4, width), torch.randint(0, 2, (4,))), steps=1)
        assert _sample_index.cache_info().currsize == 0


class CrossAttentionBlock(nn.Module):
    """A decoder block built with a cross-attention that runs only when an encoder output is given (Hugging Face's
    causal-LM form of encoder-decoder models)."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Linear(8, 8)
        self.cross = nn.ModuleDict({"q": nn.Linear(8, 8), "k": nn.Linear(8, 8), "v": nn.Linear(8, 8)})
        self.cross_norm = nn.LayerNorm(8)

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None) -> torch.Tensor:
        x = x + torch.tanh(self.mix(x))
        if memory is not None:
            x = x + self.cross["v"](memory) * torch.sigmoid(self.cross["q"](x) * self.cross["k"](memory))
            x = self.cross_norm(x)
        return x


class CausalDecoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(CrossAttentionBlock() for _ in range(3))
        self.pooler = nn.Linear(8, 8)  # never called either, elsewhere in the model: a cause of its own
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def test_the_unused_part_of_every_block_is_one_finding_that_covers_its_layers() -> None:
    """Every block's cross-attention (3 linear layers) and its norm are never called: 12 layers, one cause, one
    finding on the first, the other 11 in `also` and unused in the table; the pooler, never called outside the
    blocks, is a second finding."""
    report = gradcheck_cli.analyze(CausalDecoder(), _batches(1)[0], steps=2)
    cross = {f"blocks.{i}.{name}" for i in range(3) for name in ("cross.q", "cross.k", "cross.v", "cross_norm")}
    unused = [f for f in report.findings if f.kind == "unused"]
    assert len(unused) == 2, [(f.layer, f.also) for f in unused]
    blocks, pooler = sorted(unused, key=lambda f: f.layer != "blocks.0.cross.q")
    assert {blocks.layer, *blocks.also} == cross and len(blocks.also) == 11
    assert "11 more layers, in blocks.#.cross, blocks.#.cross_norm" in blocks.message
    assert pooler.layer == "pooler" and pooler.also == ()
    assert all(report.layer(name).status == "unused" for name in cross)
    assert report.layer("blocks.1.mix").status != "unused"


class ClassTokenHead(nn.Module):
    """Tokens (a class token first) through a block whose `patches` layer transforms the other tokens only, as
    MViT-v2's last block pools its queries; the head reads the class token. The loss cannot depend on
    `patches` at any weights: structurally unread, so unused (a warning), not dead."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.mix = nn.Linear(16, 16)
        self.patches = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = torch.relu(self.mix(self.embed(x).unsqueeze(1).expand(-1, 5, -1) + torch.arange(5.0)[:, None]))
        tokens = torch.cat([tokens[:, :1], self.patches(tokens[:, 1:])], dim=1)
        return self.head(tokens[:, 0])


def _dead_relu() -> nn.Module:
    """A layer whose ReLU units never activate (bias -100, inputs at unit scale), and one before it that gets
    no gradient because of them: the parameters of both matter once those units come on, so both stay dead."""
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        model[2].bias.fill_(-100.0)
    return model


def _zero_mlp() -> nn.Module:
    """Every weight and bias 0 before ReLUs (benchmarks/theory_verdicts.py's zero-weights): the hidden layers
    get exactly 0 (ReLU's derivative at 0 is 0, and the zero layers after them pass nothing), yet the loss
    depends on each of them once the others hold any values: dead, none unread."""
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
    return model


def test_a_layer_whose_output_the_loss_never_reads_is_unused_not_dead() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))
    model = ClassTokenHead()
    # autograd written out: patches gets exactly 0, while mix (read through the class token) learns
    nn.functional.cross_entropy(model(x), y).backward()
    assert model.patches.weight.grad is not None and not model.patches.weight.grad.any()
    assert model.mix.weight.grad is not None and model.mix.weight.grad.any()
    model.zero_grad()
    report = gradcheck_cli.analyze(model, (x, y), steps=2)
    found = {(f.layer, f.kind, f.severity) for f in report.findings if f.covers("patches")}
    assert found == {("patches", "unused", "warning")}
    assert report.layer("patches").unread and not report.layer("mix").unread
    dead = gradcheck_cli.analyze(_dead_relu(), (x, y), steps=2)
    # layer 2's units never activate, and layer 0 gets exactly 0 because of them: both dead, neither unread
    assert not dead.layer("2").unread and not dead.layer("0").unread
    assert {("0", "dead", "error"), ("2", "dead", "error")} <= {(f.layer, f.kind, f.severity) for f in dead.findings}
    zeros = gradcheck_cli.analyze(_zero_mlp(), (x, y), steps=2)
    assert not any(layer.unread for layer in zeros.layers)
    assert {f.kind for f in zeros.findings if f.layer in ("0", "2")} == {"dead"}


def test_batch_norm_over_two_values_passes_no_gradient_and_is_refused() -> None:
    """BatchNorm over 2 values per channel maps them to -1 and +1 whatever they are (eps aside): in float64
    with eps = 1e-30 its input gradient is 0 up to rounding, so what reaches the layers before it is an
    artifact of eps and rounding, and gradcheck stops (exit 2) rather than judge it. At 4 values the path is
    real but BN's backward divides by the spread of 4 values: a note names the layer; at 8, nothing."""
    import pytest
    import torch
    from torch import nn

    from gradcheck_cli.errors import UserError

    torch.manual_seed(0)
    x = torch.randn(2, 16, dtype=torch.float64, requires_grad=True)
    (nn.BatchNorm1d(16, eps=1e-30).double()(x) * torch.randn(2, 16, dtype=torch.float64)).sum().backward()
    assert x.grad.abs().max() < 1e-10

    def model() -> nn.Module:
        return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))

    def batches(size: int) -> list:
        return [(torch.randn(size, 8), torch.randint(0, 4, (size,))) for _ in range(2)]

    with pytest.raises(UserError, match="normalises 2 values per channel"):
        gradcheck_cli.analyze(model(), batches(2))
    notes = gradcheck_cli.analyze(model(), batches(4)).notes
    assert [n for n in notes if n.startswith("1 (BatchNorm) normalises only 4 values per channel")]
    assert not [n for n in gradcheck_cli.analyze(model(), batches(8)).notes if "(BatchNorm)" in n]
    gradcheck_cli.analyze(model(), batches(2), eval_mode=True)  # running statistics: no batch statistics used
