"""Hand-written recurrent cells: a gated recurrence is told from a plain one by its forward, not its names."""

from __future__ import annotations

import math

import pytest
import torch
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
