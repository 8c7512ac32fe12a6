"""A corpus of real architectures, built by their own libraries (torchvision, timm, transformers) at their
default initialisation from small configurations, plus broken variants whose verdict theory predicts.

No downloads: every model is built from a config, every batch is made here. The libraries are optional test
dependencies; a case whose library is missing is skipped (CI installs them all, see .ci/run).

Labels come from how these architectures are trained in practice (healthy at default init: they train as
published) or from theory for the broken ones (mean-field chi1, Schoenholz et al. 2017; Pascanu et al. 2013
for recurrent nets), never from gradcheck's output.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

BATCH = 4


def torchvision() -> Any:
    """torchvision's pure-Python models. The registry's wheel is a CUDA build whose compiled ops do not load
    against a CPU torch; gradcheck's hub targets make it importable (the schemas of two ops defined first)."""
    from gradcheck_cli.hub import import_torchvision

    return import_torchvision()


IMAGE_BATCH = 16  # BatchNorm over 4 values per channel (batch 4 at a 1x1 map) is noise, not a network


def images(size: int = 32, classes: int = 10, count: int = 3, seed: int = 0, batch: int = IMAGE_BATCH) -> list[tuple]:
    """Standardised images (what transforms.Normalize gives) and class labels."""
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(batch, 3, size, size, generator=generator),
            torch.randint(0, classes, (batch,), generator=generator),
        )
        for _ in range(count)
    ]


def tokens(vocab: int, length: int = 16, count: int = 3, seed: int = 0, batch: int = BATCH) -> list[dict]:
    """Language-model batches as model-hub models take them: input_ids and labels (the model computes the loss)."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(0, vocab, (batch, length), generator=generator)
        batches.append({"input_ids": ids, "labels": ids.clone()})
    return batches


@dataclass
class Case:
    name: str
    library: str  # the module that must import for this case to run
    build: Callable[[], nn.Module]
    batches: Callable[[], list[Any]]
    healthy: bool
    why: str
    expect: tuple[str, ...] = ()  # error-level kinds theory predicts for a broken case
    settings: dict[str, Any] = field(default_factory=dict)  # analyze() settings the case needs


# -- torchvision ---------------------------------------------------------------------------------------------


def tv_resnet18(zero_init_residual: bool = False) -> nn.Module:
    return torchvision().models.resnet18(num_classes=10, zero_init_residual=zero_init_residual)


def tv_convnext() -> nn.Module:
    convnext = torchvision().models.convnext
    config = convnext.CNBlockConfig
    setting = [config(24, 48, 2), config(48, 96, 2), config(96, 192, 2), config(192, None, 2)]
    return convnext.ConvNeXt(setting, num_classes=10)  # layer_scale 1e-6, as convnext_tiny


def tv_vit() -> nn.Module:
    vit = torchvision().models.vision_transformer
    return vit.VisionTransformer(
        image_size=32, patch_size=8, num_layers=4, num_heads=4, hidden_dim=64, mlp_dim=128, num_classes=10
    )  # heads.head zero-initialised, as vit_b_16


def tv_vgg11() -> nn.Module:
    return torchvision().models.vgg11(num_classes=10)  # no BatchNorm; kaiming fan_out convs, N(0, 0.01) linears


def tv_googlenet() -> nn.Module:
    """Two auxiliary classifiers, returned beside the logits in training mode (Szegedy et al. 2015)."""
    return torchvision().models.googlenet(num_classes=10, aux_logits=True, init_weights=True)


def tv_densenet() -> nn.Module:
    densenet = torchvision().models.densenet
    return densenet.DenseNet(growth_rate=8, block_config=(6, 12, 24, 16), num_init_features=16, num_classes=10)


def tv_mobilenet() -> nn.Module:
    return torchvision().models.mobilenet_v3_small(num_classes=10)


def tv_mobilenet_v2_shifted(shift: float = -3.0) -> nn.Module:
    """MobileNetV2 with every BatchNorm bias at `shift`: BN standardises each channel over the batch, so the
    ReLU6 after it is active where N(0, 1) > -shift, 0.13% of positions at -3 (heavier-tailed deeper in: a
    conv of sparse inputs), yet at thousands of positions per channel every unit fires somewhere: nearly dead,
    no unit dead."""
    model = torchvision().models.mobilenet_v2(num_classes=10)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.bias.fill_(shift)
    return model


def tv_efficientnet() -> nn.Module:
    return torchvision().models.efficientnet_b0(num_classes=10)


def tv_swin() -> nn.Module:
    swin = torchvision().models.swin_transformer
    return swin.SwinTransformer(
        patch_size=[2, 2], embed_dim=24, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4], num_classes=10
    )


# -- timm ------------------------------------------------------------------------------------------------------


def timm_convnext_atto() -> nn.Module:
    torchvision()  # timm imports torchvision: its op schemas first
    import timm

    return timm.create_model("convnext_atto", pretrained=False, num_classes=10)


def timm_edgenext() -> nn.Module:
    """EdgeNeXt: its transposed-attention branch sits behind two LayerScales (1e-6 x 1e-6 at init)."""
    torchvision()
    import timm

    return timm.create_model("edgenext_xx_small", pretrained=False, num_classes=10)


def timm_focalnet() -> nn.Module:
    """FocalNet: two focal levels per block (3x3 then 5x5 depthwise convs, a ModuleList indexed by level, the
    second ~30x below the first in every stage) over four stages whose ||g||/||W|| grows stage by stage."""
    torchvision()
    from timm.models import focalnet

    return focalnet.FocalNet(
        depths=(2, 2, 2, 2), embed_dim=32, focal_levels=(2, 2, 2, 2), focal_windows=(3, 3, 3, 3), num_classes=10
    )


def timm_deit3() -> nn.Module:
    torchvision()  # timm imports torchvision: its op schemas first
    from timm.models import vision_transformer

    # DeiT-III: LayerScale initialised to 1e-6 (Touvron et al. 2022)
    return vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, depth=4, embed_dim=64, num_heads=4, num_classes=10, init_values=1e-6
    )


def timm_cait() -> nn.Module:
    torchvision()  # timm imports torchvision: its op schemas first
    from timm.models import cait

    return cait.Cait(img_size=32, patch_size=8, depth=4, embed_dim=64, num_heads=4, num_classes=10, init_values=1e-5)


def timm_mixer() -> nn.Module:
    torchvision()  # timm imports torchvision: its op schemas first
    from timm.models import mlp_mixer

    return mlp_mixer.MlpMixer(num_classes=10, img_size=32, patch_size=8, num_blocks=4, embed_dim=64)  # zero head


def timm_resnet() -> nn.Module:
    torchvision()  # timm imports torchvision: its op schemas first
    import timm

    return timm.create_model("resnet18", pretrained=False, num_classes=10)


# -- transformers ----------------------------------------------------------------------------------------------


def _before_transformers() -> None:
    """transformers imports torchvision when it is installed: make that import work first (see torchvision)."""
    if importlib.util.find_spec("torchvision") is not None:
        torchvision()


VOCAB = 512


def hf_gpt2() -> nn.Module:
    _before_transformers()
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=4, n_head=4))


def _hf_model(config_class: str, model_class: str, **config: int) -> Callable[[], nn.Module]:
    """A Hugging Face model of `model_class` from `config_class(**config)`, built when called."""

    def build() -> nn.Module:
        _before_transformers()
        import transformers

        return getattr(transformers, model_class)(getattr(transformers, config_class)(**config))

    return build


def _hf_small(config_class: str, model_class: str, layers: int, **settings: int) -> Callable[[], nn.Module]:
    """A masked-LM encoder or a causal LM from a small config (width 64, 4 heads)."""
    return _hf_model(
        config_class,
        model_class,
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
        **settings,
    )


def hf_olmo2(layers: int) -> Callable[[], nn.Module]:
    """OLMo-2: each branch's output is normalised (RMSNorm after attention and MLP) and none of its input, so the
    branches read the raw stream, which starts at the embeddings' 0.02."""
    return _hf_small("Olmo2Config", "Olmo2ForCausalLM", layers, pad_token_id=0, eos_token_id=1, bos_token_id=1)


def hf_bert(layers: int) -> Callable[[], nn.Module]:
    return _hf_small("BertConfig", "BertForMaskedLM", layers)


def hf_llama(layers: int) -> Callable[[], nn.Module]:
    return _hf_small("LlamaConfig", "LlamaForCausalLM", layers, num_key_value_heads=2)


def hf_t5() -> nn.Module:
    _before_transformers()
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, decoder_start_token_id=0
    )
    return T5ForConditionalGeneration(config)


def hf_mamba(layers: int) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        _before_transformers()
        from transformers import MambaConfig, MambaForCausalLM

        return MambaForCausalLM(MambaConfig(vocab_size=VOCAB, hidden_size=64, state_size=8, num_hidden_layers=layers))

    return build


def hf_deberta(layers: int) -> Callable[[], nn.Module]:
    return _hf_small("DebertaV2Config", "DebertaV2ForMaskedLM", layers)


def _hf_image(config_class: str, model_class: str, layers: int) -> Callable[[], nn.Module]:
    """An image classifier from a small config (32 px, patches of 8, width 64)."""
    return _hf_model(
        config_class,
        model_class,
        image_size=32,
        patch_size=8,
        hidden_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=128,
        num_labels=10,
    )


hf_deit_1 = _hf_image("DeiTConfig", "DeiTForImageClassification", 1)
hf_vit = _hf_image("ViTConfig", "ViTForImageClassification", 4)


def hf_images(count: int = 3, seed: int = 0) -> list[dict]:
    return [{"pixel_values": x, "labels": y} for x, y in images(count=count, seed=seed)]


def t5_batches(count: int = 3, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.randint(0, VOCAB, (BATCH, 12), generator=generator),
            "labels": torch.randint(0, VOCAB, (BATCH, 8), generator=generator),
        }
        for _ in range(count)
    ]


# -- recurrent nets (torch) ------------------------------------------------------------------------------------


class RecurrentLM(nn.Module):
    """Embedding -> stacked LSTM or GRU -> linear head over the vocabulary: PyTorch's word_language_model."""

    def __init__(self, cell: type[nn.RNNBase], layers: int = 2, scale: float = 1.0, vocab: int = VOCAB) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 64)
        self.rnn = cell(64, 64, num_layers=layers, batch_first=True)
        self.head = nn.Linear(64, vocab)
        if scale != 1.0:
            with torch.no_grad():
                for name, param in self.rnn.named_parameters():
                    if name.startswith("weight"):
                        param.mul_(scale)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.embed(ids))[0])


def lm_batches(count: int = 3, seed: int = 0) -> list[tuple]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (ids[:, :-1], ids[:, 1:])
        for ids in (torch.randint(0, VOCAB, (BATCH, 17), generator=generator) for _ in range(count))
    ]


class AttentionSeq2Seq(nn.Module):
    """A GRU encoder-decoder with dot-product attention over the encoder states (Luong et al. 2015), as the
    PyTorch translation tutorial writes it: the decoder starts from the encoder's last state and its output is
    read together with the attended context."""

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, hidden)
        self.encoder = nn.GRU(hidden, hidden, batch_first=True)
        self.decoder = nn.GRU(hidden, hidden, batch_first=True)
        self.score = nn.Linear(hidden, hidden)
        self.out = nn.Linear(2 * hidden, VOCAB)

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        states, last = self.encoder(self.embed(source))
        decoded, _ = self.decoder(self.embed(target), last)
        context = torch.softmax(self.score(decoded) @ states.transpose(1, 2), dim=-1) @ states
        return self.out(torch.cat([decoded, context], dim=-1))


def translation_batches(count: int = 3, seed: int = 0) -> list[tuple]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        source = torch.randint(0, VOCAB, (BATCH, 20), generator=generator)
        target = torch.randint(0, VOCAB, (BATCH, 17), generator=generator)
        batches.append(((source, target[:, :-1]), target[:, 1:]))
    return batches


class ManyToOneRNN(nn.Module):
    """A plain RNN that reads a whole sequence and classifies it from its last hidden state."""

    def __init__(self, nonlinearity: str, w_hh: Callable[[int], torch.Tensor], hidden: int = 64) -> None:
        super().__init__()
        self.rnn = nn.RNN(16, hidden, nonlinearity=nonlinearity, batch_first=True)
        self.head = nn.Linear(hidden, 10)
        with torch.no_grad():
            self.rnn.weight_hh_l0.copy_(w_hh(hidden))
            self.rnn.bias_hh_l0.zero_()
            self.rnn.bias_ih_l0.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


def tanh_rnn_contracting() -> nn.Module:
    """||W_hh|| = 0.5 (orthogonal x 0.5): below 1/gamma = 1 for tanh, sufficient for vanishing (Pascanu 2013)."""
    return ManyToOneRNN("tanh", lambda n: 0.5 * nn.init.orthogonal_(torch.empty(n, n)))


def irnn() -> nn.Module:
    """IRNN (Le et al. 2015): ReLU units, W_hh = I, input weights N(0, 0.001): the gradient keeps its size."""
    model = ManyToOneRNN("relu", torch.eye)
    with torch.no_grad():
        model.rnn.weight_ih_l0.normal_(0.0, 0.001)
    return model


class GatedClassifier(nn.Module):
    """nn.LSTM or nn.GRU reading a whole sequence, classified from its last output: a sentiment-classifier
    shape. At PyTorch's default init every gate bias is ~0, so the forget/update gate sits at sigmoid(0) = 1/2
    and the cell's gradient halves per step: by design, since the gates learn to open (Gers et al. 2000).
    forget_bias (LSTM): the forget gate's bias; -5 holds it closed (sigmoid(-5) = 0.0067 per step) and W_hh
    x0.1 caps the path around the cell, so theory gives a decay far faster than x0.5 per step: vanishing."""

    def __init__(self, cell: type[nn.RNNBase], forget_bias: float | None = None) -> None:
        super().__init__()
        self.rnn = cell(16, 64, batch_first=True)
        self.head = nn.Linear(64, 10)
        if forget_bias is not None:
            with torch.no_grad():
                self.rnn.bias_ih_l0[64:128].fill_(forget_bias)  # PyTorch's gate order: input, forget, cell, out
                self.rnn.bias_hh_l0[64:128].zero_()
                self.rnn.weight_hh_l0.mul_(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


class StackedRecurrentLM(nn.Module):
    """Embedding -> separate nn.LSTM/nn.GRU modules one after another (an nn.ModuleList, so every layer is its
    own row) -> linear head. At default init each layer's gates sit at sigmoid(0) = 1/2, which scale the
    gradient reaching its input by 1/4 (LSTM: input x output gate) or 1/2 (GRU: 1 - z): by design, as the
    gates learn to open; 3-4 stacked layers train as published (Sutskever et al. 2014; Wu et al. 2016).
    closed: every layer's input gate (LSTM) held at sigmoid(-6) = 0.0025, or its update gate (GRU) at
    sigmoid(6), so 1 - z = 0.0025: the gradient reaching each layer's input is x0.0025/(neutral 1/4 or 1/2)
    smaller still, x1e-2 per layer past what neutral gates give: vanishing over the stack."""

    def __init__(self, cell: type[nn.RNNBase], layers: int = 3, closed: bool = False, hidden: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, hidden)
        self.rnns = nn.ModuleList(cell(hidden, hidden, batch_first=True) for _ in range(layers))
        self.head = nn.Linear(hidden, VOCAB)
        if closed:
            gate = slice(0, hidden) if cell is nn.LSTM else slice(hidden, 2 * hidden)  # LSTM: i f g o; GRU: r z n
            with torch.no_grad():
                for rnn in self.rnns:
                    rnn.bias_ih_l0[gate].fill_(-6.0 if cell is nn.LSTM else 6.0)
                    rnn.bias_hh_l0[gate].zero_()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for rnn in self.rnns:
            x = rnn(x)[0]
        return self.head(x)


class LoopedTanhRNN(nn.Module):
    """The same contracting RNN written as a Python loop over a Linear cell, as tutorials write it."""

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.w_xh = nn.Linear(16, hidden)
        self.w_hh = nn.Linear(hidden, hidden, bias=False)
        self.head = nn.Linear(hidden, 10)
        with torch.no_grad():
            self.w_hh.weight.copy_(0.5 * nn.init.orthogonal_(torch.empty(hidden, hidden)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.zeros(x.shape[0], self.w_hh.in_features)
        for t in range(x.shape[1]):
            h = torch.tanh(self.w_xh(x[:, t]) + self.w_hh(h))
        return self.head(h)


class HandWrittenCell(nn.Module):
    """An LSTM or GRU cell written from two nn.Linear layers in a Python loop, as tutorials write them (gates
    from one fused projection, chunked), classified from the last step. At default init its gates sit at
    sigmoid(0) = 1/2, like nn.LSTMCell's: the same decay through time by design. forget_bias (LSTM): -5 with
    h2h x0.1, as GatedClassifier: a gate held closed, vanishing."""

    def __init__(self, kind: str, hidden: int = 64, forget_bias: float | None = None) -> None:
        super().__init__()
        gates = 4 if kind == "lstm" else 3
        self.kind, self.hidden = kind, hidden
        self.x2h = nn.Linear(16, gates * hidden)
        self.h2h = nn.Linear(hidden, gates * hidden)
        self.head = nn.Linear(hidden, 10)
        if forget_bias is not None:
            with torch.no_grad():
                self.x2h.bias[hidden : 2 * hidden].fill_(forget_bias)
                self.h2h.bias[hidden : 2 * hidden].zero_()
                self.h2h.weight.mul_(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.new_zeros(x.shape[0], self.hidden)
        c = torch.zeros_like(h)
        for t in range(x.shape[1]):
            if self.kind == "lstm":
                i, f, g, o = (self.x2h(x[:, t]) + self.h2h(h)).chunk(4, dim=1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = o.sigmoid() * c.tanh()
            else:
                xr, xz, xn = self.x2h(x[:, t]).chunk(3, dim=1)
                hr, hz, hn = self.h2h(h).chunk(3, dim=1)
                r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
                h = (1 - z) * torch.tanh(xn + r * hn) + z * h
        return self.head(h)


def sequences(length: int = 64, count: int = 3, seed: int = 0, batch: int = 16) -> list[tuple]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, length, 16, generator=generator), torch.randint(0, 10, (batch,), generator=generator))
        for _ in range(count)
    ]


class DeepTanh(nn.Module):
    """Plain tanh MLP, W ~ N(0, sw2/fan_in), zero biases: the mean-field setting (Schoenholz et al. 2017)."""

    def __init__(self, sw2: float, depth: int = 40, width: int = 128) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.head = nn.Linear(width, 10)
        for module in [*self.layers, self.head]:
            nn.init.normal_(module.weight, 0.0, math.sqrt(sw2 / module.in_features))
            nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))  # functional activations, as modern code writes them
        return self.head(x)


def vectors(width: int = 128, count: int = 3, seed: int = 0, batch: int = 32) -> list[tuple]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, width, generator=generator), torch.randint(0, 10, (batch,), generator=generator))
        for _ in range(count)
    ]


class FunctionalDeadMLP(nn.Module):
    """F.relu after layers whose biases are -4 (inputs N(0, 1), He weights): pre-activations ~ N(-4, 2) in
    layer 1, so P(active) = Phi(-2.8) = 0.002 per example; deeper layers get ~0 input and never activate."""

    def __init__(self, depth: int = 6, width: int = 128, bias: float = -4.0) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.head = nn.Linear(width, 10)
        for layer in self.layers:
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            nn.init.constant_(layer.bias, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = F.relu(layer(x))
        return self.head(x)


class StarvedGeluMLP(FunctionalDeadMLP):
    """A He-initialised 6-layer F.gelu MLP (critical, He et al. 2015) where 95% of layers.2's units have zero
    incoming weights and a bias of -6: their pre-activation is -6 in every example, where GELU's derivative
    Phi(x) + x phi(x) = -3.5e-8, against ~0.5-1 for an active unit. They get no usable gradient, yet none of it is
    exactly 0 in float32: the rest of the layer is alive, so only a test relative to its own units sees them."""

    def __init__(self, depth: int = 6, width: int = 128) -> None:
        super().__init__(depth, width, bias=0.0)
        with torch.no_grad():
            starved = int(0.95 * width)
            self.layers[2].weight[:starved] = 0.0
            self.layers[2].bias[:starved] = -6.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = F.gelu(layer(x))
        return self.head(x)


class SwiGLUNet(nn.Module):
    """Pre-norm residual blocks with a SwiGLU MLP (down(silu(gate(x)) * up(x)), as Llama writes it, with F.silu).
    starved: every gate unit's bias at -6, where SiLU's derivative is -0.012, 1.1% of its peak (1.10 at x = 2.4),
    for every input (LayerNorm'd inputs move a default-initialised unit by ~0.6): the gate passes no usable
    gradient anywhere. Each layer is starved uniformly, so no comparison among its own units can see it."""

    def __init__(self, blocks: int = 6, width: int = 64, starved: bool = False) -> None:
        super().__init__()
        self.inp = nn.Linear(32, width)
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(blocks))
        self.gates = nn.ModuleList(nn.Linear(width, 3 * width) for _ in range(blocks))
        self.ups = nn.ModuleList(nn.Linear(width, 3 * width) for _ in range(blocks))
        self.downs = nn.ModuleList(nn.Linear(3 * width, width) for _ in range(blocks))
        self.head = nn.Linear(width, 10)
        if starved:
            with torch.no_grad():
                for gate in self.gates:
                    gate.bias.fill_(-6.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for norm, gate, up, down in zip(self.norms, self.gates, self.ups, self.downs, strict=True):
            y = norm(x)
            x = x + down(F.silu(gate(y)) * up(y))
        return self.head(x)


def cases() -> list[Case]:
    small = images
    return [
        Case("tv-resnet18", "torchvision", tv_resnet18, small, True, "torchvision ResNet-18, default init"),
        Case(
            "tv-resnet18-zero-init",
            "torchvision",
            lambda: tv_resnet18(zero_init_residual=True),
            small,
            True,
            "zero_init_residual: each block's last BN gamma is 0, a gate that opens on the first step (Goyal 2017)",
        ),
        Case("tv-convnext", "torchvision", tv_convnext, small, True, "ConvNeXt: layer scale 1e-6 by design"),
        Case("tv-vit", "torchvision", tv_vit, small, True, "ViT: heads.head zero-initialised, gates all at init"),
        Case(
            "tv-vgg11",
            "torchvision",
            tv_vgg11,
            lambda: images(size=128, count=3, batch=2),
            True,
            "VGG-11 without BN, kaiming fan_out init, 128 px",
        ),
        Case(
            "tv-googlenet",
            "torchvision",
            tv_googlenet,
            lambda: images(size=96, count=2, batch=8),
            True,
            "GoogLeNet: auxiliary heads the default loss does not read",
        ),
        Case("tv-densenet", "torchvision", tv_densenet, small, True, "DenseNet-121 layout (120 layers), narrow"),
        Case("tv-mobilenet-v3", "torchvision", tv_mobilenet, small, True, "MobileNetV3-small: SE, hardswish"),
        Case("tv-efficientnet-b0", "torchvision", tv_efficientnet, small, True, "EfficientNet-B0: SiLU, SE"),
        Case("tv-swin", "torchvision", tv_swin, small, True, "Swin transformer, shifted windows"),
        Case("timm-convnext-atto", "timm", timm_convnext_atto, small, True, "timm ConvNeXt-atto: layer scale 1e-6"),
        Case(
            "timm-edgenext",
            "timm",
            timm_edgenext,
            lambda: images(size=64),
            True,
            "EdgeNeXt-xx-small: attention behind two LayerScales",
        ),
        Case("timm-deit3", "timm", timm_deit3, small, True, "DeiT-III ViT: LayerScale 1e-6"),
        Case(
            "timm-focalnet",
            "timm",
            timm_focalnet,
            lambda: images(size=64, batch=16, count=1),
            True,
            "FocalNet: focal levels and stages that learn at different speeds by design",
        ),
        Case("timm-cait", "timm", timm_cait, small, True, "CaiT: LayerScale 1e-5, class attention"),
        Case("timm-resnet18", "timm", timm_resnet, small, True, "timm ResNet-18"),
        Case("timm-mixer", "timm", timm_mixer, small, True, "MLP-Mixer: timm zero-initialises its head"),
        Case("hf-gpt2", "transformers", hf_gpt2, lambda: tokens(VOCAB), True, "GPT-2 (Conv1D blocks), tied head"),
        Case("hf-bert-4", "transformers", hf_bert(4), lambda: tokens(VOCAB), True, "BERT MLM, 4 layers"),
        Case("hf-bert-6", "transformers", hf_bert(6), lambda: tokens(VOCAB), True, "BERT MLM, 6 layers"),
        Case("hf-llama-4", "transformers", hf_llama(4), lambda: tokens(VOCAB), True, "Llama, 4 layers, GQA"),
        Case("hf-llama-6", "transformers", hf_llama(6), lambda: tokens(VOCAB), True, "Llama, 6 layers, GQA"),
        Case(
            "hf-olmo2-4",
            "transformers",
            hf_olmo2(4),
            lambda: tokens(VOCAB),
            True,
            "OLMo-2, 4 blocks: normalised branch outputs on a stream that grows from 0.02",
        ),
        Case("hf-t5", "transformers", hf_t5, t5_batches, True, "T5: one embedding shared by four modules"),
        Case("hf-mamba-4", "transformers", hf_mamba(4), lambda: tokens(VOCAB), True, "Mamba SSM, 4 layers"),
        Case(
            "hf-mamba-1",
            "transformers",
            hf_mamba(1),
            lambda: tokens(VOCAB),
            True,
            "Mamba, one block: x_proj and dt_proj have no peers; their gradients are scaled by dt by design",
        ),
        Case(
            "hf-deberta-1",
            "transformers",
            hf_deberta(1),
            lambda: tokens(VOCAB),
            True,
            "DeBERTa-v2, one block: query_proj and key_proj have no peers, slow by design at uniform attention",
        ),
        Case("hf-vit", "transformers", hf_vit, hf_images, True, "Hugging Face ViT classifier"),
        Case(
            "hf-deit-1",
            "transformers",
            hf_deit_1,
            hf_images,
            True,
            "DeiT, one block: the loss reads the class token, zero at init, so the query projection's weight gets "
            "exactly 0 (its bias learns) until that token moves: gated, not dead",
        ),
        Case(
            "hf-electra-1",
            "transformers",
            _hf_small("ElectraConfig", "ElectraForMaskedLM", 1, embedding_size=32),
            lambda: tokens(VOCAB),
            True,
            "ELECTRA, one block: three embedding tables of twelve weight layers must not set the network median",
        ),
        Case("torch-lstm-lm", "torch", lambda: RecurrentLM(nn.LSTM), lm_batches, True, "2-layer LSTM LM"),
        Case("torch-gru-lm", "torch", lambda: RecurrentLM(nn.GRU), lm_batches, True, "2-layer GRU LM"),
        Case("torch-irnn", "torch", irnn, sequences, True, "IRNN over 64 steps: ReLU, W_hh = I (Le et al. 2015)"),
        Case(
            "torch-seq2seq-attention",
            "torch",
            AttentionSeq2Seq,
            translation_batches,
            True,
            "GRU encoder-decoder with dot attention: its score projection and output head are two different nn.Linear",
        ),
        Case(
            "torch-lstm-classifier",
            "torch",
            lambda: GatedClassifier(nn.LSTM),
            sequences,
            True,
            "nn.LSTM read over 64 steps, classified from the last: gates at their neutral point (GatedClassifier)",
        ),
        Case(
            "torch-gru-classifier",
            "torch",
            lambda: GatedClassifier(nn.GRU),
            sequences,
            True,
            "nn.GRU read over 64 steps, classified from the last: the update gate at its neutral point",
        ),
        Case(
            "torch-lstm-stack",
            "torch",
            lambda: StackedRecurrentLM(nn.LSTM, layers=4),
            lm_batches,
            True,
            "4 nn.LSTM modules stacked: gates at sigmoid(0) = 1/2 give x1/4 per layer at init, by design",
        ),
        Case(
            "torch-gru-stack",
            "torch",
            lambda: StackedRecurrentLM(nn.GRU, layers=3),
            lm_batches,
            True,
            "3 nn.GRU modules stacked: 1 - z = 1/2 per layer at init, by design",
        ),
        Case(
            "hand-written-lstm-cell",
            "torch",
            lambda: HandWrittenCell("lstm"),
            sequences,
            True,
            "an LSTM cell from two nn.Linear in a Python loop, 64 steps: gates at sigmoid(0), as nn.LSTMCell",
        ),
        Case(
            "hand-written-gru-cell",
            "torch",
            lambda: HandWrittenCell("gru"),
            sequences,
            True,
            "a GRU cell from two nn.Linear in a Python loop, 64 steps: the update gate at sigmoid(0)",
        ),
        Case(
            "swiglu-mlp",
            "torch",
            SwiGLUNet,
            lambda: vectors(width=32),
            True,
            "pre-norm residual SwiGLU blocks (F.silu gates), default init",
        ),
        # -- broken, by theory --
        Case(
            "swiglu-gates-starved",
            "torch",
            lambda: SwiGLUNet(starved=True),
            lambda: vectors(width=32),
            False,
            "every SwiGLU gate unit at -6: SiLU's derivative 1.1% of its peak for every input (see SwiGLUNet)",
            ("dead",),
        ),
        Case(
            "hand-written-lstm-forget-gate-closed",
            "torch",
            lambda: HandWrittenCell("lstm", forget_bias=-5.0),
            sequences,
            False,
            "the hand-written LSTM cell with a forget-gate bias of -5 and h2h x0.1: vanishing through time",
            ("vanishing",),
        ),
        Case(
            "lstm-stack-input-gates-closed",
            "torch",
            lambda: StackedRecurrentLM(nn.LSTM, layers=4, closed=True),
            lm_batches,
            False,
            "4 stacked LSTMs, input gates at sigmoid(-6): x0.0025/0.25 = x0.01 per layer beyond neutral gates",
            ("vanishing",),
        ),
        Case(
            "gru-stack-update-gates-shut",
            "torch",
            lambda: StackedRecurrentLM(nn.GRU, layers=4, closed=True),
            lm_batches,
            False,
            "4 stacked GRUs, update gates at sigmoid(6): 1 - z = 0.0025, x0.005 per layer beyond neutral gates",
            ("vanishing",),
        ),
        Case(
            "deep-tanh-chaotic",
            "torch",
            lambda: DeepTanh(sw2=4.0),
            vectors,
            False,
            "tanh sw2 = 4: chi1 = 1.36, depth scale 3.2 layers; 40 layers = 12 depth scales, past the trainable "
            "depth of ~6 (Schoenholz et al. 2017): gradients x~470 over the chain",
            ("exploding",),
        ),
        Case(
            "deep-tanh-ordered",
            "torch",
            lambda: DeepTanh(sw2=0.5, depth=20),
            vectors,
            False,
            "tanh sw2 = 0.5: chi1 = 0.5, depth scale 1.4 layers, 20 layers: vanishing (functional torch.tanh)",
            ("vanishing",),
        ),
        Case(
            "tanh-rnn-contracting",
            "torch",
            tanh_rnn_contracting,
            sequences,
            False,
            "many-to-one tanh RNN over 64 steps, ||W_hh|| = 0.5 < 1/gamma: the gradient decays at least x0.5 per "
            "step, x0.5^63 ~ 1e-19 to the first step (Pascanu et al. 2013)",
            ("vanishing",),
        ),
        Case(
            "lstm-forget-gate-closed",
            "torch",
            lambda: GatedClassifier(nn.LSTM, forget_bias=-5.0),
            sequences,
            False,
            "forget-gate bias -5 (sigmoid(-5) = 0.0067 per step), W_hh x0.1: the gradient through time vanishes",
            ("vanishing",),
        ),
        Case(
            "looped-tanh-rnn-contracting",
            "torch",
            LoopedTanhRNN,
            sequences,
            False,
            "the same RNN as a Python loop over nn.Linear cells",
            ("vanishing",),
        ),
        Case(
            "tv-mobilenet-v2-bn-shifted",
            "torchvision",
            tv_mobilenet_v2_shifted,
            lambda: images(64),
            False,
            "every BN bias at -3: each ReLU6 active for ~0.1% of its inputs, 1 - Phi(3) (see tv_mobilenet_v2_shifted)",
            ("dead",),
        ),
        Case(
            "functional-dead-relu",
            "torch",
            FunctionalDeadMLP,
            vectors,
            False,
            "F.relu after biases of -4: units that never activate (see FunctionalDeadMLP)",
            ("dead",),
        ),
        Case(
            "starved-gelu",
            "torch",
            StarvedGeluMLP,
            vectors,
            False,
            "95% of one F.gelu layer's units at -6, where GELU's derivative is -3.5e-8 (see StarvedGeluMLP)",
            ("dead",),
        ),
    ]
