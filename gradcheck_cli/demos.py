"""The 2017 tutorial's network ("Dificuldades no Treinamento de Redes Neurais"), its fixed twin, and deep
relatives whose verdict theory gives: the CI gate failing and passing.

sigmoid-mlp: 784-128-128-128-128-10, sigmoid hidden units, every weight N(0, 1) with no fan-in scaling, zero
biases, softmax cross-entropy, batch 128, SGD at lr 0.01: the tutorial's exact setup.
relu-he-mlp: the fixes the tutorial announces: ReLU units and He initialisation (kaiming_normal_).
dying-relu: relu-he-mlp trained (--train-steps 60 by default) with plain SGD at lr 1.0 (by default), 100 times
the tutorial's: the large steps push ReLU units' inputs below 0 for every example, and those units never get
a gradient again (the watched run shows the dead fraction rising and the step where it began).

The CI gate, by theory: 784-128x20-10 nets with zero biases, whose per-layer gain mean-field theory gives
(Poole et al. 2016, Schoenholz et al. 2017). With weights N(0, sw2/fan_in) on square layers, the pre-activation
variance settles at the fixed point q* of q = sw2 E[phi(h)^2] (h ~ N(0, q)), and each layer multiplies the
backpropagated ||dL/dz||^2 by chi1 = sw2 E[phi'(h)^2]: ||dL/dz|| changes by sqrt(chi1) per layer.
deep-sigmoid: the tutorial's sigmoid units with Glorot (xavier_normal_, sw2 = 1 on square layers):
sigmoid' <= 1/4, so chi1 <= 1/16; at q* = 0.265, chi1 = 0.056 and the gain is 0.236, so the 20 steps of the
chain of 21 linear layers shrink dL/dz by 0.236^20 = 3e-13 (why Glorot & Bengio 2010 found deep sigmoid nets
hard to train). Exit 1: far past the signal view's error factor (400).
exploding-relu: ReLU with N(0, 4/fan_in), twice He's variance: relu'^2 is 1 on half of N(0, q) at any q, so
chi1 = sw2 / 2 = 2 and dL/dz grows by sqrt(2) per layer, 2^10 = 1024 over the 20 steps. Exit 1.
deep-relu-he: the fix of both, ReLU with He's N(0, 2/fan_in): chi1 = 1 exactly (He et al. 2015). Exit 0.

Without a network, the data are synthetic digits with MNIST's pixel statistics: 28x28 pen strokes in [0, 1],
about 80% exact zeros, mean about 0.13 (MNIST: 0.1307, std 0.3081), ten classes each drawn from its own
stroke template with jitter. `--data` gives real MNIST instead: the folder of torchvision's MNIST/raw idx
files, or a .safetensors file with `inputs` (N, 784) and `targets`.
"""

from __future__ import annotations

import gzip
import math
import struct
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from gradcheck_cli.batch import Batch
from gradcheck_cli.demo_names import DEMO_SUMMARIES
from gradcheck_cli.errors import UserError

if TYPE_CHECKING:
    from gradcheck_cli.options import Options
    from gradcheck_cli.passes import Progress
    from gradcheck_cli.report import Report

TUTORIAL_WIDTHS = (784, 128, 128, 128, 128, 10)
TUTORIAL_BATCH = 128


class TutorialMLP(nn.Module):
    """784-128-128-128-128-10 with one activation type; layers named fc1..fc4 and out as in the tutorial."""

    def __init__(
        self,
        activation: Callable[[], nn.Module],
        init: Callable[[torch.Tensor], object],
        widths: tuple[int, ...] = TUTORIAL_WIDTHS,
    ) -> None:
        super().__init__()
        modules: OrderedDict[str, nn.Module] = OrderedDict()
        for i in range(len(widths) - 2):
            modules[f"fc{i + 1}"] = nn.Linear(widths[i], widths[i + 1])
            modules[f"act{i + 1}"] = activation()
        modules["out"] = nn.Linear(widths[-2], widths[-1])
        self.net = nn.Sequential(modules)
        for module in self.net:
            if isinstance(module, nn.Linear):
                init(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))  # type: ignore[no-any-return]


def sigmoid_mlp() -> TutorialMLP:
    """The tutorial's network: sigmoid units, weights N(0, 1) (no fan-in scaling), zero biases."""
    return TutorialMLP(nn.Sigmoid, lambda w: nn.init.normal_(w, 0.0, 1.0))


def relu_he_mlp() -> TutorialMLP:
    """The announced fix: ReLU units, He initialisation N(0, 2/fan_in), zero biases."""
    return TutorialMLP(nn.ReLU, lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu"))


DEEP_WIDTHS = (784, *(128,) * 20, 10)  # the tutorial's width and input, 20 hidden layers


class DeepMLP(TutorialMLP):
    """784-128x20-10, fc1..fc20 and out: the tutorial's net made deep, for the demos theory labels."""

    def __init__(self, activation: Callable[[], nn.Module], init: Callable[[torch.Tensor], object]) -> None:
        super().__init__(activation, init, DEEP_WIDTHS)


def deep_sigmoid() -> DeepMLP:
    """Sigmoid units with Glorot's N(0, 2/(fan_in + fan_out)): weight variance 1/fan_in on square layers."""
    return DeepMLP(nn.Sigmoid, nn.init.xavier_normal_)


def exploding_relu() -> DeepMLP:
    """ReLU units with N(0, 4/fan_in): twice He's variance."""
    return DeepMLP(nn.ReLU, lambda w: nn.init.normal_(w, 0.0, math.sqrt(4.0 / w.shape[1])))


def deep_relu_he() -> DeepMLP:
    """ReLU units with He's N(0, 2/fan_in): the fix of deep-sigmoid (the tutorial's) and of exploding-relu."""
    return DeepMLP(nn.ReLU, lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu"))


@dataclass(frozen=True)
class MeanField:
    """Mean-field theory's per-layer gain of ||dL/dz|| for a deep stack of square layers with weights
    N(0, weight_variance / fan_in) and zero biases (Poole et al. 2016; Schoenholz et al. 2017)."""

    activation: str  # "sigmoid" or "relu"
    weight_variance: float  # sw2
    twin: str  # a note on the fixed twin, or on what this demo fixes

    def chi1(self) -> float:
        """The factor of ||dL/dz||^2 per layer: sw2 E[phi'(h)^2], h ~ N(0, q*)."""
        if self.activation == "relu":
            return self.weight_variance / 2  # relu'(h)^2 is 1 on half of N(0, q) at any q (He et al. 2015)
        return self.weight_variance * gaussian_mean(lambda h: _sigmoid_slope(h) ** 2, self.fixed_point())

    def fixed_point(self) -> float:
        """q* of q = sw2 E[sigmoid(h)^2], h ~ N(0, q): the variance every layer's pre-activations settle at."""
        variance = 1.0
        for _ in range(100):  # a contraction for sw2 = 1: converged to 1e-12 within 30 steps
            variance = self.weight_variance * gaussian_mean(lambda h: _sigmoid(h) ** 2, variance)
        return variance

    def notes(self, measured: float | None) -> list[str]:
        """Theory's gain beside the measured one, and the twin."""
        chi1 = self.chi1()
        regime = "vanishing" if chi1 < 0.99 else "exploding" if chi1 > 1.01 else "critical"
        seen = "not fitted" if measured is None else f"x{measured:.3g}"
        theory = (
            f"theory (mean field): {self.activation}, weights N(0, {self.weight_variance:g}/fan_in): chi1 = "
            f"{chi1:.3g}, so ||dL/dz|| x{math.sqrt(chi1):.3g} per layer toward the input ({regime}); measured {seen}"
        )
        return [theory, self.twin]


def gaussian_mean(f: Callable[[float], float], variance: float, intervals: int = 400) -> float:
    """E[f(h)] for h ~ N(0, variance): Simpson's rule over +-10 standard deviations (the tails beyond weigh
    below 1e-22)."""
    step = 20.0 / intervals
    total = 0.0
    for i in range(intervals + 1):
        z = -10.0 + i * step
        weight = 1 if i in (0, intervals) else 4 if i % 2 else 2
        total += weight * f(math.sqrt(variance) * z) * math.exp(-z * z / 2)
    return total * step / 3 / math.sqrt(2 * math.pi)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _sigmoid_slope(x: float) -> float:
    return _sigmoid(x) * (1.0 - _sigmoid(x))


@dataclass(frozen=True)
class Demo:
    name: str
    summary: str
    build: Callable[[], nn.Module]
    # settings the demo is about, used unless the command line changes them from their defaults
    settings: tuple[tuple[str, object], ...] = ()
    theory: MeanField | None = None  # printed as a note beside the measured gain


# dying-relu: a step 100x the tutorial's (lr 0.01): measured on the synthetic digits, most units of every hidden
# layer die within the first ten steps, where at lr 0.05 none does.
DYING_LR = 1.0
DYING_STEPS = 60
_FIXED_TWIN = "fixed twin: gradcheck demo deep-relu-he (nn.ReLU with nn.init.kaiming_normal_: chi1 = 1)"
_BUILDERS: dict[str, tuple[Callable[[], nn.Module], tuple[tuple[str, object], ...], MeanField | None]] = {
    "sigmoid-mlp": (sigmoid_mlp, (), None),
    "relu-he-mlp": (relu_he_mlp, (), None),
    "dying-relu": (relu_he_mlp, (("train_steps", DYING_STEPS), ("lr", DYING_LR)), None),
    "deep-sigmoid": (
        deep_sigmoid,
        (),
        MeanField("sigmoid", 1.0, _FIXED_TWIN + "; at Glorot's scale, sigmoid' <= 1/4 caps the gain at 1/4"),
    ),
    "exploding-relu": (exploding_relu, (), MeanField("relu", 4.0, _FIXED_TWIN)),
    "deep-relu-he": (
        deep_relu_he,
        (),
        MeanField("relu", 2.0, "the fixed twin of gradcheck demo deep-sigmoid and exploding-relu"),
    ),
}
DEMOS = {
    name: Demo(name, DEMO_SUMMARIES[name], build, settings, theory)
    for name, (build, settings, theory) in _BUILDERS.items()
}


def run_demo(name: str, options: Options, mnist: Path | None, progress: Progress | None = None) -> Report:
    """`gradcheck demo NAME`: the demo's network on MNIST-like digits (or real MNIST from `mnist`)."""
    from gradcheck_cli.api import run

    chosen = get_demo(name)
    options = _with_demo_settings(options, chosen)
    torch.manual_seed(options.seed)  # the demo's N(0, 1) weights are part of what is reproduced
    count = options.steps + options.train_steps
    if mnist is not None:
        batches, source = mnist_batches(mnist, count), f"MNIST from {mnist}"
    else:
        batches, source = synthetic_digits(count, options.seed), "synthetic MNIST-like digits (no download)"
    model = chosen.build()
    report = run(
        model, batches, "cross-entropy", options, target=f"demo {name}", notes=[f"data: {source}"], progress=progress
    )
    if chosen.theory is not None:
        report.notes += chosen.theory.notes(report.signal.gain_per_layer)
    return report


def _with_demo_settings(options: Options, demo: Demo) -> Options:
    """The demo's own settings where the options still hold their defaults (a flag given wins)."""
    import dataclasses

    from gradcheck_cli.options import Options

    defaults = Options()
    changes: dict[str, Any] = {
        key: value for key, value in demo.settings if getattr(options, key) == getattr(defaults, key)
    }
    return dataclasses.replace(options, **changes) if changes else options


def get_demo(name: str) -> Demo:
    demo = DEMOS.get(name)
    if demo is None:
        raise UserError(f"unknown demo '{name}'", f"choose one of: {', '.join(DEMOS)} (gradcheck demo --list)")
    return demo


# -- data -------------------------------------------------------------------------------------------------


def synthetic_digits(count: int, seed: int, batch_size: int = TUTORIAL_BATCH) -> list[Batch]:
    """`count` batches of MNIST-like 28x28 digits (flattened to 784), labels 0..9."""
    generator = torch.Generator().manual_seed(seed)
    templates = _stroke_templates(generator)
    return [_digit_batch(templates, batch_size, generator) for _ in range(count)]


STROKE_POINTS = 24  # pen positions per template
PEN_WIDTH = 1.1  # Gaussian brush sigma, pixels
INK_FLOOR = 0.12  # ink below this is paper: exact 0, as MNIST's background


def _stroke_templates(generator: torch.Generator) -> torch.Tensor:
    """Ten smooth pen paths (10, STROKE_POINTS, 2) inside the central 20x20 box, as MNIST centres digits."""
    angles = torch.cumsum(torch.randn(10, STROKE_POINTS, generator=generator) * 0.5, dim=1)
    steps = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1) * 1.1
    paths = torch.cumsum(steps, dim=1)
    paths = paths - paths.mean(dim=1, keepdim=True)
    scale = 8.0 / paths.abs().amax(dim=(1, 2), keepdim=True).clamp_min(1e-6)
    return paths * scale + 13.5


def _digit_batch(templates: torch.Tensor, size: int, generator: torch.Generator) -> Batch:
    labels = torch.randint(0, 10, (size,), generator=generator)
    paths = templates[labels]
    paths = paths + torch.randn(size, 1, 2, generator=generator) * 1.0  # shift
    paths = paths + torch.randn(paths.shape, generator=generator) * 0.6  # handwriting wobble
    coords = torch.arange(28, dtype=torch.float32)
    grid_y, grid_x = torch.meshgrid(coords, coords, indexing="ij")
    grid = torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=-1)  # (784, 2)
    distance = torch.cdist(grid.expand(size, -1, -1), paths)  # (size, 784, points)
    ink = torch.exp(-(distance**2) / (2 * PEN_WIDTH**2)).sum(dim=-1)
    ink = ink * (0.8 + 0.4 * torch.rand(size, 1, generator=generator))
    images = ink.clamp(0.0, 1.0)
    images = torch.where(images < INK_FLOOR, torch.zeros_like(images), images)
    return Batch((images,), {}, labels)


def mnist_batches(path: Path, count: int, batch_size: int = TUTORIAL_BATCH) -> list[Batch]:
    """Real MNIST: torchvision's raw idx files (a folder) or a .safetensors file with inputs and targets."""
    if path.is_dir():
        images, labels = _read_idx_folder(path)
    elif path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path))
        except Exception as exc:
            raise UserError(f"{path.name} is not a readable safetensors file", "write it with save_file") from exc
        if "inputs" not in tensors or "targets" not in tensors:
            raise UserError(f"{path.name} needs tensors 'inputs' and 'targets'", "save MNIST images and labels")
        images, labels = tensors["inputs"], tensors["targets"]
    elif not path.exists():
        raise UserError(f"MNIST data not found: {path}", "give torchvision's MNIST/raw folder or a .safetensors file")
    else:
        raise UserError(
            f"cannot read MNIST from {path.name}",
            "give torchvision's MNIST/raw folder or a .safetensors file",
        )
    images = images.reshape(images.shape[0], -1).float()
    if images.shape[1] != 784:
        raise UserError(f"MNIST images must have 784 pixels, got {images.shape[1]}", "give 28x28 images")
    if images.max() > 1.0:
        images = images / 255.0  # the tutorial scales pixels to [0, 1], no standardisation
    total = images.shape[0]
    batches = []
    for step in range(count):
        start = (step * batch_size) % max(1, total - batch_size + 1)
        batches.append(Batch((images[start : start + batch_size],), {}, labels[start : start + batch_size].long()))
    return batches


def _read_idx_folder(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    def find(stem: str) -> Path:
        for candidate in (
            folder / stem,
            folder / f"{stem}.gz",
            folder / "raw" / stem,
            folder / "raw" / f"{stem}.gz",
        ):
            if candidate.exists():
                return candidate
        raise UserError(f"{folder} has no {stem}[.gz]", "give torchvision's MNIST/raw folder")

    return _read_idx(find("train-images-idx3-ubyte")), _read_idx(find("train-labels-idx1-ubyte"))


def _read_idx(path: Path) -> torch.Tensor:
    """The idx format of LeCun's MNIST files: magic (0, 0, type 0x08, ndim), big-endian dims, uint8 data."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise UserError(f"{path.name} is not an idx file of unsigned bytes", "use the original MNIST files")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = raw[4 + 4 * ndim :]
    expected = 1
    for d in dims:
        expected *= d
    if len(data) != expected:
        raise UserError(f"{path.name} is truncated", "download the MNIST files again")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).reshape(dims)
