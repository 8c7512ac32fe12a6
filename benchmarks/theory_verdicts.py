"""Models whose verdict theory fixes, beyond the test corpus: each broken one must fail with a kind theory
predicts, each healthy twin must pass without errors. Prints a line per model and a count.

    python benchmarks/theory_verdicts.py [NAME ...]

Labels: mean-field chi1 for MLPs and CNNs (Schoenholz et al. 2017; Glorot & Bengio 2010; He et al. 2015),
Pascanu et al. 2013 for recurrent nets, a neutral gate for LSTMs (Gers et al. 2000), arithmetic for NaN and
all-zero weights. `saturated` is not in the default --fail-on, so a model whose only errors are saturation
exits 0 by design and reads BAD here.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import gradcheck_cli


def mlp(depth: int, width: int, activation: type[nn.Module], std: Callable[[int], float]) -> nn.Module:
    """depth hidden layers, W ~ N(0, std(fan_in)^2), zero biases, a 10-way head; 64 inputs."""
    layers: list[nn.Module] = []
    fan = 64
    for _ in range(depth):
        linear = nn.Linear(fan, width)
        nn.init.normal_(linear.weight, 0.0, std(fan))
        nn.init.zeros_(linear.bias)
        layers += [linear, activation()]
        fan = width
    return nn.Sequential(*layers, nn.Linear(fan, 10))


def vectors(count: int = 3, batch: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, 64, generator=g), torch.randint(0, 10, (batch,), generator=g)) for _ in range(count)]


def images(count: int = 3, batch: int = 8, size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(batch, 3, size, size, generator=g), torch.randint(0, 10, (batch,), generator=g))
        for _ in range(count)
    ]


def sequences(count: int = 3, batch: int = 16, steps: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(batch, steps, 8, generator=g), torch.randint(0, 10, (batch,), generator=g)) for _ in range(count)
    ]


class SigmoidCNN(nn.Module):
    """16 sigmoid convs at PyTorch's default init: sigmoid' <= 1/4 caps the gain per layer far below 1."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(3 if i == 0 else 32, 32, 3, padding=1) for i in range(16)])
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = torch.sigmoid(conv(x))
        return self.head(x.mean((2, 3)))


class DeadReluCNN(nn.Module):
    """c2's biases at -20: no input reaches 0, so c2's units never activate and c1 gets no gradient either."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = (nn.Conv2d(c, 16, 3, padding=1) for c in (3, 16, 16))
        with torch.no_grad():
            self.c2.bias.fill_(-20.0)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.c3(F.relu(self.c2(F.relu(self.c1(x))))))
        return self.head(x.mean((2, 3)))


class ManyToOne(nn.Module):
    """A recurrent layer read over the whole sequence, classified from its last output."""

    def __init__(self, rnn: nn.RNNBase) -> None:
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(rnn.hidden_size, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


def lstm(closed: bool) -> nn.Module:
    """closed: forget-gate bias -5 (sigmoid(-5) = 0.0067 per step) and W_hh x0.1: the gradient through time
    decays far faster than a neutral gate's 1/2 per step."""
    model = ManyToOne(nn.LSTM(8, 32, batch_first=True))
    if closed:
        with torch.no_grad():
            model.rnn.bias_ih_l0[32:64].fill_(-5.0)
            model.rnn.bias_hh_l0[32:64].zero_()
            model.rnn.weight_hh_l0.mul_(0.1)
    return model


def tanh_chaotic() -> nn.Module:
    """W_hh ~ N(0, 9/H): sigma_w = 3, the chaotic phase; the gradient grows through time."""
    model = ManyToOne(nn.RNN(8, 64, batch_first=True, nonlinearity="tanh"))
    with torch.no_grad():
        nn.init.normal_(model.rnn.weight_hh_l0, 0.0, 3 / 8)
    return model


def relu_exploding() -> nn.Module:
    """W_hh = 1.5 I with ReLU: x1.5 per step wherever units are active."""
    model = ManyToOne(nn.RNN(8, 32, batch_first=True, nonlinearity="relu"))
    with torch.no_grad():
        model.rnn.weight_hh_l0.copy_(1.5 * torch.eye(32))
        model.rnn.bias_hh_l0.zero_()
        model.rnn.bias_ih_l0.fill_(0.1)
    return model


class SqrtNaN(nn.Module):
    """sqrt of negative pre-activations: NaN from the first forward."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.sqrt(self.a(x)))


def zero_weights() -> nn.Module:
    """Every weight and bias 0: the hidden layers get exactly zero gradient (no signal, full symmetry)."""
    model = mlp(4, 64, nn.ReLU, lambda fan: 1.0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
    return model


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], nn.Module]
    batches: Callable[[], list]
    broken: bool
    kinds: frozenset[str] = frozenset()  # any of these, as an error, is the right verdict


CASES = [
    Case(
        "sigmoid-mlp-30-glorot",
        lambda: mlp(30, 128, nn.Sigmoid, lambda f: f**-0.5),
        vectors,
        True,
        frozenset({"vanishing"}),
    ),
    Case(
        "relu-mlp-30-2x-he",
        lambda: mlp(30, 128, nn.ReLU, lambda f: (4 / f) ** 0.5),
        vectors,
        True,
        frozenset({"exploding"}),
    ),
    Case(
        "relu-mlp-30-half-he", lambda: mlp(30, 128, nn.ReLU, lambda f: f**-0.5), vectors, True, frozenset({"vanishing"})
    ),
    Case(
        "tanh-mlp-30-sw2-0.3",
        lambda: mlp(30, 128, nn.Tanh, lambda f: (0.3 / f) ** 0.5),
        vectors,
        True,
        frozenset({"vanishing"}),
    ),
    Case(
        "tanh-mlp-60-sw2-3",
        lambda: mlp(60, 128, nn.Tanh, lambda f: (3 / f) ** 0.5),
        vectors,
        True,
        frozenset({"exploding"}),
    ),
    Case(
        # W ~ N(0, 25) per weight: pre-activations ~N(0, 40^2), 91% saturated; mean field gives chi1 ~5
        "sigmoid-mlp-saturated",
        lambda: mlp(4, 128, nn.Sigmoid, lambda f: 5.0),
        vectors,
        True,
        frozenset({"exploding", "saturated"}),
    ),
    Case("sigmoid-cnn-16", SigmoidCNN, images, True, frozenset({"vanishing"})),
    Case("dead-relu-cnn", DeadReluCNN, images, True, frozenset({"dead"})),
    Case("lstm-forget-closed", lambda: lstm(closed=True), sequences, True, frozenset({"vanishing"})),
    Case("tanh-rnn-chaotic", tanh_chaotic, sequences, True, frozenset({"exploding"})),
    Case("relu-rnn-exploding", relu_exploding, sequences, True, frozenset({"exploding", "nan"})),
    Case("nan-sqrt", SqrtNaN, vectors, True, frozenset({"nan"})),
    Case("zero-weights", zero_weights, vectors, True, frozenset({"dead"})),
    Case("relu-mlp-30-he", lambda: mlp(30, 128, nn.ReLU, lambda f: (2 / f) ** 0.5), vectors, False),
    Case("tanh-mlp-30-critical", lambda: mlp(30, 128, nn.Tanh, lambda f: f**-0.5), vectors, False),
    Case("lstm-default", lambda: lstm(closed=False), sequences, False),
    Case("gru-default", lambda: ManyToOne(nn.GRU(8, 32, batch_first=True)), sequences, False),
]


def main() -> None:
    warnings.filterwarnings("ignore")
    names = sys.argv[1:]
    right = 0
    cases = [case for case in CASES if not names or case.name in names]
    for case in cases:
        torch.manual_seed(0)
        report = gradcheck_cli.analyze(case.build(), case.batches())
        errors = [f for f in report.findings if f.severity == "error"]
        failing = bool(report.failing())
        kinds = {f.kind for f in errors}
        good = (failing and bool(kinds & case.kinds)) if case.broken else (not failing and not errors)
        right += good
        print(
            f"{case.name:24s} {'ok ' if good else 'BAD'} {'FAIL' if failing else 'pass'} "
            f"errors {len(errors):3d} ({', '.join(sorted(kinds)) or '-'}) "
            f"warnings {sum(f.severity == 'warning' for f in report.findings)}"
        )
    print(f"{right} of {len(cases)} verdicts as theory predicts")


if __name__ == "__main__":
    main()
