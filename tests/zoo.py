"""A zoo of models whose gradient health is known from theory, not from gradcheck's output.

Each entry says what theory predicts and why (mean-field chi1: Poole et al. 2016, Schoenholz et al. 2017;
He et al. 2015; Glorot & Bengio 2010; residual/normalised architectures as trained in practice). Models are
small so the whole zoo runs in seconds on a CPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from theory import relu_chi1, sigmoid_chi1, tanh_chi1
from torch import nn

WIDTH = 128
DEPTH = 20
BATCH = 64


class MLP(nn.Module):
    """Fully connected net, W ~ N(0, sw2/fan_in), b ~ N(0, sb2): the mean-field setting."""

    def __init__(
        self,
        activation: Callable[[], nn.Module],
        sw2: float,
        sb2: float = 0.0,
        depth: int = DEPTH,
        width: int = WIDTH,
        classes: int = 10,
        bias_shift: float = 0.0,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(depth):
            linear = nn.Linear(width, width)
            layers += [linear, activation()]
        self.hidden = nn.Sequential(*layers)
        self.head = nn.Linear(width, classes)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, math.sqrt(sw2 / module.in_features))
                if sb2 > 0:
                    nn.init.normal_(module.bias, 0.0, math.sqrt(sb2))
                else:
                    nn.init.zeros_(module.bias)
        with torch.no_grad():
            for module in self.hidden:
                if isinstance(module, nn.Linear):
                    module.bias += bias_shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(x))


def mlp_batches(width: int = WIDTH, classes: int = 10, count: int = 3, seed: int = 0) -> list[tuple]:
    """Standardised Gaussian inputs (mean 0, variance 1 per feature) and uniform class labels."""
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(BATCH, width, generator=generator),
            torch.randint(0, classes, (BATCH,), generator=generator),
        )
        for _ in range(count)
    ]


# -- ResNet with BatchNorm (torchvision's BasicBlock, written out) ------------------------------------------


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """ResNet-18 layout (2-2-2-2 BasicBlocks) with torchvision's init, narrowed for CPU tests."""

    def __init__(self, width: int = 16, blocks: tuple[int, ...] = (2, 2, 2, 2), classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        stages = []
        inplanes = width
        for i, count in enumerate(blocks):
            planes = width * 2**i
            stage = [BasicBlock(inplanes, planes, 1 if i == 0 else 2)]
            stage += [BasicBlock(planes, planes) for _ in range(count - 1)]
            stages.append(nn.Sequential(*stage))
            inplanes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def image_batches(count: int = 3, seed: int = 0, size: int = 16) -> list[tuple]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(16, 3, size, size, generator=generator),
            torch.randint(0, 10, (16,), generator=generator),
        )
        for _ in range(count)
    ]


# -- language models ---------------------------------------------------------------------------------------


class PreLNTransformerLM(nn.Module):
    """GPT-style pre-LN transformer LM built from nn.TransformerEncoder (norm_first=True), causal mask."""

    def __init__(
        self,
        vocab: int = 512,
        d_model: int = 64,
        heads: int = 4,
        layers: int = 4,
        context: int = 32,
        tie: bool = False,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.position = nn.Parameter(torch.randn(1, context, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(
            d_model, heads, 4 * d_model, dropout=0.1, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        nn.init.normal_(self.embed.weight, 0.0, 0.02)
        if tie:
            self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        length = ids.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(length)
        x = self.embed(ids) + self.position[:, :length]
        return self.head(self.norm(self.encoder(x, mask=mask, is_causal=True)))


class LSTMLM(nn.Module):
    """Word-level LSTM LM (as in PyTorch's word_language_model example) with a large vocabulary."""

    def __init__(
        self, vocab: int = 20000, embed: int = 64, hidden: int = 128, layers: int = 2, tie: bool = False
    ) -> None:
        super().__init__()
        self.encoder = nn.Embedding(vocab, embed if not tie else hidden)
        self.rnn = nn.LSTM(embed if not tie else hidden, hidden, layers, batch_first=True, dropout=0.2)
        self.decoder = nn.Linear(hidden, vocab)
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
        if tie:
            self.decoder.weight = self.encoder.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        output, _ = self.rnn(self.encoder(ids))
        return self.decoder(output)


def token_batches(vocab: int, count: int = 3, seed: int = 0, batch: int = 16, length: int = 32) -> list[tuple]:
    """Next-token prediction on random ids: inputs ids[:, :-1], targets ids[:, 1:]."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(0, vocab, (batch, length + 1), generator=generator)
        out.append((ids[:, :-1], ids[:, 1:]))
    return out


class Bottleneck(nn.Module):
    """The ResNet-50 block: 1x1 reduce, 3x3, 1x1 expand (x4), BatchNorm after each, identity or projection."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes * 4:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet50(nn.Module):
    """ResNet-50 layout (3-4-6-3 bottlenecks, 7x7 stem, max-pool), kaiming fan_out init, narrowed for CPU."""

    def __init__(self, width: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 7, 2, 3, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
        blocks: list[nn.Module] = []
        inplanes = width
        for stage, count in enumerate((3, 4, 6, 3)):
            planes = width * 2**stage
            for i in range(count):
                blocks.append(Bottleneck(inplanes, planes, 2 if i == 0 and stage > 0 else 1))
                inplanes = planes * 4
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(inplanes, classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1))


class BatchNormMLP(nn.Module):
    """Linear -> BatchNorm -> ReLU, repeated, no skip connections (Yang et al. 2019)."""

    def __init__(self, depth: int = 40, width: int = WIDTH) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class GPTLayerNorm(nn.Module):
    """A model's own LayerNorm class (as nanoGPT and model-hub code define them), not nn.LayerNorm."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, None, 1e-5)


class GPTBlock(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = GPTLayerNorm(width), GPTLayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.attn_proj = nn.Linear(width, width, bias=False)
        self.fc = nn.Linear(width, 4 * width, bias=False)
        self.mlp_proj = nn.Linear(4 * width, width, bias=False)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (
            z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in self.qkv(self.ln_1(x)).split(c, 2)
        )
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
        x = x + self.attn_proj(y)
        return x + self.mlp_proj(F.gelu(self.fc(self.ln_2(x))))


class GPT2Style(nn.Module):
    """GPT-2's recipe: weights N(0, 0.02), residual projections N(0, 0.02 / sqrt(2 * blocks)), tied input and
    output embeddings, pre-LN with a custom LayerNorm class."""

    def __init__(self, vocab: int = 256, width: int = 96, blocks: int = 6, heads: int = 4, context: int = 32) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, width)
        self.wpe = nn.Embedding(context, width)
        self.h = nn.ModuleList([GPTBlock(width, heads) for _ in range(blocks)])
        self.ln_f = GPTLayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.wte.weight = self.lm_head.weight
        for name, param in self.named_parameters():
            if param.dim() == 2:
                std = 0.02 / math.sqrt(2 * blocks) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(param, 0.0, std)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1]))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class FrozenBackbone(nn.Module):
    """A ResNet backbone with requires_grad False and a trainable linear head (fine-tuning)."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = ResNet(width=8, blocks=(1, 1, 1, 1))
        self.backbone.fc = nn.Identity()
        for param in self.backbone.parameters():
            param.requires_grad_(False)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


# -- broken on purpose --------------------------------------------------------------------------------------


class LogOfNegative(nn.Module):
    """Produces NaN in the forward: log of a value that goes negative."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x)


class NaNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(32, 64)
        self.bad = LogOfNegative()
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.bad(self.fc1(x)))


class LearnedSqrtScale(nn.Module):
    """Finite forward, NaN backward: y = sqrt(scale * relu(x)). Where relu(x) = 0 exactly (half the units),
    d y / d scale = relu(x) / (2 sqrt(scale * relu(x))) = 0 / 0."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(self.scale * F.relu(x))


class BackwardNaNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(32, 64)
        self.root = LearnedSqrtScale()
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.root(self.fc1(x)))


def orthogonal_linear(depth: int, scale: float, width: int = WIDTH) -> nn.Module:
    """Deep linear net with W = scale * orthogonal: ||dL/dh_l|| = scale^(L-l) ||dL/dh_L||, while ||dL/dW_l|| is
    the same in every layer (RESEARCH: only activation gradients show the profile)."""
    layers = []
    for _ in range(depth):
        linear = nn.Linear(width, width, bias=False)
        nn.init.orthogonal_(linear.weight, gain=scale)
        layers.append(linear)
    head = nn.Linear(width, 10, bias=False)
    nn.init.orthogonal_(head.weight, gain=scale)
    return nn.Sequential(*layers, head)


@dataclass(frozen=True)
class Case:
    """A zoo model, its data, what theory says and why."""

    name: str
    build: Callable[[], nn.Module]
    batches: Callable[[], list]
    healthy: bool
    expect: tuple[str, ...]  # finding kinds theory predicts (for broken models)
    why: str


def cases() -> list[Case]:
    crit_sw2, crit_sb2 = 1.761, 0.05
    return [
        Case(
            "he-relu-mlp",
            lambda: MLP(nn.ReLU, 2.0),
            mlp_batches,
            True,
            (),
            f"He init: chi1 = sw2/2 = {relu_chi1(2.0):.2f}, critical",
        ),
        Case(
            "he-relu-mlp-deep-narrow",
            lambda: MLP(nn.ReLU, 2.0, depth=30, width=96),
            lambda: mlp_batches(96),
            True,
            (),
            "He init at depth 30: critical; finite-width fluctuations only",
        ),
        Case(
            "critical-tanh",
            lambda: MLP(nn.Tanh, crit_sw2, crit_sb2),
            mlp_batches,
            True,
            (),
            f"tanh at (sw2, sb2) = ({crit_sw2}, {crit_sb2}): chi1 = {tanh_chi1(crit_sw2, crit_sb2):.3f}, critical",
        ),
        Case("resnet18-bn", ResNet, image_batches, True, (), "residual + BatchNorm, torchvision init"),
        Case(
            "resnet50-bn",
            ResNet50,
            lambda: image_batches(size=32),
            True,
            (),
            "bottleneck ResNet with BatchNorm: every conv is scale-invariant",
        ),
        Case(
            "pre-ln-transformer",
            PreLNTransformerLM,
            lambda: token_batches(512),
            True,
            (),
            "pre-LN keeps gradients flat over depth (Xiong et al. 2020)",
        ),
        Case(
            "gpt2-style",
            GPT2Style,
            lambda: token_batches(256),
            True,
            (),
            "GPT-2 init: scaled residual projections and near-uniform attention make roles differ by design",
        ),
        Case(
            "lstm-lm-20k",
            LSTMLM,
            lambda: token_batches(20000),
            True,
            (),
            "word-level LSTM LM, 20k vocabulary: sparse embedding gradients are expected",
        ),
        Case(
            "frozen-backbone",
            FrozenBackbone,
            image_batches,
            True,
            (),
            "frozen layers get no gradient by design",
        ),
        Case(
            "tied-transformer",
            lambda: PreLNTransformerLM(tie=True),
            lambda: token_batches(512),
            True,
            (),
            "input and output embeddings share one tensor",
        ),
        Case(
            "tied-lstm",
            lambda: LSTMLM(vocab=5000, tie=True),
            lambda: token_batches(5000),
            True,
            (),
            "tied LSTM LM (Press & Wolf 2017)",
        ),
        Case(
            "ordered-tanh",
            lambda: MLP(nn.Tanh, 0.5),
            mlp_batches,
            False,
            ("vanishing",),
            f"tanh sw2 = 0.5: chi1 = {tanh_chi1(0.5, 0.0):.2f} < 1, ordered phase; depth scale "
            f"{-1 / math.log(tanh_chi1(0.5, 0.0)):.1f} layers << {DEPTH}",
        ),
        Case(
            "chaotic-tanh",
            lambda: MLP(nn.Tanh, 6.0, depth=30),
            mlp_batches,
            False,
            ("exploding",),
            f"tanh sw2 = 6: chi1 = {tanh_chi1(6.0, 0.0):.2f} > 1, chaotic phase; x{tanh_chi1(6.0, 0.0) ** 14.5:.0f} "
            "over 30 layers",
        ),
        Case(
            "glorot-sigmoid",
            lambda: MLP(nn.Sigmoid, 1.0, depth=10),
            mlp_batches,
            False,
            ("vanishing",),
            f"sigmoid with Glorot scale (sw2 = 1): chi1 = {sigmoid_chi1(1.0, 0.0):.3f}, deep in the ordered phase",
        ),
        Case(
            "relu-4x-he",
            lambda: MLP(nn.ReLU, 32.0, depth=6),
            mlp_batches,
            False,
            ("exploding",),
            f"ReLU at 16x He variance: chi1 = {relu_chi1(32.0):.0f}, gradients x4 per layer",
        ),
        Case(
            "linear-orthogonal-3x",
            lambda: orthogonal_linear(8, 3.0),
            mlp_batches,
            False,
            ("exploding",),
            "W = 3 * orthogonal: dL/dh grows 3x per layer toward the input, weight gradients flat",
        ),
        Case(
            "dead-relu",
            lambda: MLP(nn.ReLU, 2.0, depth=6, bias_shift=-4.0),
            mlp_batches,
            False,
            ("dead",),
            "biases -4: layer 1's pre-activations have std sqrt(2), so P(active) = Phi(-2.8) = 0.002; deeper layers "
            "get ~0 input, pre-activation -4, and never activate",
        ),
        Case(
            "batchnorm-mlp",
            BatchNormMLP,
            mlp_batches,
            False,
            ("exploding",),
            "plain BatchNorm-ReLU MLP, 40 layers: gradients explode at sqrt(pi/(pi-1)) = 1.21 per layer "
            "(Yang et al. 2019), x1.21^39 ~ 1700",
        ),
        Case("nan-forward", NaNNet, lambda: mlp_batches(32), False, ("nan",), "log of negative pre-activations"),
        Case(
            "nan-backward",
            BackwardNaNNet,
            lambda: mlp_batches(32),
            False,
            ("nan",),
            "sqrt at exactly 0: 0/0 in the backward of a learned scale",
        ),
    ]


def verdict_table() -> str:
    """The zoo's verdicts as a Markdown table: `python tests/zoo.py` (what the closing notes and README cite)."""
    import gradcheck_cli

    lines = [
        "| model | theory | verdict | signal gain | findings (error-level kinds) |",
        "|---|---|---|---:|---|",
    ]
    for case in cases():
        torch.manual_seed(0)
        report = gradcheck_cli.analyze(case.build(), case.batches())
        errors = sorted({f"{f.kind}/{f.view}" for f in report.findings if f.severity == "error"})
        warnings = len([f for f in report.findings if f.severity == "warning"])
        gain = report.signal.gain_per_layer
        verdict = "clean" if not report.findings else ("FAIL" if report.failing() else "warnings")
        lines.append(
            f"| {case.name} | {'healthy' if case.healthy else 'broken: ' + ', '.join(case.expect)}; {case.why} | "
            f"{verdict} | {'-' if gain is None else f'{gain:.3f}'} | "
            f"{', '.join(errors) or '-'}{f' (+{warnings} warnings)' if warnings else ''} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore")
    print(verdict_table())
