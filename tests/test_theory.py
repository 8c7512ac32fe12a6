"""Signal propagation measured by gradcheck against theory computed in the test (theory.py)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from theory import relu_chi1, tanh_chi1
from torch import nn
from zoo import MLP, orthogonal_linear

import gradcheck_cli


def _batches(width: int) -> list:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(128, width, generator=g), torch.randint(0, 10, (128,), generator=g)) for _ in range(3)]


@pytest.mark.parametrize(("sw2", "sb2"), [(0.5, 0.0), (1.761, 0.05), (2.5, 0.2), (4.0, 0.0)])
def test_deep_tanh_gain_matches_mean_field_sqrt_chi1(sw2: float, sb2: float) -> None:
    """W ~ N(0, sw2/fan_in), b ~ N(0, sb2): consecutive ||dL/dz|| differ by sqrt(chi1) (Schoenholz et al. 2017)."""
    torch.manual_seed(0)
    width = 256
    report = gradcheck_cli.analyze(MLP(nn.Tanh, sw2, sb2, depth=24, width=width), _batches(width))
    expected = math.sqrt(tanh_chi1(sw2, sb2))
    assert report.signal.gain_per_layer == pytest.approx(expected, rel=0.04)
    # and layer by layer in the bulk of the chain: the median consecutive ratio
    norms = [layer.output_grad_norm_median for layer in report.layers if layer.name.startswith("hidden.")]
    ratios = sorted(norms[i] / norms[i + 1] for i in range(len(norms) - 1))
    assert ratios[len(ratios) // 2] == pytest.approx(expected, rel=0.04)


def test_he_relu_is_critical() -> None:
    torch.manual_seed(0)
    report = gradcheck_cli.analyze(MLP(nn.ReLU, 2.0, depth=24, width=256), _batches(256))
    assert report.signal.gain_per_layer == pytest.approx(math.sqrt(relu_chi1(2.0)), rel=0.04)


def test_orthogonal_linear_chain_is_exact() -> None:
    """With W = s * orthogonal, ||dL/dh_l|| = s ||dL/dh_{l+1}|| exactly: no statistics involved."""
    torch.manual_seed(0)
    scale = 1.5
    report = gradcheck_cli.analyze(orthogonal_linear(6, scale), _batches(128))
    norms = [layer.output_grad_norm_median for layer in report.layers][:-1]  # the head is 10 x 128, not square
    for inner, outer in itertools.pairwise(norms):
        assert inner / outer == pytest.approx(scale, rel=1e-4)
    assert report.signal.gain_per_layer == pytest.approx(scale, rel=1e-3)


@pytest.mark.parametrize(("activation", "sw2"), [(nn.Tanh, 3.0), (nn.ReLU, 2 * 0.6**2)])
def test_past_six_depth_scales_a_plain_chain_fails_where_its_weights_gradients_follow(activation, sw2) -> None:
    """Both nets are deep enough for ||dL/dz|| to change by about e^4 = 55x over the chain: 8 depth scales,
    past the ~6 at which a plain network stops training (Schoenholz et al. 2017) and short of the 12 of the
    signal view's error factor. In the chaotic tanh net (chi1 from the mean-field integral) the activations are
    bounded, so each layer's dL/dW = dL/dz x^T spreads as dL/dz does: the input end learns from a signal 55x
    the output end's, an error. ReLU is positively homogeneous (He et al. 2015): at sw2 = 2 x 0.6^2 the forward
    pass shrinks by 0.6 per layer as the backward does, each layer's dL/dW stays level, and the trend stays a
    warning (PyTorch's default init puts every ReLU MLP there, and they train)."""
    torch.manual_seed(0)
    chaotic = activation is nn.Tanh
    gain = math.sqrt(tanh_chi1(sw2, 0.0) if chaotic else relu_chi1(sw2))
    depth = round(4.0 / abs(math.log(gain))) + 1
    report = gradcheck_cli.analyze(MLP(activation, sw2, depth=depth, width=256), _batches(256))
    total = report.signal.total_factor
    assert total is not None and 20 < max(total, 1 / total) < 400
    (trend,) = [f for f in report.findings if f.view == "signal"]
    assert trend.kind == ("exploding" if chaotic else "vanishing")
    if chaotic:
        assert trend.severity == "error" and "trainable depth" in trend.message
        assert report.signal.weight_gradient_gain == pytest.approx(gain, rel=0.05)
    else:
        assert trend.severity == "warning" and report.signal.weight_gradient_gain is None
        assert report.signal.gain_per_layer == pytest.approx(gain, rel=0.05)


def test_an_embedding_before_a_chaotic_chain_does_not_hide_it() -> None:
    """The chaotic tanh chain of the test above read from an nn.Embedding (its N(0, 1) rows are the unit-RMS
    inputs of the mean-field setting): the embedding reads indices, so its input has no RMS and it is left out
    of the weight-gradient fit, not a reason to skip it. Theory as above: about e^4 over the chain, an error."""

    class Tokens(nn.Module):
        def __init__(self, depth: int) -> None:
            super().__init__()
            self.embed = nn.Embedding(50, 256)
            self.chain = MLP(nn.Tanh, 3.0, depth=depth, width=256)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.chain(self.embed(tokens))

    torch.manual_seed(0)
    gain = math.sqrt(tanh_chi1(3.0, 0.0))
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 50, (128,), generator=g), torch.randint(0, 10, (128,), generator=g)) for _ in range(3)]
    report = gradcheck_cli.analyze(Tokens(round(4.0 / math.log(gain)) + 1), batches)
    assert "embed" in report.signal.chain
    (trend,) = [f for f in report.findings if f.view == "signal"]
    assert trend.kind == "exploding" and trend.severity == "error"
    assert report.signal.weight_gradient_gain == pytest.approx(gain, rel=0.05)


class ShiftedBatchNormCNN(nn.Module):
    """conv-BN-ReLU three times, every BN bias at `shift`: BatchNorm standardises each channel over the batch,
    so the ReLU after it is active where N(0, 1) > -shift, a fraction 1 - Phi(-shift) of the positions."""

    def __init__(self, shift: float) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            *(
                nn.Sequential(nn.Conv2d(c, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
                for c in (3, 32, 32)
            )
        )
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.bias.fill_(shift)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x).mean((2, 3)))


def _normal_tail(z: float) -> float:
    return 0.5 * math.erfc(z / math.sqrt(2))


@pytest.mark.parametrize(("shift", "severity"), [(0.0, None), (-2.0, "warning"), (-3.0, "error")])
def test_nearly_dead_relus_behind_a_shifted_batchnorm_are_found_though_no_unit_is_dead(shift, severity) -> None:
    """The first convolution maps Gaussian images linearly, so what its BN standardises is Gaussian and the
    ReLU after it is active for exactly 1 - Phi(-b) of the positions: 50% at b = 0, 2.3% at -2 (below the 5%
    that warns), 0.13% at -3 (below the 1% that is an error). Every one of the 32 channels still fires at some
    of its 16 x 16 x 16 positions, so no unit is dead in the never-active sense; what the next convolution reads
    is almost all exact zeros, and that is the finding, on it (not on the first, which reads the images)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 3, 16, 16, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(3)]
    report = gradcheck_cli.analyze(ShiftedBatchNormCNN(shift), batches)
    active = _normal_tail(-shift)
    zeros = report.layer("blocks.1.0").input_zero_fraction
    # 8192 sampled values: a binomial spread of at most 0.6% at p = 1/2, 0.04% at p = 0.13%
    assert zeros == pytest.approx(1 - active, abs=max(0.02, 4 * math.sqrt(active * (1 - active) / 8192)))
    assert all(report.layer(n).dead_fraction == 0.0 for n in ("blocks.0.1", "blocks.1.1", "blocks.2.1"))
    found = {name: f.severity for f in report.findings if f.kind == "dead" for name in (f.layer, *f.also)}
    assert found.get("blocks.1.0") == severity
    assert "blocks.0.0" not in found
    assert bool(found) == (severity is not None)
    assert bool(report.failing()) == (severity == "error")


def test_sparse_data_is_not_a_nearly_dead_activation() -> None:
    """A first layer reading 99.5%-zero features (bag-of-words counts) reads data, not a dead activation."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(3):
        x = torch.randn(64, 2000, generator=g) * (torch.rand(64, 2000, generator=g) < 0.005)
        batches.append((x, torch.randint(0, 10, (64,), generator=g)))
    model = nn.Sequential(nn.Linear(2000, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    report = gradcheck_cli.analyze(model, batches)
    assert report.layer("0").input_zero_fraction > 0.99
    assert not [f for f in report.findings if f.kind == "dead"]
