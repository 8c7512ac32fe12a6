"""Hand-written recurrent cells: a gated recurrence is told from a plain one by its forward, not its names."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradcheck_cli


class Loop(nn.Module):
    """h_{t+1} from x_t and h_t by two nn.Linear layers; `step` says how (the cell's own arithmetic)."""

    def __init__(self, step: str, hidden: int = 32) -> None:
        super().__init__()
        self.step, self.hidden = step, hidden
        self.a = nn.Linear(8, 2 * hidden)
        self.b = nn.Linear(hidden, 2 * hidden)
        self.head = nn.Linear(hidden, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.new_zeros(x.shape[0], self.hidden)
        for t in range(x.shape[1]):
            u, v = (self.a(x[:, t]) + self.b(h)).chunk(2, dim=1)
            if self.step == "tanh":  # a plain RNN
                h = torch.tanh(u + v)
            elif self.step == "sigmoid":  # a plain RNN with a sigmoid: no product, no gate
                h = torch.sigmoid(u) + torch.sigmoid(v)
            elif self.step == "gated":  # a minimal gated unit: the state is a sigmoid times a candidate
                z = torch.sigmoid(u)
                h = z * h + (1 - z) * torch.tanh(v)
            else:  # "readout": a sigmoid product only after the loop, never read by the recurrence
                h = torch.tanh(u + v)
        if self.step == "readout":
            h = torch.sigmoid(h) * h
        return self.head(h)


@pytest.mark.parametrize(("step", "gated"), [("tanh", False), ("sigmoid", False), ("readout", False), ("gated", True)])
def test_a_loop_is_gated_when_a_sigmoid_product_of_its_layers_is_what_the_next_step_reads(
    step: str, gated: bool
) -> None:
    torch.manual_seed(0)
    batches = [(torch.randn(4, 12, 8), torch.randint(0, 4, (4,)))]
    report = gradcheck_cli.analyze(Loop(step), batches)
    looped = {layer.name: layer for layer in report.layers if layer.name in ("a", "b")}
    assert all(layer.time_grad_norms and len(layer.time_grad_norms) == 12 for layer in looped.values())
    assert {name: layer.time_gated for name, layer in looped.items()} == {"a": gated, "b": gated}
    assert not next(layer for layer in report.layers if layer.name == "head").time_gated


class Unrolled(nn.Module):
    """One tanh block called 12 times. `reads`: "steps", a recurrence over time (each call reads x_t, as Loop);
    "once", the block applied again to its own result after reading the batch once (ALBERT's shared layer,
    a weight-tied refinement): its calls are depth, not time; "repeated", a recurrence fed the same input at
    every step (a decoder conditioned on one context vector): it reads no new part of the batch either."""

    def __init__(self, reads: str, hidden: int = 32) -> None:
        super().__init__()
        self.reads = reads
        self.a = nn.Linear(8, hidden)
        self.b = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x[:, 0])) if self.reads != "steps" else x.new_zeros(x.shape[0], self.b.in_features)
        for t in range(x.shape[1]):
            if self.reads == "steps":
                h = torch.tanh(self.a(x[:, t]) + self.b(h))
            else:
                h = h + torch.tanh(self.b(h)) if self.reads == "once" else torch.tanh(self.b(h) + x[:, 0, :1])
        return self.head(h)


@pytest.mark.parametrize(("reads", "in_time"), [("steps", True), ("once", False), ("repeated", False)])
def test_a_loop_runs_through_time_only_when_its_calls_read_the_sequence_step_by_step(reads: str, in_time: bool) -> None:
    """loops.py: all three call `b` 12 times and get its 12 per-call norms; only the one reading x_t is a
    recurrence over time, the others are loops over depth, judged as one block. The constant-input recurrence
    contracts (tanh, b at PyTorch's default init: spectral radius about 1/sqrt(3), so at most x0.58 per call,
    below 1/400 over 11 calls) and fails through its calls all the same."""
    torch.manual_seed(0)
    batches = [(torch.randn(4, 12, 8), torch.randint(0, 4, (4,)))]
    report = gradcheck_cli.analyze(Unrolled(reads), batches)
    block = next(layer for layer in report.layers if layer.name == "b")
    assert block.calls == 12 and block.time_grad_norms is not None and len(block.time_grad_norms) == 12
    assert block.loop_over_depth is not in_time
    if reads == "repeated":
        finding = next(f for f in report.findings if f.view == "time")
        assert (finding.layer, finding.kind, finding.severity) == ("b", "vanishing", "error")
        assert "applied 12 times" in finding.message and finding.factor is not None and finding.factor < 1 / 400


class SharedBetweenBlocks(nn.Module):
    """One residual layer shared by 12 distinct blocks, applied before each (timm's CoaT shares a convolutional
    position encoder among a stage's blocks): x <- B_k(x + S x). Every B_k is 0.5 x an orthogonal matrix, so
    going toward the input the gradient halves exactly at each block; S is 0.02 x orthogonal, so its own
    Jacobian I + S changes a gradient's norm by at most 2% a call."""

    def __init__(self, width: int = 32, blocks: int = 12) -> None:
        super().__init__()
        self.inp = nn.Linear(8, width)
        self.shared = nn.Linear(width, width, bias=False)
        self.blocks = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(blocks))
        self.head = nn.Linear(width, 4)
        with torch.no_grad():
            nn.init.orthogonal_(self.shared.weight).mul_(0.02)
            for block in self.blocks:
                nn.init.orthogonal_(block.weight).mul_(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x[:, 0])
        for block in self.blocks:
            h = block(h + self.shared(h))
        return self.head(h)


def test_a_layer_shared_by_distinct_blocks_is_not_a_loop_over_depth() -> None:
    """The shared layer's 12 calls see the gradient halve at each call, but the halving is the distinct blocks'
    (0.5 x orthogonal, exact), not its own: it is no block applied again to its own result, and judging its
    calls as one would blame it (before: `vanishing [time]`, 12 applications, 2048x, on `shared`). The signal
    view, whose chain holds the blocks, reads their x0.5 per block and flags it there."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 12, 8, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(2)]
    report = gradcheck_cli.analyze(SharedBetweenBlocks(), batches, steps=2)
    shared = next(layer for layer in report.layers if layer.name == "shared")
    assert shared.calls == 12 and not shared.loop_over_depth and shared.time_grad_norms is None
    assert not [f for f in report.findings if f.view == "time"]
    assert report.signal.gain_per_layer == pytest.approx(0.5, rel=0.05)
    trend = next(f for f in report.findings if f.view == "signal")
    assert trend.kind == "vanishing" and trend.severity == "error" and "blocks.0" in trend.also


class Cell(nn.Module):
    """A cell written as one module that owns its matrices (`x @ self.W_ih + h @ self.W_hh`), its gating in its own
    forward and the state it returns: an LSTM cell (PyTorch's init, U(-1/sqrt(n), 1/sqrt(n))), the same with its
    forget gate held closed (bias -6), or a plain tanh RNN."""

    def __init__(self, kind: str, n_in: int = 8, hidden: int = 32) -> None:
        super().__init__()
        self.kind, bound = kind, 1 / math.sqrt(hidden)
        gates = 1 if kind == "tanh" else 4
        self.W_ih = nn.Parameter(torch.empty(n_in, gates * hidden).uniform_(-bound, bound))
        self.W_hh = nn.Parameter(torch.empty(hidden, gates * hidden).uniform_(-bound, bound))
        self.b = nn.Parameter(torch.zeros(gates * hidden))
        if kind == "closed":
            with torch.no_grad():
                self.b[hidden : 2 * hidden] = -6.0

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        h, c = state
        z = x @ self.W_ih + h @ self.W_hh + self.b
        if self.kind == "tanh":
            h = torch.tanh(z)
            return h, h
        i, f, g, o = z.chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c


class CellNet(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.cell = Cell(kind)
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.new_zeros(x.shape[0], 32)
        state = (h, h)
        for t in range(x.shape[1]):
            state = self.cell(x[:, t], state)
        return self.head(state[0])


@pytest.mark.parametrize("kind", ["lstm", "closed", "tanh"])
def test_a_cell_that_owns_its_matrices_is_gated_by_what_its_own_forward_does(kind: str) -> None:
    """Gers et al. 2000: the cell state's gradient is scaled by the forget gate each step. At PyTorch's init the
    gates sit near sigmoid(0) = 1/2, a decay by design (diagnose/time.py), not a finding; with the forget gate's
    bias at -6 (sigmoid = 0.0025) the memory is shut: vanishing through time, an error. Before, the cell was seen
    as a plain recurrence (its gates are inside the looped module) and the stock LSTM failed."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(16, 30, 8, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(2)]
    report = gradcheck_cli.analyze(CellNet(kind), batches, steps=2)
    cell = next(layer for layer in report.layers if layer.name == "cell")
    assert cell.time_grad_norms is not None and len(cell.time_grad_norms) == 30
    assert cell.time_gated == (kind != "tanh")
    time = [f for f in report.findings if f.view == "time"]
    if kind == "lstm":
        assert time == []
    elif kind == "closed":
        assert [(f.layer, f.kind, f.severity) for f in time] == [("cell", "vanishing", "error")]


class TanhGELU(nn.Module):
    """GELU's tanh approximation composed from elementary ops, as transformers' NewGELUActivation writes it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class Swish(nn.Module):
    """x * sigmoid(x), as timm writes it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


class HalfStarved(nn.Module):
    """Two layers, each followed by `act`: in the first, 48 of 64 units have zero weights and a bias of -9, deep
    in the flat tail of every activation measured (GELU's derivative there is ~1e-17 of its peak, SiLU's 1e-3);
    the other 16 are default-initialised and active. So exactly 3/4 of the units are dead, a count that chance
    leaves with probability 3e-5 (Binomial(64, 1/2)): a warning (dead_warning 0.5, dead_error 0.9)."""

    def __init__(self, act: str) -> None:
        super().__init__()
        self.act = act
        self.fc1, self.fc2, self.head = nn.Linear(16, 64), nn.Linear(64, 64), nn.Linear(64, 4)
        modules = {"nn.GELU": nn.GELU(), "nn.SiLU": nn.SiLU(), "my.TanhGELU": TanhGELU(), "my.Swish": Swish()}
        self.module = modules.get(act)
        with torch.no_grad():
            self.fc1.weight[:48] = 0.0
            self.fc1.bias[:48] = -9.0

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        if self.module is not None:
            return self.module(x)
        return torch.nn.functional.gelu(x) if self.act == "F.gelu" else torch.nn.functional.mish(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.activation(self.fc2(self.activation(self.fc1(x)))))


@pytest.mark.parametrize("act", ["nn.GELU", "nn.SiLU", "F.gelu", "F.mish", "my.TanhGELU", "my.Swish"])
def test_units_in_an_activations_flat_tail_are_dead_whatever_form_it_takes(act: str) -> None:
    """At -9 the tanh GELU's tanh is -1 in float32 (derivative 0) and Swish's derivative is -1.1e-3 (0.1% of its
    peak 1.1): both as flat as the built-in functions, though no single call names them."""
    torch.manual_seed(0)
    batches = [(torch.randn(32, 16), torch.randint(0, 4, (32,)))]
    report = gradcheck_cli.analyze(HalfStarved(act), batches)
    fc1, fc2 = (next(layer for layer in report.layers if layer.name == name) for name in ("fc1", "fc2"))
    source, name = act.split(".")
    name = name if source == "my" else name.lower()
    assert (fc1.dead_fraction, fc1.units, fc1.flat_activation) == (0.75, 64, name)
    assert fc2.flat_activation is None  # every unit leaves the flat region somewhere
    assert [(f.layer, f.kind, f.severity) for f in report.findings if f.view == "activation"] == [
        ("fc1", "dead", "warning")
    ]


class StarvedKernels(nn.Module):
    """HalfStarved's first layer as a convolution whose kernel no torch module holds: 12 of its 16 output channels
    have zero kernels and a bias of -9 (GELU's flat tail), the other 4 He-initialised. `bare`: the kernel and
    bias in an nn.ParameterList; else a module of its own that holds `self.kernel`. Units are channels (dim 1)."""

    def __init__(self, bare: bool) -> None:
        super().__init__()
        kernel = torch.randn(16, 3, 3, 3) * math.sqrt(2 / 27)
        kernel[:12] = 0.0
        bias = torch.zeros(16)
        bias[:12] = -9.0
        if bare:
            self.params = nn.ParameterList([nn.Parameter(kernel), nn.Parameter(bias)])
        else:
            self.conv = _Kernel(kernel, bias)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.conv(x) if hasattr(self, "conv") else F.conv2d(x, self.params[0], self.params[1], padding=1)
        return self.head(F.gelu(z).mean(dim=(2, 3)))


class _Kernel(nn.Module):
    def __init__(self, kernel: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.kernel, self.shift = nn.Parameter(kernel), nn.Parameter(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.kernel, self.shift, padding=1)


@pytest.mark.parametrize("bare", [True, False])
def test_a_kernel_applied_by_conv2d_has_its_units_along_channels(bare: bool) -> None:
    """The kind a matrix was applied as decides its units for the flat-activation count too: 12 of 16 channels
    dead (before, its units were read along the image's width, none of them flat)."""
    torch.manual_seed(0)
    batches = [(torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,)))]
    report = gradcheck_cli.analyze(StarvedKernels(bare), batches)
    layer = report.layer("params.0" if bare else "conv")
    assert layer.category == "conv"
    assert (layer.dead_fraction, layer.units, layer.flat_activation) == (0.75, 16, "gelu")


class GatedSiLU(nn.Module):
    """A gated unit that splits its input (silu(a) * b): named like an activation, but not elementwise."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=-1)
        return torch.cat([torch.nn.functional.silu(a) * b, b], dim=-1)


class BatchedGELU(nn.Module):
    """Named like an activation, but its forward reads a batch dimension: it raises on the 1-D probe."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x) * float(x.shape[-2] > 0)


@pytest.mark.parametrize("module", [GatedSiLU, BatchedGELU])
def test_an_activation_module_that_is_not_elementwise_is_not_judged(module: type[nn.Module]) -> None:
    model = HalfStarved("my.Swish")
    model.module = module()
    report = gradcheck_cli.analyze(model, [(torch.randn(32, 16), torch.randint(0, 4, (32,)))])
    assert all(layer.flat_activation is None for layer in report.layers)


def test_softplus_as_a_positivity_transform_is_not_judged() -> None:
    """Mamba-style dt: softplus of a projection whose bias makes the derivative 1e-3 by design."""
    model = HalfStarved("F.gelu")
    model.activation = torch.nn.functional.softplus  # type: ignore[method-assign]
    report = gradcheck_cli.analyze(model, [(torch.randn(32, 16), torch.randint(0, 4, (32,)))])
    assert all(layer.flat_activation is None for layer in report.layers)
