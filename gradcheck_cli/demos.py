"""The 2017 tutorial's network ("Dificuldades no Treinamento de Redes Neurais") and its fixed twin.

sigmoid-mlp: 784-128-128-128-128-10, sigmoid hidden units, every weight N(0, 1) with no fan-in scaling, zero
biases, softmax cross-entropy, batch 128, SGD at lr 0.01: the tutorial's exact setup.
relu-he-mlp: the fixes the tutorial announces: ReLU units and He initialisation (kaiming_normal_).
dying-relu: relu-he-mlp trained (--train-steps 60 by default) with plain SGD at lr 1.0 (by default), 100 times
the tutorial's: the large steps push ReLU units' inputs below 0 for every example, and those units never get
a gradient again (the watched run shows the dead fraction rising and the step where it began).

Without a network, the data are synthetic digits with MNIST's pixel statistics: 28x28 pen strokes in [0, 1],
about 80% exact zeros, mean about 0.13 (MNIST: 0.1307, std 0.3081), ten classes each drawn from its own
stroke template with jitter. `--data` gives real MNIST instead: the folder of torchvision's MNIST/raw idx
files, or a .safetensors file with `inputs` (N, 784) and `targets`.
"""

from __future__ import annotations

import gzip
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

    def __init__(self, activation: Callable[[], nn.Module], init: Callable[[torch.Tensor], object]) -> None:
        super().__init__()
        modules: OrderedDict[str, nn.Module] = OrderedDict()
        widths = TUTORIAL_WIDTHS
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


@dataclass(frozen=True)
class Demo:
    name: str
    summary: str
    build: Callable[[], nn.Module]
    # settings the demo is about, used unless the command line changes them from their defaults
    settings: tuple[tuple[str, object], ...] = ()


# dying-relu: a step 100x the tutorial's (lr 0.01): measured on the synthetic digits, most units of every hidden
# layer die within the first ten steps, where at lr 0.05 none does.
DYING_LR = 1.0
DYING_STEPS = 60
_BUILDERS: dict[str, tuple[Callable[[], nn.Module], tuple[tuple[str, object], ...]]] = {
    "sigmoid-mlp": (sigmoid_mlp, ()),
    "relu-he-mlp": (relu_he_mlp, ()),
    "dying-relu": (relu_he_mlp, (("train_steps", DYING_STEPS), ("lr", DYING_LR))),
}
DEMOS = {name: Demo(name, DEMO_SUMMARIES[name], build, settings) for name, (build, settings) in _BUILDERS.items()}


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
    return run(
        model, batches, "cross-entropy", options, target=f"demo {name}", notes=[f"data: {source}"], progress=progress
    )


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
