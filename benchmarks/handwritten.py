"""Architectures written by hand as users write them, none of them in tests/: each labelled from theory before
it ran (healthy: must exit 0 with no error; broken: must fail with one of the kinds listed). Where the corpus
checks standard architectures from their libraries, this checks the shapes user code takes: a mixture of
experts looped in Python, a seq2seq GRU with attention, WaveNet, DCGAN, GCN, towers, ensembles, U-Net.

    python benchmarks/handwritten.py [NAME ...]

Prints one line per model (ok/BAD, exit, error and warning counts, the fitted signal gain) and its first
findings. Broken models that the documented thresholds put at warning level read BAD here by design (an
8-layer N(0,1) sigmoid net 57% saturated, a ReLU RNN with
W_hh = 1.5 orthogonal over 32 steps, a detached backbone: `unused` is not in the default --fail-on).
"""

from __future__ import annotations

import itertools
import math
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import gradcheck_cli

H, B = True, False


def mlp(depth, width, act, init=None, bias=None, din=64, dout=10):
    layers, d = [], din
    for _ in range(depth):
        lin = nn.Linear(d, width)
        if init:
            init(lin)
        if bias is not None:
            nn.init.constant_(lin.bias, bias)
        layers += [lin, act()]
        d = width
    layers.append(nn.Linear(d, dout))
    return nn.Sequential(*layers)


def kaiming(lin):
    nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
    nn.init.zeros_(lin.bias)


def xavier(lin):
    nn.init.xavier_normal_(lin.weight)
    nn.init.zeros_(lin.bias)


def scaled(s):
    def f(lin):
        nn.init.normal_(lin.weight, 0, s / math.sqrt(lin.in_features))
        nn.init.zeros_(lin.bias)

    return f


def zeros(lin):
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)


def xy(din=64, n=64, classes=10):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, din, generator=g), torch.randint(0, classes, (n,), generator=g)) for _ in range(3)]


def img(c=3, s=32, n=16, classes=10):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, c, s, s, generator=g), torch.randint(0, classes, (n,), generator=g)) for _ in range(3)]


def seq(vocab=500, t=32, n=16, lm=False):
    g = torch.Generator().manual_seed(1)
    return [
        (
            torch.randint(0, vocab, (n, t), generator=g),
            torch.randint(0, vocab if lm else 5, (n, t) if lm else (n,), generator=g),
        )
        for _ in range(3)
    ]


def fseq(d=16, t=32, n=16, classes=5):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, t, d, generator=g), torch.randint(0, classes, (n,), generator=g)) for _ in range(3)]


class ConvNet(nn.Module):
    def __init__(self, depth=4, bn=True, width=32, init=None):
        super().__init__()
        layers, c = [], 3
        for i in range(depth):
            conv = nn.Conv2d(c, width, 3, padding=1)
            if init:
                init(conv)
            layers += [conv] + ([nn.BatchNorm2d(width)] if bn else []) + [nn.ReLU()]
            c = width
            if i % 4 == 3:
                layers.append(nn.MaxPool2d(2))
        self.f = nn.Sequential(*layers)
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        return self.head(self.f(x).mean((2, 3)))


class Enc(nn.Module):
    def __init__(self, layers=4, d=64, norm_first=False, skip=True, vocab=500):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.enc = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(d, 4, 4 * d, 0.0, batch_first=True, norm_first=norm_first),
            layers,
            enable_nested_tensor=False,
        )
        self.head = nn.Linear(d, 5)

    def forward(self, ids):
        return self.head(self.enc(self.emb(ids)).mean(1))


class NoSkipAttn(nn.Module):
    """attention + MLP blocks with no residual connections and no norm: rank collapse (Dong et al. 2021)"""

    def __init__(self, layers=12, d=64, vocab=500):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.att = nn.ModuleList(nn.MultiheadAttention(d, 4, batch_first=True) for _ in range(layers))
        self.ff = nn.ModuleList(
            nn.Sequential(nn.Linear(d, 4 * d), nn.ReLU(), nn.Linear(4 * d, d)) for _ in range(layers)
        )
        self.head = nn.Linear(d, 5)

    def forward(self, ids):
        x = self.emb(ids)
        for a, f in zip(self.att, self.ff, strict=True):
            x = a(x, x, x, need_weights=False)[0]
            x = f(x)
        return self.head(x.mean(1))


class RNNCls(nn.Module):
    def __init__(self, cell=nn.LSTM, layers=2, h=64, whh=None, fbias=None, nl="tanh"):
        super().__init__()
        kw = dict(nonlinearity=nl) if cell is nn.RNN else {}
        self.rnn = cell(16, h, layers, batch_first=True, **kw)
        self.head = nn.Linear(h, 5)
        with torch.no_grad():
            for name, p in self.rnn.named_parameters():
                if whh is not None and name.startswith("weight_hh"):
                    if whh == "eye":
                        p.copy_(torch.eye(h))
                    else:
                        nn.init.orthogonal_(p, gain=whh)
                if fbias is not None and name.startswith("bias"):
                    p[h : 2 * h].fill_(fbias / 2)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


class Detached(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU())
        self.b = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x):
        return self.b(self.a(x).detach())


class MoE(nn.Module):
    def __init__(self, experts=8, d=64):
        super().__init__()
        self.inp = nn.Linear(64, d)
        self.gate = nn.Linear(d, experts)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)) for _ in range(experts)
        )
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        h = self.inp(x)
        w = self.gate(h).softmax(-1)
        top = w.argmax(-1)
        out = torch.zeros_like(h)
        for i, e in enumerate(self.experts):
            m = top == i
            if m.any():
                out[m] = e(h[m]) * w[m, i : i + 1]
        return self.head(h + out)


class Siamese(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 64))
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head((self.enc(x[:, :32]) - self.enc(x[:, 32:])).abs())


class AE(nn.Module):
    def __init__(self):
        super().__init__()
        self.e = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 16))
        self.d = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64))

    def forward(self, x):
        return self.d(self.e(x))


def ae_data():
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(64, 64, generator=g) for _ in range(3)]
    return [(x, x) for x in xs]


class Frozen(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = mlp(6, 128, nn.ReLU, kaiming)[:-1]
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.head = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x):
        return self.head(self.backbone(x))


def selu_net():
    def lecun(lin):
        nn.init.normal_(lin.weight, 0, 1 / math.sqrt(lin.in_features))
        nn.init.zeros_(lin.bias)

    return mlp(20, 128, nn.SELU, lecun)


class UNetish(nn.Module):
    def __init__(self):
        super().__init__()

        def blk(i, o):
            return nn.Sequential(
                nn.Conv2d(i, o, 3, padding=1),
                nn.BatchNorm2d(o),
                nn.ReLU(),
                nn.Conv2d(o, o, 3, padding=1),
                nn.BatchNorm2d(o),
                nn.ReLU(),
            )

        self.d1, self.d2, self.d3 = blk(3, 16), blk(16, 32), blk(32, 64)
        self.u2, self.u1 = blk(64 + 32, 32), blk(32 + 16, 16)
        self.out = nn.Conv2d(16, 2, 1)

    def forward(self, x):
        a = self.d1(x)
        b = self.d2(F.max_pool2d(a, 2))
        c = self.d3(F.max_pool2d(b, 2))
        b2 = self.u2(torch.cat([F.interpolate(c, scale_factor=2), b], 1))
        a2 = self.u1(torch.cat([F.interpolate(b2, scale_factor=2), a], 1))
        return self.out(a2)


def seg_data():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 2, (8, 32, 32), generator=g)) for _ in range(3)]


def seg_loss(o, t):
    return F.cross_entropy(o, t)


class GRULM(nn.Module):
    def __init__(self, vocab=500, h=64, tie=True):
        super().__init__()
        self.emb = nn.Embedding(vocab, h)
        self.rnn = nn.GRU(h, h, 2, batch_first=True)
        self.out = nn.Linear(h, vocab)
        if tie:
            self.out.weight = self.emb.weight

    def forward(self, ids):
        return self.out(self.rnn(self.emb(ids))[0])


class DWNet(nn.Module):
    def __init__(self, depth=6):
        super().__init__()
        layers = [nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU6()]
        for _ in range(depth):
            layers += [
                nn.Conv2d(32, 32, 3, padding=1, groups=32),
                nn.BatchNorm2d(32),
                nn.ReLU6(),
                nn.Conv2d(32, 32, 1),
                nn.BatchNorm2d(32),
                nn.ReLU6(),
            ]
        self.f = nn.Sequential(*layers)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.f(x).mean((2, 3)))


class GeluLN(nn.Module):
    """pre-LN residual MLP blocks with GELU (MLP-Mixer-like channel MLPs)"""

    def __init__(self, blocks=8, d=128):
        super().__init__()
        self.inp = nn.Linear(64, d)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)) for _ in range(blocks)
        )
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = h + b(h)
        return self.head(h)


class Ensemble(nn.Module):
    def __init__(self):
        super().__init__()
        self.members = nn.ModuleList(
            nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
            for _ in range(5)
        )

    def forward(self, x):
        return torch.stack([m(x) for m in self.members]).mean(0)


class TwoTower(nn.Module):
    def __init__(self):
        super().__init__()
        self.user = nn.Sequential(
            nn.Embedding(1000, 32), nn.Flatten(), nn.Linear(32 * 4, 64), nn.ReLU(), nn.Linear(64, 32)
        )
        self.item = nn.Sequential(
            nn.Embedding(1000, 32), nn.Flatten(), nn.Linear(32 * 4, 64), nn.ReLU(), nn.Linear(64, 32)
        )

    def forward(self, ids):
        return (self.user(ids[:, :4]) * self.item(ids[:, 4:])).sum(-1, keepdim=True)


def tt_data():
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 1000, (64, 8), generator=g), torch.rand(64, 1, generator=g)) for _ in range(3)]


class WaveNet(nn.Module):
    def __init__(self, layers=10, c=32):
        super().__init__()
        self.inp = nn.Conv1d(1, c, 1)
        self.filt = nn.ModuleList(
            nn.Conv1d(c, c, 2, dilation=2 ** (i % 5), padding=2 ** (i % 5)) for i in range(layers)
        )
        self.gate = nn.ModuleList(
            nn.Conv1d(c, c, 2, dilation=2 ** (i % 5), padding=2 ** (i % 5)) for i in range(layers)
        )
        self.res = nn.ModuleList(nn.Conv1d(c, c, 1) for _ in range(layers))
        self.skip = nn.ModuleList(nn.Conv1d(c, c, 1) for _ in range(layers))
        self.out = nn.Sequential(nn.ReLU(), nn.Conv1d(c, c, 1), nn.ReLU(), nn.Conv1d(c, 16, 1))

    def forward(self, x):
        h = self.inp(x)
        T = x.shape[-1]
        skips = 0
        for f, g, r, s in zip(self.filt, self.gate, self.res, self.skip, strict=True):
            z = torch.tanh(f(h)[..., :T]) * torch.sigmoid(g(h)[..., :T])
            skips = skips + s(z)
            h = h + r(z)
        return self.out(skips)


def wn_data():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 1, 256, generator=g), torch.randint(0, 16, (8, 256), generator=g)) for _ in range(3)]


def wn_loss(o, t):
    return F.cross_entropy(o, t)


class DCGAN(nn.Module):
    def __init__(self, nz=64, ngf=32):
        super().__init__()
        self.net = nn.Sequential(
            nn.ConvTranspose2d(nz, ngf * 4, 4, 1, 0, bias=False),
            nn.BatchNorm2d(ngf * 4),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ngf * 2),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ngf),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf, 3, 4, 2, 1, bias=False),
            nn.Tanh(),
        )
        for m in self.modules():
            if isinstance(m, nn.ConvTranspose2d):
                nn.init.normal_(m.weight, 0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, z):
        return self.net(z)


def gan_data():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 64, 1, 1, generator=g), torch.rand(16, 3, 32, 32, generator=g) * 2 - 1) for _ in range(3)]


class GCN(nn.Module):
    def __init__(self, layers=3, d=64):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        A = (torch.rand(100, 100, generator=g) < 0.05).float()
        A = ((A + A.T) > 0).float() + torch.eye(100)
        dinv = A.sum(1).rsqrt()
        self.register_buffer("A", dinv[:, None] * A * dinv[None])
        self.inp = nn.Linear(16, d)
        self.convs = nn.ModuleList(nn.Linear(d, d) for _ in range(layers))
        self.out = nn.Linear(d, 5)

    def forward(self, x):
        h = self.inp(x)
        for c in self.convs:
            h = F.relu(self.A @ c(h))
        return self.out(h)


def gcn_data():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(100, 16, generator=g), torch.randint(0, 5, (100,), generator=g)) for _ in range(3)]


class Inception(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())

        def br(k):
            return nn.Sequential(
                nn.Conv2d(64 if k else 32, 16, 1),
                nn.BatchNorm2d(16),
                nn.ReLU(),
                nn.Conv2d(16, 16, k or 1, padding=(k or 1) // 2),
                nn.BatchNorm2d(16),
                nn.ReLU(),
            )

        self.blocks = nn.ModuleList()
        for i in range(4):
            c = 32 if i == 0 else 64
            self.blocks.append(
                nn.ModuleList(
                    nn.Sequential(
                        nn.Conv2d(c, 16, 1),
                        nn.BatchNorm2d(16),
                        nn.ReLU(),
                        nn.Conv2d(16, 16, k, padding=k // 2),
                        nn.BatchNorm2d(16),
                        nn.ReLU(),
                    )
                    for k in (1, 3, 5, 3)
                )
            )
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        h = self.stem(x)
        for blk in self.blocks:
            h = torch.cat([b(h) for b in blk], 1)
        return self.head(h.mean((2, 3)))


class Seq2Seq(nn.Module):
    def __init__(self, v=300, h=64):
        super().__init__()
        self.emb = nn.Embedding(v, h)
        self.enc = nn.GRU(h, h, batch_first=True)
        self.dec = nn.GRU(h, h, batch_first=True)
        self.attn = nn.Linear(h, h)
        self.out = nn.Linear(2 * h, v)

    def forward(self, ids):
        src, tgt = ids[:, :20], ids[:, 20:]
        e, hid = self.enc(self.emb(src))
        d, _ = self.dec(self.emb(tgt), hid)
        a = torch.softmax(self.attn(d) @ e.transpose(1, 2), -1) @ e
        return self.out(torch.cat([d, a], -1))


def s2s_data():
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randint(0, 300, (16, 36), generator=g), torch.randint(0, 300, (16, 16), generator=g)) for _ in range(3)
    ]


class DecLM(nn.Module):
    def __init__(self, v=500, d=64, L=4):
        super().__init__()
        self.emb = nn.Embedding(v, d)
        self.pos = nn.Parameter(torch.zeros(1, 64, d))
        self.blocks = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(d, 4, 4 * d, 0.1, batch_first=True, norm_first=True, activation="gelu"),
            L,
            enable_nested_tensor=False,
        )
        self.ln = nn.LayerNorm(d)
        self.out = nn.Linear(d, v, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids):
        T = ids.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(T)
        return self.out(self.ln(self.blocks(self.emb(ids) + self.pos[:, :T], mask=mask, is_causal=True)))


class LNMLP(nn.Module):
    def __init__(self, L=12, d=128):
        super().__init__()
        layers = [nn.Linear(64, d)]
        for _ in range(L):
            layers += [nn.LayerNorm(d), nn.GELU(), nn.Linear(d, d)]
        layers += [nn.LayerNorm(d), nn.Linear(d, 10)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class CrossNet(nn.Module):
    def __init__(self, d=64, L=3):
        super().__init__()
        self.cross = nn.ModuleList(nn.Linear(d, d) for _ in range(L))
        self.deep = nn.Sequential(nn.Linear(d, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())
        self.out = nn.Linear(d + 64, 1)

    def forward(self, x):
        x0 = x
        c = x
        for lin in self.cross:
            c = x0 * lin(c) + c
        return self.out(torch.cat([c, self.deep(x)], -1))


def reg_data():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(64, 64, generator=g), torch.randn(64, 1, generator=g)) for _ in range(3)]


class Audio1D(nn.Module):
    def __init__(self):
        super().__init__()
        L = []
        c = 1
        for i, w in enumerate([32, 32, 64, 64, 128, 128]):
            L += [nn.Conv1d(c, w, 9, stride=2 if i % 2 else 1, padding=4), nn.BatchNorm1d(w), nn.ReLU()]
            c = w
        self.f = nn.Sequential(*L)
        self.head = nn.Linear(128, 12)

    def forward(self, x):
        return self.head(self.f(x).mean(-1))


def audio_data():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 1, 4000, generator=g), torch.randint(0, 12, (8,), generator=g)) for _ in range(3)]


class NumpyMLP(nn.Module):
    """A ReLU MLP ported from numpy: every matrix a parameter of the model, He-initialised (healthy), or scaled
    by `gain` per layer (He et al. 2015: chi1 = gain^2 for ReLU at sw2 = 2 gain^2)."""

    def __init__(self, depth=16, width=256, gain=1.0):
        super().__init__()
        sizes = [64] + [width] * depth + [10]
        for i, (a, b) in enumerate(itertools.pairwise(sizes)):
            setattr(self, f"W{i}", nn.Parameter(torch.randn(a, b) * gain * math.sqrt(2.0 / a)))
            setattr(self, f"b{i}", nn.Parameter(torch.zeros(b)))
        self.depth = depth

    def forward(self, x):
        for i in range(self.depth + 1):
            x = x @ getattr(self, f"W{i}") + getattr(self, f"b{i}")
            if i < self.depth:
                x = torch.relu(x)
        return x


class ExpertsEinsum(nn.Module):
    """Soft mixture of 4 experts whose weights are one 3-D parameter each side, applied by einsum per expert
    slice (W[e]); a ParameterDict holds them (healthy: Glorot-scaled, residual)."""

    def __init__(self, d=64, h=128, experts=4, blocks=4):
        super().__init__()
        self.blocks = blocks
        self.inp = nn.Linear(64, d)
        self.params = nn.ParameterDict()
        for b in range(blocks):
            self.params[f"up{b}"] = nn.Parameter(torch.randn(experts, d, h) / math.sqrt(d))
            self.params[f"down{b}"] = nn.Parameter(torch.randn(experts, h, d) / math.sqrt(h))
        self.gates = nn.ModuleList(nn.Linear(d, experts) for _ in range(blocks))
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(blocks))
        self.out = nn.Linear(d, 10)

    def forward(self, x):
        x = self.inp(x)
        for b in range(self.blocks):
            y, weights = self.norms[b](x), torch.softmax(self.gates[b](x), -1)
            up, down = self.params[f"up{b}"], self.params[f"down{b}"]
            mixed = sum(
                weights[:, e : e + 1] * torch.einsum("bh,hd->bd", F.gelu(torch.einsum("bd,dh->bh", y, up[e])), down[e])
                for e in range(up.shape[0])
            )
            x = x + mixed
        return self.out(x)


class OwnDense(nn.Module):
    """A linear layer written by hand: its matrix is `self.W`, not `weight` (He scale times `scale`)."""

    def __init__(self, d_in, d_out, scale=1.0):
        super().__init__()
        self.W = nn.Parameter(torch.randn(d_in, d_out) * math.sqrt(2.0 / d_in) * scale)
        self.b = nn.Parameter(torch.zeros(d_out))

    def forward(self, x):
        return x @ self.W + self.b


class OwnDenseNet(nn.Module):
    """ReLU MLP of OwnDense layers; `c` rescales layer 3 by c and layer 4 by 1/c: the same function (ReLU is
    positively homogeneous), but ||g||/||W|| of layer 3 falls by c^2 (Neyshabur et al. 2015): at c = 100, 1e4x,
    past the update view's error factor (1000)."""

    def __init__(self, depth=8, width=128, c=1.0):
        super().__init__()
        scales = [c if i == 3 else 1 / c if i == 4 else 1.0 for i in range(depth)]
        self.layers = nn.ModuleList(OwnDense(64 if i == 0 else width, width, s) for i, s in enumerate(scales))
        self.out = OwnDense(width, 10)

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
        return self.out(x)


class OwnLSTMCell(nn.Module):
    """An LSTM cell owning its matrices, gates in its own forward (PyTorch's init; `fbias` on the forget gate)."""

    def __init__(self, d_in, hidden, fbias=0.0):
        super().__init__()
        bound = 1 / math.sqrt(hidden)
        self.W_ih = nn.Parameter(torch.empty(d_in, 4 * hidden).uniform_(-bound, bound))
        self.W_hh = nn.Parameter(torch.empty(hidden, 4 * hidden).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(4 * hidden))
        with torch.no_grad():
            self.bias[hidden : 2 * hidden] = fbias

    def forward(self, x, state):
        h, c = state
        i, f, g, o = (x @ self.W_ih + h @ self.W_hh + self.bias).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c


class OwnLSTMCls(nn.Module):
    def __init__(self, fbias=0.0, hidden=64):
        super().__init__()
        self.hidden = hidden
        self.cell = OwnLSTMCell(16, hidden, fbias)
        self.head = nn.Linear(hidden, 5)

    def forward(self, x):
        h = x.new_zeros(x.shape[0], self.hidden)
        state = (h, h)
        for t in range(x.shape[1]):
            state = self.cell(x[:, t], state)
        return self.head(state[0])


class OwnConvNet(nn.Module):
    """Plain ReLU convnet whose kernels sit in an nn.ParameterList, applied with F.conv2d (He scale times gain:
    x gain per layer in dL/dz, He et al. 2015)."""

    def __init__(self, depth=12, c=32, gain=1.0):
        super().__init__()
        self.kernels = nn.ParameterList(
            nn.Parameter(torch.randn(c, 3 if i == 0 else c, 3, 3) * math.sqrt(2.0 / ((3 if i == 0 else c) * 9)) * gain)
            for i in range(depth)
        )
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        for kernel in self.kernels:
            x = F.relu(F.conv2d(x, kernel, padding=1))
        return self.head(x.mean(dim=(2, 3)))


CASES = [
    ("relu-kaiming-mlp-12", lambda: mlp(12, 256, nn.ReLU, kaiming), xy, H, (), "auto"),
    ("tanh-xavier-mlp-8", lambda: mlp(8, 256, nn.Tanh, xavier), xy, H, (), "auto"),
    ("default-init-mlp-4", lambda: mlp(4, 256, nn.ReLU), xy, H, (), "auto"),
    ("gelu-ln-residual-8", GeluLN, xy, H, (), "auto"),
    ("selu-lecun-20", selu_net, xy, H, (), "auto"),
    ("convnet-bn-8", lambda: ConvNet(8), img, H, (), "auto"),
    ("dw-sep-bn", DWNet, img, H, (), "auto"),
    ("unet-bn", UNetish, seg_data, H, (), seg_loss),
    ("post-ln-enc-4", lambda: Enc(4), seq, H, (), "auto"),
    ("pre-ln-enc-6", lambda: Enc(6, norm_first=True), seq, H, (), "auto"),
    ("lstm-2-cls", lambda: RNNCls(nn.LSTM, 2), fseq, H, (), "auto"),
    ("gru-lm-tied", GRULM, lambda: seq(lm=True), H, (), "auto"),
    ("irnn-relu-eye", lambda: RNNCls(nn.RNN, 1, whh="eye", nl="relu"), fseq, H, (), "auto"),
    ("moe-top1", MoE, xy, H, (), "auto"),
    ("siamese-shared", Siamese, xy, H, (), "auto"),
    ("autoencoder-mse", AE, ae_data, H, (), "auto"),
    ("frozen-backbone", Frozen, xy, H, (), "auto"),
    # broken
    ("relu-x0.3-mlp-20", lambda: mlp(20, 256, nn.ReLU, scaled(0.3 * math.sqrt(2))), xy, B, ("vanishing",), "auto"),
    ("relu-x2-mlp-20", lambda: mlp(20, 256, nn.ReLU, scaled(2 * math.sqrt(2))), xy, B, ("exploding",), "auto"),
    ("tanh-chaotic-sw2-3-30", lambda: mlp(30, 256, nn.Tanh, scaled(math.sqrt(3))), xy, B, ("exploding",), "auto"),
    (
        "sigmoid-N01-8",
        lambda: mlp(8, 128, nn.Sigmoid, lambda lin: (nn.init.normal_(lin.weight), nn.init.zeros_(lin.bias))),
        xy,
        B,
        ("vanishing", "saturated"),
        "auto",
    ),
    ("zero-init-mlp", lambda: mlp(4, 128, nn.ReLU, zeros), xy, B, ("dead", "vanishing"), "auto"),
    ("relu-bias-minus-3", lambda: mlp(6, 128, nn.ReLU, kaiming, bias=-3.0), xy, B, ("dead",), "auto"),
    ("plain-conv-20-default", lambda: ConvNet(20, bn=False), img, B, ("vanishing",), "auto"),
    ("no-skip-attention-12", NoSkipAttn, seq, B, ("vanishing",), "auto"),
    ("rnn-tanh-whh0.5-64", lambda: RNNCls(nn.RNN, 1, whh=0.5), lambda: fseq(t=64), B, ("vanishing",), "auto"),
    (
        "rnn-tanh-whh3-64",
        lambda: RNNCls(nn.RNN, 1, whh=3.0),
        lambda: fseq(t=64),
        B,
        ("exploding", "vanishing", "saturated"),
        "auto",
    ),
    ("rnn-relu-whh1.5-32", lambda: RNNCls(nn.RNN, 1, whh=1.5, nl="relu"), fseq, B, ("exploding",), "auto"),
    ("lstm-forget-minus6", lambda: RNNCls(nn.LSTM, 1, fbias=-6.0), lambda: fseq(t=64), B, ("vanishing",), "auto"),
    ("detached-backbone", Detached, xy, B, ("dead", "unused", "vanishing"), "auto"),
    ("ensemble-5", Ensemble, xy, H, (), "auto"),
    ("two-tower", TwoTower, tt_data, H, (), "auto"),
    ("wavenet-10", WaveNet, wn_data, H, (), wn_loss),
    ("dcgan-gen", DCGAN, gan_data, H, (), "auto"),
    ("gcn-3", GCN, gcn_data, H, (), "auto"),
    ("inception-4", Inception, img, H, (), "auto"),
    ("seq2seq-gru-attn", Seq2Seq, s2s_data, H, (), "auto"),
    ("decoder-lm-tied", DecLM, lambda: seq(lm=True), H, (), "auto"),
    ("ln-gelu-mlp-12", LNMLP, xy, H, (), "auto"),
    ("deep-cross", CrossNet, reg_data, H, (), "auto"),
    ("audio-1d-bn", Audio1D, audio_data, H, (), "auto"),
    ("gcn-12", lambda: GCN(12), gcn_data, B, ("vanishing",), "auto"),
    ("numpy-relu-he-16", NumpyMLP, xy, H, (), "auto"),
    ("numpy-relu-x0.5-16", lambda: NumpyMLP(gain=0.5), xy, B, ("vanishing",), "auto"),
    ("experts-einsum-dict", ExpertsEinsum, xy, H, (), "auto"),
    ("own-dense-he-8", OwnDenseNet, xy, H, (), "auto"),
    ("own-dense-rescaled-100", lambda: OwnDenseNet(c=100.0), xy, B, ("vanishing",), "auto"),
    ("own-lstm-cell-64", OwnLSTMCls, lambda: fseq(t=64), H, (), "auto"),
    ("own-lstm-forget-minus6", lambda: OwnLSTMCls(fbias=-6.0), lambda: fseq(t=64), B, ("vanishing",), "auto"),
    ("kernels-list-he-12", OwnConvNet, img, H, (), "auto"),
    ("kernels-list-x0.5-12", lambda: OwnConvNet(gain=0.5), img, B, ("vanishing",), "auto"),
]


def main(names: list[str]) -> None:
    torch.set_num_threads(1)
    right = 0
    cases = [case for case in CASES if not names or case[0] in names]
    for name, build, data, healthy, expect, loss in cases:
        torch.manual_seed(0)
        start = time.time()
        report = gradcheck_cli.analyze(build(), data(), loss_fn=loss, steps=3)
        fails = bool(report.failing())
        errors = [f for f in report.findings if f.severity == "error"]
        warnings = [f for f in report.findings if f.severity == "warning"]
        good = (not fails) if healthy else (fails and bool({f.kind for f in errors} & set(expect)))
        right += good
        gain = report.signal.gain_per_layer
        print(
            f"{'ok ' if good else 'BAD'} {name:26s} {'healthy' if healthy else 'broken '} exit {int(fails)} "
            f"errors {len(errors):3d} warnings {len(warnings):3d} gain {gain and round(gain, 3)} "
            f"{time.time() - start:.1f}s"
        )
        for finding in (errors + warnings)[:3]:
            print(f"      {finding.severity} {finding.layer} {finding.kind} [{finding.view}] {finding.message[:110]}")
    print(f"{right} of {len(cases)} verdicts as labelled")


if __name__ == "__main__":
    main(sys.argv[1:])
