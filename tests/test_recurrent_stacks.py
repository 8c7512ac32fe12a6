"""Recurrent layers stacked one on another as separate nn.LSTM modules, each its own row."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import gradcheck_cli

VOCAB, WIDTH, STEPS, BATCH = 50, 32, 24, 8


class Stack(nn.Module):
    """Embedding -> `layers` separate nn.LSTM modules -> head, the loss at every step (a language model)."""

    def __init__(self, layers: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.rnns = nn.ModuleList(nn.LSTM(WIDTH, WIDTH, batch_first=True) for _ in range(layers))
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for rnn in self.rnns:
            x = rnn(x)[0]
        return self.head(x)


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (BATCH, STEPS + 1), generator=generator)
    return [(ids[:, :-1], ids[:, 1:])]


def lm_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.flatten(0, 1), target.flatten())


def test_six_default_lstms_lag_their_peers_only_by_their_gates_and_pass() -> None:
    """At PyTorch's default init each LSTM's gates sit at sigmoid(0): x1/4 on the gradient reaching its input
    (the signal view's neutral_gate_gain), so the bottom of six learns 0.25^2.5 ~ 1/32 slower than their median
    under SGD by design. Read against the bare median it was a warning in two of these six draws."""
    for seed in range(6):
        torch.manual_seed(seed)
        report = gradcheck_cli.analyze(Stack(6), batches(), lm_loss)
        assert report.findings == [], seed
