"""Depth in the graph, not in the order of calls: layers side by side share one depth (gradcheck_cli/depth.py)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradcheck_cli
from gradcheck_cli.depth import GraphDepth
from gradcheck_cli.render.common import signal_line


class Shapes(nn.Module):
    """Every way a layer can sit in a graph: a chain (a, b), two branches side by side (left, right), a skip
    around two layers (x + d(c(x))), a norm that is not a step of depth, a layer fed by keyword, and a layer
    looped in Python that reads its own output (cell)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 8)
        self.left, self.right = nn.Linear(8, 8), nn.Linear(8, 8)
        self.c, self.d = nn.Linear(8, 8), nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.by_keyword = nn.Linear(8, 8)
        self.cell = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.b(torch.relu(self.a(x)))  # a: 1, b: 2
        h = self.left(h) * self.right(h)  # both 3
        h = h + self.d(torch.tanh(self.c(h)))  # c: 4, d: 5; the sum is as deep as its deepest term
        h = self.norm(h)  # not counted: what reads it is at 6
        h = self.by_keyword(input=h)  # 6
        for _ in range(3):
            h = torch.tanh(self.cell(h))  # 7 at its first call, kept
        return h


EXPECTED = {"a": 1, "b": 2, "left": 3, "right": 3, "c": 4, "d": 5, "norm": 5, "by_keyword": 6, "cell": 7}


def test_each_layer_is_as_deep_as_the_deepest_path_of_layers_behind_it() -> None:
    model = Shapes()
    depth = GraphDepth(name for name in EXPECTED if name != "norm")
    handles = [
        getattr(model, name).register_forward_hook(
            lambda module, args, kwargs, output, name=name: depth.called(name, (args, kwargs), output), with_kwargs=True
        )
        for name in EXPECTED
    ]
    model(torch.randn(2, 4)).sum().backward()
    for handle in handles:
        handle.remove()
    assert depth.depth == EXPECTED


def test_a_deep_chain_is_walked_without_recursion() -> None:
    """5000 layers: deeper than Python's recursion limit, walked iteratively."""
    layers = nn.Sequential(*[nn.Linear(2, 2) for _ in range(5000)])
    depth = GraphDepth(str(i) for i in range(5000))
    for i, layer in enumerate(layers):
        layer.register_forward_hook(lambda module, args, output, name=str(i): depth.called(name, args, output))
    layers(torch.randn(1, 2))
    assert [depth.depth[str(i)] for i in range(5000)] == list(range(1, 5001))


class Experts(nn.Module):
    """A mixture of experts as tutorials write it: top-1 routing, the experts called one after another in a
    Python loop, each a two-layer ReLU MLP, on a residual stream. Four layers deep (in, expert, expert, head)
    however many experts there are. At PyTorch's default init each layer passes back ~x0.4 (weights at 1/3 of
    the He variance: sqrt(1/6)); with He init, x1 (He et al. 2015)."""

    def __init__(self, experts: int = 8, width: int = 64, he: bool = False) -> None:
        super().__init__()
        self.inp = nn.Linear(32, width)
        self.router = nn.Linear(width, experts)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(width, 4 * width), nn.ReLU(), nn.Linear(4 * width, width)) for _ in range(experts)
        )
        self.head = nn.Linear(width, 10)
        for module in self.modules():
            if he and isinstance(module, nn.Linear):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        weights = self.router(h).softmax(-1)
        top = weights.argmax(-1)
        out = torch.zeros_like(h)
        for i, expert in enumerate(self.experts):
            chosen = top == i
            if chosen.any():
                out[chosen] = expert(h[chosen]) * weights[chosen, i : i + 1]
        return self.head(h + out)


@pytest.mark.parametrize("he", [False, True])
def test_experts_side_by_side_are_not_a_deep_chain(he: bool) -> None:
    """Counted in call order, the 16 expert layers made a 19-layer chain, and the default init's per-layer
    gain, measured between each expert's two layers, compounded over 18 steps that no gradient takes: 13
    vanishing errors on a healthy model. In the graph the experts share two depths, so the fitted factor
    spans 3 steps of depth."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(64, 32, generator=generator), torch.randint(0, 10, (64,), generator=generator))]
    report = gradcheck_cli.analyze(Experts(he=he), batches * 3)
    depths = {layer.name: layer.depth for layer in report.layers}
    assert depths["inp"] == 1 and depths["head"] == 4
    called = [i for i in range(8) if depths[f"experts.{i}.0"] is not None]  # routing may skip an expert
    assert len(called) >= 6
    assert {depths[f"experts.{i}.0"] for i in called} == {2} and {depths[f"experts.{i}.2"] for i in called} == {3}
    gain, total = report.signal.gain_per_layer, report.signal.total_factor
    assert gain is not None and total is not None
    assert math.isclose(total, gain**3, rel_tol=1e-9)
    assert f"over {len(report.signal.chain)} layers, 4 deep" in signal_line(report)
    signal = [f"{f.severity} {f.layer}: {f.message}" for f in report.findings if f.view == "signal"]
    assert not [message for message in signal if message.startswith("error")], signal
    if he:
        assert not signal and 0.8 < gain < 1.25, (gain, signal)
