"""Hand-written recurrent cells: a gated recurrence is told from a plain one by its forward, not its names."""

from __future__ import annotations

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
