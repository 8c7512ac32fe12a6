"""Unread layers: exactly zero gradient because nothing a layer computes reaches the loss, told apart from dead
layers by one replay of the first batch's forward per question (unread_parameters)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from gradcheck_cli.diagnose.common import all_zero
from gradcheck_cli.passes import Passes, Setup
from gradcheck_cli.report import Layer, ParameterRecord
from gradcheck_cli.restore import Restorer

# Candidates unread_parameters tries one by one, when redrawing them all at once changed the loss.
UNREAD_TRIES = 8


def unread_parameters(setup: Setup, layers: Sequence[Layer], parameters: Sequence[ParameterRecord]) -> set[str]:
    """Layers whose every gradient is exactly 0 because nothing they compute reaches the loss, though they are
    called and their output is used: a block that transforms every token where the head reads one class token
    (torchvision's MViT-v2: its last block's query pooling and relative positions act on the other tokens
    only). A dead layer differs in that its parameters do matter once what stops its gradient is changed: its
    own pre-activations, or the dead layers after it. So the model is first moved to a state where nothing of
    that stands: every zero tensor drawn at a default-init scale, and every layer with exactly zero gradient
    redrawn around its values at their own scale (dead units come on). There, each candidate's parameters are
    redrawn once more and the first batch's loss computed again (forward only, the same random draws for
    dropout); a loss that stays bit for bit the same says the layer is not read whatever the weights."""
    silent = [
        layer
        for layer in layers
        if layer.trainable_params and all_zero(layer) and not layer.gated and layer.forward_index is not None
    ]
    candidates = [
        layer
        for layer in silent
        if (layer.input_zero_fraction or 0.0) < 1.0  # a zero input is the layer before's finding
        and not (layer.type == "Embedding" and layer.output_grad_norm)
    ]
    if not candidates:
        return set()
    specs = {spec.name: spec for spec in setup.layers}
    named = dict(setup.model.named_parameters())
    zero = [named[p.name] for p in parameters if p.requires_grad and p.weight_norm == 0 and p.name in named]
    batch = setup.batches[0].to(setup.device)
    generator = torch.Generator(device=setup.device).manual_seed(0)
    passes = Passes(setup.runner, setup.loss, setup.device, setup.amp_dtype)

    def tensors(group: Sequence[Layer]) -> list[torch.Tensor]:
        return [p for layer in group for _, p in specs[layer.name].params if p.requires_grad]

    def loss() -> float:
        devices = [setup.device] if setup.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # with a graph: the loss checks that it has one
            torch.manual_seed(0)
            return float(passes.forward_loss(batch).detach())

    def same_without(group: Sequence[Layer]) -> bool:
        changed = tensors(group)
        saved = [tensor.detach().clone() for tensor in changed]
        with torch.no_grad():
            for tensor in changed:
                tensor.add_(_draw(tensor, generator))
        try:
            return loss() == reference
        finally:
            with torch.no_grad():
                for tensor, value in zip(changed, saved, strict=True):
                    tensor.copy_(value)

    with Restorer(setup.model, save_parameters=True):
        with torch.no_grad():
            for opened in zero:
                opened.copy_(_draw(opened, generator))
            for woken in tensors(silent):
                woken.add_(_draw(woken, generator))
        reference = loss()
        if not math.isfinite(reference):
            return set()
        if same_without(candidates):
            return {layer.name for layer in candidates}
        if len(candidates) > UNREAD_TRIES:
            return set()
        return {layer.name for layer in candidates if same_without([layer])}


def _draw(tensor: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Gaussian values at the tensor's own RMS plus 1/sqrt(fan-in) (1 for a vector)."""
    fan_in = tensor.numel() // tensor.shape[0] if tensor.dim() > 1 and tensor.shape[0] else 1
    scale = float(tensor.detach().float().square().mean().sqrt()) + fan_in**-0.5
    noise = torch.randn(tensor.shape, generator=generator, device=tensor.device, dtype=torch.float32)
    drawn: torch.Tensor = (noise * scale).to(tensor.dtype)
    return drawn
