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


def check_model(model: nn.Module) -> None:
    """Refuse, with the reason, a model the passes cannot measure: one line instead of a traceback from deep in
    the hooks or the statistics."""
    if isinstance(model, torch.jit.ScriptModule):
        raise UserError(
            f"the model is a TorchScript module ({type(model).__name__}): forward and backward hooks cannot be "
            "registered on it",
            "give gradcheck the nn.Module before torch.jit.script / torch.jit.trace",
        )
    for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, tensor in named:
            if tensor.is_meta:
                raise UserError(
                    f"{kind} {name or '(model)'} is on the meta device: it has a shape but no values",
                    "materialise the model first (model.to_empty(device='cpu') and initialise it, or load "
                    "weights with --weights)",
                )
            if tensor.is_complex():
                raise UserError(
                    f"{kind} {name or '(model)'} is complex ({str(tensor.dtype).removeprefix('torch.')}): "
                    "gradcheck measures real-valued parameters",
                    "keep complex values inside forward: real parameters viewed with torch.view_as_complex",
                )
