"""Where the passes run: --device auto|cpu|cuda, checked once."""

from __future__ import annotations

import torch
from torch import nn

from gradcheck_cli.errors import UserError


def wants_cuda(device: str | torch.device | None) -> bool:
    """Whether a device choice means a CUDA GPU ("auto": when one is available); UserError if it asks for one
    that is not there."""
    wanted = str(device) if device is not None else "auto"
    if wanted == "auto":
        return torch.cuda.is_available()
    if wanted.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is available", "use --device cpu or auto")
    return wanted.startswith("cuda")


def resolve_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    """The device to run on; None keeps the model where it is."""
    if device is None:
        first = next(model.parameters(), None)
        return first.device if first is not None else torch.device("cpu")
    if str(device) == "auto":
        return torch.device("cuda" if wants_cuda(device) else "cpu")
    wants_cuda(device)
    return torch.device(device)
