"""Model-hub targets: `hf:ID_OR_DIR`, `timm:NAME`, `torchvision:NAME`, built by their own libraries (optional
extras) with inputs synthesised from the model's own configuration, and never a network access.

    hf:path/to/dir      a directory with config.json (and weights, unless --from-config)
    hf:org/name         the same, found in the local Hugging Face cache (HF_HUB_CACHE, HF_HOME/hub)
    timm:resnet18       timm.create_model(NAME, pretrained=False)
    torchvision:vit_b_16  torchvision.models.get_model(NAME, weights=None)

A hub prefix is read before TARGET's other forms: `hf:x` is the hub, not the attribute x of a module hf.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any

from gradcheck_cli.errors import UserError, first_line

if TYPE_CHECKING:
    from torch import nn

    from gradcheck_cli.batch import Batches
    from gradcheck_cli.options import Options

PREFIXES = ("hf", "timm", "torchvision")
# the extra that installs each library, for the one-line error without it
EXTRAS = {"transformers": "hf", "timm": "timm", "torchvision": "torchvision", "peft": "peft"}


@dataclass(frozen=True)
class HubTarget:
    hub: str  # hf | timm | torchvision
    name: str  # the id, directory or architecture name

    @property
    def label(self) -> str:
        return f"{self.hub}:{self.name}"


def parse_hub(spec: str) -> HubTarget | None:
    """`hf:...`, `timm:...`, `torchvision:...`, or None for the other TARGET forms."""
    head, sep, tail = spec.strip().partition(":")
    if not sep or head not in PREFIXES:
        return None
    if not tail.strip():
        raise UserError(f"TARGET '{spec}' names no model after '{head}:'", f"write e.g. {_example(head)}")
    return HubTarget(head, tail.strip())


def _example(hub: str) -> str:
    return {"hf": "hf:path/to/checkpoint or hf:org/name", "timm": "timm:resnet18"}.get(hub, "torchvision:resnet18")


@dataclass
class Built:
    """A hub model, and what it takes: a function making `count` synthetic batches for it (None: --data)."""

    model: nn.Module
    make_batches: Callable[[int, int, int], Batches] | None  # (count, batch_size, seed) -> batches
    description: str  # how the inputs are made, for the report's notes
    notes: list[str] = field(default_factory=list)
    directory: Any = None  # hf: the model's directory, whose tokenizer --data FILE.txt uses
    sequence_length: int = 0


def build(target: HubTarget, options: Options) -> Built:
    if target.hub == "hf":
        from gradcheck_cli.hub.hf import build_hf

        return build_hf(target.name, options)
    from gradcheck_cli.hub.vision import build_timm, build_torchvision

    if options.task not in (None, "image-cls"):
        raise UserError(f"--task {options.task} does not apply to {target.hub}: models", "drop --task")
    if options.adapter is not None:
        raise UserError("--adapter loads PEFT adapters onto hf: models", "use an hf: TARGET, or drop --adapter")
    return build_timm(target.name) if target.hub == "timm" else build_torchvision(target.name)


def library(name: str) -> ModuleType:
    """Import an optional extra, or exit 2 with its install line. torchvision first, made importable: the
    others import it when it is installed (see import_torchvision)."""
    if not _installed(name):
        raise UserError(f"this needs {name}, which is not installed", f'pip install "gradcheck-cli[{EXTRAS[name]}]"')
    try:
        if _installed("torchvision"):
            torchvision = import_torchvision()
            if name == "torchvision":
                return torchvision
        return importlib.import_module(name)
    except (ImportError, RuntimeError, OSError) as exc:
        raise UserError(
            f"{name} is installed but does not import: {first_line(exc)}",
            f'reinstall it: pip install --force-reinstall "gradcheck-cli[{EXTRAS[name]}]"',
        ) from exc


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a module set to None in sys.modules, a broken parent package
        return False


def import_torchvision() -> ModuleType:
    """torchvision's models are pure Python; a wheel built for another torch (a CUDA wheel beside a CPU torch)
    fails to load its compiled ops, and its import fails on registering fakes for two of them. Defining those
    two op schemas first lets the models import (they never call the ops)."""
    import torch

    try:
        return importlib.import_module("torchvision")
    except (RuntimeError, OSError):
        for loaded in [m for m in sys.modules if m.startswith("torchvision")]:
            del sys.modules[loaded]
    for op in ("nms", "qnms"):
        with contextlib.suppress(RuntimeError):  # already defined
            torch.library.define(f"torchvision::{op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    return importlib.import_module("torchvision")
