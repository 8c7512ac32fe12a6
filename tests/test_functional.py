"""Matrices that no module applies (layers.LayerSpec.functional, functional.MatmulWatch): a network written as
`h @ self.W1` on the model itself, or with its weights in an nn.ParameterList applied by F.linear, is measured
layer by layer, each matrix a layer, checked against autograd written out here and against theory."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradcheck_cli


class NumpyStyle(nn.Module):
    """Every matrix a parameter of the model itself, as a network ported from numpy is written; W2 is applied
    transposed (`h @ W2.T`), W3 through einsum."""

    def __init__(self, sizes: tuple[int, ...] = (12, 16, 16, 16, 4), std: float = 1.0) -> None:
        super().__init__()
        self.W0 = nn.Parameter(torch.randn(sizes[0], sizes[1]) * std)
        self.W1 = nn.Parameter(torch.randn(sizes[1], sizes[2]) * std)
        self.W2 = nn.Parameter(torch.randn(sizes[3], sizes[2]) * std)  # (out, in): used as W2.T
        self.W3 = nn.Parameter(torch.randn(sizes[3], sizes[4]) * std)
        self.b0 = nn.Parameter(torch.zeros(sizes[1]))

    def outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each matrix's output z (before any bias or activation), in order: what the test differentiates."""
        z0 = x @ self.W0
        z1 = torch.sigmoid(z0 + self.b0) @ self.W1
        z2 = torch.sigmoid(z1) @ self.W2.T
        z3 = torch.einsum("bi,io->bo", torch.sigmoid(z2), self.W3)
        return [z0, z1, z2, z3]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.outputs(x)[-1]


def _batches(count: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(32, 12, generator=g), torch.randint(0, 4, (32,), generator=g)) for _ in range(count)]


def test_matrices_of_the_model_itself_are_layers_with_their_own_dl_dz() -> None:
    torch.manual_seed(0)
    model = NumpyStyle()
    batches = _batches()
    report = gradcheck_cli.analyze(model, batches, steps=3)
    layers = {layer.name: layer for layer in report.layers}
    assert [name for name in layers if name.startswith("W")] == ["W0", "W1", "W2", "W3"]
    expected_dz: dict[str, list[float]] = {name: [] for name in ("W0", "W1", "W2", "W3")}
    expected_g: dict[str, list[float]] = {name: [] for name in ("W0", "W1", "W2", "W3")}
    for x, y in batches:
        outputs = model.outputs(x)
        loss = F.cross_entropy(outputs[-1], y)
        matrices = [model.W0, model.W1, model.W2, model.W3]
        grads = torch.autograd.grad(loss, [*outputs, *matrices])
        for i, name in enumerate(expected_dz):
            expected_dz[name].append(grads[i].norm().item())
            expected_g[name].append(grads[4 + i].norm().item())
    for name, dz in expected_dz.items():
        layer = layers[name]
        assert layer.type == "Parameter" and layer.category == "linear", name
        assert layer.output_grad_norm_steps == pytest.approx(dz, rel=1e-5), name
        assert layer.grad_norm_steps == pytest.approx(expected_g[name], rel=1e-5), name
        assert layer.calls == 1
    assert layers["W1"].input_rms is not None and layers["W0"].input_rms == pytest.approx(
        math.sqrt(sum(float(x.square().mean()) for x, _ in batches) / 3), rel=0.05
    )
    assert [layers[n].depth for n in expected_dz] == [1, 2, 3, 4]  # one matrix after another in the graph
    assert layers[""].parameters == ("b0",)  # the model's own layer keeps what is not a matrix
    assert set(report.update.layers) >= {"W0", "W1", "W2", "W3"}


class ParameterListNet(nn.Module):
    """A tanh net with its square matrices in an nn.ParameterList, applied by F.linear; weights N(0, sw2/n)."""

    def __init__(self, depth: int, sw2: float, width: int = 128) -> None:
        super().__init__()
        self.inp = nn.Linear(32, width)
        self.weights = nn.ParameterList(
            nn.Parameter(torch.randn(width, width) * math.sqrt(sw2 / width)) for _ in range(depth)
        )
        self.out = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        for weight in self.weights:
            h = torch.tanh(F.linear(h, weight))
        return self.out(h)


@pytest.mark.parametrize(("sw2", "healthy"), [(1.0, True), (4.0, False)])
def test_a_parameter_list_chain_is_judged_like_modules(sw2: float, healthy: bool) -> None:
    """Mean-field theory (Poole et al. 2016; Schoenholz et al. 2017), zero biases: at sw2 = 1 a tanh net sits at
    the edge of chaos from the ordered side (chi1 = E[tanh'(h)^2] < 1 for any q > 0), its gradients shrink slowly
    toward the input; at sw2 = 4 it is chaotic, chi1 = 1.36, depth scale xi = -1/ln(chi1) = 3.2 layers: over 50
    layers dL/dz grows by about exp(50 / (2 xi)) ~ 2400x toward the input, past the signal view's error factor
    (400). Before, the list was one layer without a dL/dz, and both nets passed unjudged."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(64, 32, generator=g), torch.randint(0, 10, (64,), generator=g)) for _ in range(3)]
    report = gradcheck_cli.analyze(ParameterListNet(50, sw2), batches, steps=3)
    weights = [layer for layer in report.layers if layer.name.startswith("weights.")]
    assert len(weights) == 50 and all(layer.output_grad_norm for layer in weights)
    assert report.signal.gain_per_layer is not None
    errors = [f for f in report.findings if f.severity == "error"]
    if healthy:
        assert errors == [] and report.signal.gain_per_layer < 1.0
    else:
        assert report.signal.gain_per_layer > 1.1
        assert any(f.kind == "exploding" and f.view == "signal" for f in errors)


def test_a_matrix_that_is_never_multiplied_stays_unjudged_other() -> None:
    """A positional table added to the input (a matrix of the model itself, never a matmul's operand) is not a
    weight layer: no update-view comparison, no finding; the nn.Linear layers are judged as before."""

    class Positional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pos = nn.Parameter(torch.randn(8, 16) * 0.02)
            self.body = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x + self.pos).mean(dim=1)

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(16, 8, 16, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(2)]
    report = gradcheck_cli.analyze(Positional(), batches, steps=2)
    pos = next(layer for layer in report.layers if layer.name == "pos")
    assert pos.category == "other" and pos.output_grad_norm is None and pos.grad_norm
    assert "pos" not in report.update.layers
    assert not [f for f in report.findings if f.layer == "pos"]


class BareRNN(nn.Module):
    """A many-to-one RNN written with bare matrices, looped in Python over the sequence."""

    def __init__(self, activation: str, recurrence: torch.Tensor, input_scale: float, n_in: int = 8) -> None:
        super().__init__()
        hidden = recurrence.shape[0]
        self.activation = activation
        self.W_xh = nn.Parameter(torch.randn(n_in, hidden) * input_scale / math.sqrt(n_in))
        self.W_hh = nn.Parameter(recurrence.clone())
        self.b_h = nn.Parameter(torch.zeros(hidden))
        self.W_hy = nn.Parameter(torch.randn(hidden, 4) / math.sqrt(hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = torch.tanh if self.activation == "tanh" else torch.relu
        h = x.new_zeros(x.shape[0], self.W_hh.shape[0])
        for t in range(x.shape[1]):
            h = act(x[:, t] @ self.W_xh + h @ self.W_hh + self.b_h)
        return h @ self.W_hy


@pytest.mark.parametrize("healthy", [True, False])
def test_a_recurrence_of_bare_matrices_is_judged_through_time(healthy: bool) -> None:
    """Bengio et al. 1994; Pascanu et al. 2013: with ||W_hh|| = 0.5 (half an orthogonal matrix) and tanh' <= 1,
    the gradient reaching step t from the last of 64 shrinks by at least 2 per step: vanishing through time. An
    IRNN (Le et al. 2015: ReLU, W_hh = I, small input weights) carries it unchanged on its active units."""
    torch.manual_seed(0)
    hidden = 32
    if healthy:
        model = BareRNN("relu", torch.eye(hidden), 0.1)
    else:
        model = BareRNN("tanh", 0.5 * nn.init.orthogonal_(torch.empty(hidden, hidden)), 1.0)
    g = torch.Generator().manual_seed(4)
    batches = [(torch.randn(16, 64, 8, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(2)]
    report = gradcheck_cli.analyze(model, batches, steps=2)
    layers = {layer.name: layer for layer in report.layers}
    assert layers["W_hh"].calls == 64 and layers["W_hh"].category == "linear"
    errors = [f for f in report.findings if f.severity == "error"]
    if healthy:
        assert errors == []
    else:
        assert any(f.layer == "W_hh" and f.kind == "vanishing" and f.view == "time" for f in errors)


class BareConvNet(nn.Module):
    """ReLU convolutions with their kernels in a ParameterList, applied by F.conv2d; He init (Var = 2 / fan_in)
    times `gain`, so that by He et al. (2015) each layer scales dL/dz by `gain` toward the input."""

    def __init__(self, depth: int, gain: float, channels: int = 16) -> None:
        super().__init__()
        shapes = [(channels, 3)] + [(channels, channels)] * (depth - 1)
        self.kernels = nn.ParameterList(
            nn.Parameter(torch.randn(out, cin, 3, 3) * (gain if i else 1.0) * math.sqrt(2 / (9 * cin)))
            for i, (out, cin) in enumerate(shapes)
        )
        self.head = nn.Parameter(torch.randn(channels, 10) / math.sqrt(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for kernel in self.kernels:
            x = F.relu(F.conv2d(x, kernel, padding=1))
        return x.mean(dim=(2, 3)) @ self.head


@pytest.mark.parametrize("gain", [1.0, 0.5])
def test_kernels_applied_by_conv2d_are_conv_layers_with_he_s_gain(gain: float) -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(5)
    batches = [(torch.randn(16, 3, 16, 16, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(2)]
    report = gradcheck_cli.analyze(BareConvNet(16, gain), batches, steps=2)
    kernels = [layer for layer in report.layers if layer.name.startswith("kernels.")]
    assert len(kernels) == 16 and {layer.category for layer in kernels} == {"conv"}
    assert report.signal.gain_per_layer == pytest.approx(gain, rel=0.1)
    vanishing = [f for f in report.findings if f.kind == "vanishing" and f.severity == "error"]
    assert bool(vanishing) == (gain < 1)


def test_rows_gathered_from_a_bare_matrix_are_activations_not_its_calls() -> None:
    """`E[ids] @ W`: the rows looked up are the input of W's call, not a view of E (advanced indexing copies);
    E, never passed to a matmul itself, stays outside the views."""

    class Lookup(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.E = nn.Parameter(torch.randn(50, 16))
            self.W = nn.Parameter(torch.randn(16, 5) / 4.0)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return (self.E[ids] @ self.W).mean(dim=1)

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(6)
    batches = [(torch.randint(0, 50, (8, 6), generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(2)]
    layers = {layer.name: layer for layer in gradcheck_cli.analyze(Lookup(), batches, steps=2).layers}
    assert layers["W"].category == "linear" and layers["W"].calls == 1 and layers["W"].output_grad_norm
    assert layers["E"].category == "other" and layers["E"].calls == 0


def test_the_watch_stops_after_a_step_that_applied_no_bare_matrix(monkeypatch: pytest.MonkeyPatch) -> None:
    """A model whose only bare matrix is a positional table (the overhead benchmark's transformer) pays for the
    watch in its first measured step only."""
    import gradcheck_cli.functional

    entered = []
    original = gradcheck_cli.functional.MatmulWatch.__enter__
    monkeypatch.setattr(
        gradcheck_cli.functional.MatmulWatch, "__enter__", lambda self: entered.append(1) or original(self)
    )

    class Positional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pos = nn.Parameter(torch.randn(8, 16) * 0.02)
            self.body = nn.Linear(16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x + self.pos).mean(dim=1)

    x, y = torch.randn(4, 8, 16), torch.randint(0, 3, (4,))
    gradcheck_cli.analyze(Positional(), (x, y), steps=4)
    assert len(entered) == 1
    entered.clear()
    gradcheck_cli.analyze(NumpyStyle(), _batches(), steps=3)
    assert len(entered) >= 3  # applied: watched every step


class Dense(nn.Module):
    """A hand-written linear layer: its matrix is not called `weight`, so no rule by class or name knows it."""

    def __init__(self, n_in: int, n_out: int, scale: float = 1.0) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.randn(n_in, n_out) * math.sqrt(2.0 / n_in) * scale)
        self.b = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.b, x, self.W) if x.dim() == 2 else x @ self.W + self.b


class DenseNet(nn.Module):
    def __init__(self, scales: tuple[float, ...]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Dense(32, 32, s) for s in scales)
        self.out = Dense(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = torch.relu(block(x))
        return self.out(x)


@pytest.mark.parametrize("rescaled", [False, True])
def test_a_module_applying_its_own_matrix_is_a_weight_layer(rescaled: bool) -> None:
    """A ReLU net is positively homogeneous: W2 -> c W2, W3 -> W3 / c leaves the function and dL/dz above W3
    unchanged (Neyshabur et al. 2015), and scales ||g2||/||W2|| by 1/c^2: at c = 100, 1e4x below its peers, a
    layer that no longer learns under SGD (an error), and ||g3||/||W3|| by c^2. Before, a `Dense` holding
    `self.W` was `other`: outside the update view, so the broken net passed."""
    torch.manual_seed(0)
    scales = (1.0, 1.0, 100.0, 0.01, 1.0, 1.0) if rescaled else (1.0,) * 6
    model = DenseNet(scales)
    g = torch.Generator().manual_seed(7)
    batches = [(torch.randn(64, 32, generator=g), torch.randint(0, 4, (64,), generator=g)) for _ in range(3)]
    report = gradcheck_cli.analyze(model, batches, steps=3)
    layers = {layer.name: layer for layer in report.layers}
    names = [f"blocks.{i}" for i in range(6)] + ["out"]
    matrices = [model.get_submodule(name).W for name in names]
    ratios: dict[str, list[float]] = {name: [] for name in names}  # ||dL/dW|| / ||W|| per step, W alone
    for x, y in batches:
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), matrices)
        for name, grad, w in zip(names, grads, matrices, strict=True):
            ratios[name].append(grad.norm().item() / w.norm().item())
    expected = {name: statistics.median(values) for name, values in ratios.items()}
    for name in names:
        assert layers[name].category == "linear" and layers[name].type == "Dense", name
        assert layers[name].grad_to_weight == pytest.approx(expected[name], rel=1e-5), name
    assert set(report.update.layers) == set(names)
    errors = {(f.layer, f.kind, f.view) for f in report.findings if f.severity == "error"}
    if rescaled:
        assert expected["blocks.2"] < 1e-3 * sorted(expected.values())[3]  # theory: 1 / c^2 of its peers
        assert ("blocks.2", "vanishing", "update") in errors
    else:
        assert max(expected.values()) < 10 * min(expected.values())
        assert errors == set() and not [f for f in report.findings if f.view == "update"]


def test_kinds_are_told_by_where_the_matrix_goes() -> None:
    """A module's kernel applied by F.conv2d is a conv layer (its units are channels, dim 1); a learned tensor
    that is the *input* of F.linear (Perceiver's latent array, expanded over the batch) is not a weight: its
    module stays `other`. The watch runs in the first measured step only (what each was applied as is known)."""
    import gradcheck_cli.functional

    class Kernel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.kernel = nn.Parameter(torch.randn(8, 3, 3, 3) * math.sqrt(2.0 / 27))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.conv2d(x, self.kernel, padding=1)

    class Latents(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.latents = nn.Parameter(torch.randn(4, 8))

        def forward(self, batch: int) -> torch.Tensor:
            return self.latents.expand(batch, -1, -1)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.latent = Kernel(), Latents()
            self.query = nn.Linear(8, 8)
            self.head = nn.Linear(8, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            features = torch.relu(self.conv(x)).mean(dim=(2, 3))  # (N, 8)
            q = self.query(self.latent(x.shape[0]))  # (N, 4, 8)
            return self.head(torch.softmax(q @ features[:, :, None], dim=1).mul(q).sum(dim=1))

    entered = []
    original = gradcheck_cli.functional.MatmulWatch.__enter__
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            gradcheck_cli.functional.MatmulWatch, "__enter__", lambda self: entered.append(1) or original(self)
        )
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(8)
        batches = [(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 5, (4,), generator=g)) for _ in range(3)]
        report = gradcheck_cli.analyze(Net(), batches, steps=3)
    layers = {layer.name: layer for layer in report.layers}
    assert layers["conv"].category == "conv" and layers["latent"].category == "other"
    assert "conv" in report.update.layers and "latent" not in report.update.layers
    assert len(entered) == 1


@pytest.mark.skipif(not hasattr(F, "grouped_mm"), reason="torch without F.grouped_mm")
def test_experts_applied_by_a_grouped_matmul_are_a_weight_layer() -> None:
    """Hugging Face's MoE experts (Mixtral, Qwen-MoE: `experts_implementation` grouped_mm) hold every expert in
    one 3-D tensor and apply it by one grouped matmul over the rows sorted by expert: a weight layer."""

    class Experts(nn.Module):
        def __init__(self, experts: int = 4, d: int = 16) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(experts, d, d) / math.sqrt(d))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            chosen = x.sum(dim=1).mul(1e3).long() % self.w.shape[0]  # an expert per row, fixed by the row
            order = torch.argsort(chosen)
            offs = torch.bincount(chosen, minlength=self.w.shape[0]).cumsum(0).to(torch.int32)
            out = torch.empty_like(x)
            out[order] = F.grouped_mm(x[order], self.w.transpose(-2, -1), offs=offs)
            return out

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp, self.experts, self.head = nn.Linear(16, 16), Experts(), nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.experts(torch.relu(self.inp(x)))))

    torch.manual_seed(0)
    model = Net()
    g = torch.Generator().manual_seed(9)
    batches = [(torch.randn(32, 16, generator=g), torch.randint(0, 4, (32,), generator=g)) for _ in range(3)]
    report = gradcheck_cli.analyze(model, batches, steps=3)
    ratios = []
    for x, y in batches:
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x), y), [model.experts.w])
        ratios.append(grad.norm().item() / model.experts.w.norm().item())
    experts = report.layer("experts")
    assert experts.category == "linear" and "experts" in report.update.layers
    assert experts.grad_to_weight == pytest.approx(statistics.median(ratios), rel=1e-5)
