"""What the first measured step's forward shows besides the gradients, watched as it runs (no extra forward of
the user's code, its hooks and RNG untouched): units in an activation's flat region (flat.py) and each layer's
depth in the graph (depth.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from gradcheck_cli.depth import GraphDepth
from gradcheck_cli.diagnose.signal import SIGNAL_CATEGORIES
from gradcheck_cli.flat import FlatWatch, activation_modules

if TYPE_CHECKING:
    from gradcheck_cli.layers import LayerSpec
    from gradcheck_cli.probe import Probe


@dataclass
class FirstStep:
    flat: FlatWatch
    depth: GraphDepth


@contextlib.contextmanager
def watching(model: torch.nn.Module, layers: Sequence[LayerSpec], probe: Probe | None = None) -> Iterator[FirstStep]:
    """Both watches over the passes run inside, fed by one forward hook per layer (and a pre-hook per activation
    module that composes its formula from elementary ops, flat.activation_modules); a matrix no module applies
    (LayerSpec.functional) by the probe's calls of it instead."""
    from gradcheck_cli.batch import first_tensor

    watch = FirstStep(
        FlatWatch({spec.name: 1 if spec.category == "conv" else -1 for spec in layers}),
        GraphDepth(spec.name for spec in layers if spec.category in SIGNAL_CATEGORIES),
    )

    def learned(spec: LayerSpec) -> None:
        # a bare matrix, or an `other` module's, is the kind it was applied as (probe.Probe.category), known by
        # the time its call returns: a kernel applied by F.conv2d has its units along dim 1
        if probe is not None and (spec.functional or spec.category == "other"):
            watch.flat.unit_dims[spec.name] = 1 if probe.category(spec.index) == "conv" else -1

    def hook_for(spec: LayerSpec) -> Callable[..., None]:
        name = spec.name

        def hook(module: torch.nn.Module, args: object, kwargs: object, output: object) -> None:
            watch.depth.called(name, (args, kwargs), output)
            out = first_tensor(output)
            if out is not None:
                learned(spec)
                watch.flat.output(name, out)

        return hook

    hooked = [spec for spec in layers if not spec.functional]
    handles = [spec.module.register_forward_hook(hook_for(spec), with_kwargs=True) for spec in hooked]
    handles += [module.register_forward_pre_hook(watch.flat.module_input) for module in activation_modules(model)]
    bare = {spec.index: spec for spec in layers if spec.functional}

    def functional(index: int, inputs: torch.Tensor | None, output: torch.Tensor) -> None:
        spec = bare[index]
        watch.depth.called(spec.name, ((inputs,), {}), output)
        learned(spec)
        watch.flat.output(spec.name, output)

    listeners = probe.also_on_call if probe is not None and bare else []
    listeners.append(functional)
    try:
        with watch.flat:
            yield watch
    finally:
        for handle in handles:
            handle.remove()
        listeners.remove(functional)
        watch.depth.release()
