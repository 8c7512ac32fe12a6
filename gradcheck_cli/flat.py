"""Units that never leave their activation's flat region, whatever form the activation takes.

GELU, SiLU (the gate of SwiGLU), Mish, Hardswish and the ELU family pass almost no gradient deep in their
negative tails: GELU's derivative is -3.5e-8 at -6, SiLU's -0.012 (1% of its peak). A unit whose
pre-activation sits there for every example learns nothing, as a dead ReLU does, and when every unit of a
layer sits there no comparison among its own rows can see it. FlatWatch watches the first measured step's
forward (no extra forward of the user's code) under a TorchFunctionMode, so it sees these activations as
modules (nn.GELU, nn.SiLU), as functional calls (F.silu) and inside library code alike. For each call whose
input is exactly a layer's output, it evaluates the activation's derivative at every input value (autograd on
a copy) and marks the units with at least one value where the derivative reaches FLAT of the activation's
peak. A unit never so marked is dead.

Left out on purpose: ReLU-like functions (their dead units are measured in every step, diagnose/activation.py),
sigmoid and tanh (saturation, measured in every step) and softplus, which models use as a positivity transform
whose flat tail is the design (Mamba initialises dt so that softplus' derivative is 0.001-0.1).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

# A unit passes a usable gradient where the activation's derivative is at least this fraction of its peak: the
# same 5% that marks a saturated sigmoid/tanh input (diagnose/thresholds.py, saturation).
FLAT = 0.05
ACTIVATIONS: dict[Callable[..., Any], str] = {
    F.gelu: "gelu",
    F.silu: "silu",
    F.mish: "mish",
    F.hardswish: "hardswish",
    F.elu: "elu",
    F.celu: "celu",
    F.selu: "selu",
}


@cache
def peak(func: Callable[..., Any], extra: tuple[Any, ...], options: tuple[tuple[str, Any], ...]) -> float:
    """The largest |f'(x)| over x in [-20, 20], for these arguments."""
    x = torch.linspace(-20.0, 20.0, 40001, dtype=torch.float64)
    return float(_derivative(func, x, extra, dict(options)).abs().max())


def _derivative(
    func: Callable[..., Any], x: torch.Tensor, extra: tuple[Any, ...], options: dict[str, Any]
) -> torch.Tensor:
    with torch.enable_grad():
        copy = x.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(func(copy, *extra, **options).sum(), copy)
    return grad


class FlatWatch(TorchFunctionMode):
    """Inside the mode: per layer, which units ever left the flat region of the activation applied to its output."""

    def __init__(self, unit_dims: dict[str, int]) -> None:
        super().__init__()
        self.unit_dims = unit_dims  # layer name -> the dimension of its output that indexes units
        self.active: dict[str, torch.Tensor] = {}  # layer name -> bool per unit: left the flat region somewhere
        self.activation: dict[str, str] = {}
        self._outputs: dict[int, tuple[weakref.ref[torch.Tensor], str]] = {}

    def output(self, name: str, tensor: torch.Tensor) -> None:
        """The layer `name` returned `tensor`."""
        self._outputs[id(tensor)] = (weakref.ref(tensor), name)

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        kind = ACTIVATIONS.get(func)
        x = args[0] if args else kwargs.get("input")
        if kind is not None and isinstance(x, torch.Tensor) and x.dtype.is_floating_point and x.numel():
            entry = self._outputs.get(id(x))
            if entry is not None and entry[0]() is x:  # before the call: an in-place activation overwrites x
                options = {k: v for k, v in kwargs.items() if k not in ("input", "inplace")}
                self._record(entry[1], kind, func, x, tuple(args[1:]), options)
        return func(*args, **kwargs)

    def _record(
        self,
        name: str,
        kind: str,
        func: Callable[..., Any],
        x: torch.Tensor,
        extra: tuple[Any, ...],
        options: dict[str, Any],
    ) -> None:
        try:
            limit = FLAT * peak(func, extra, tuple(sorted(options.items())))
            usable = _derivative(func, x.float(), extra, options).abs() >= limit
        except (TypeError, RuntimeError):  # arguments that cannot key the cache, a tensor autograd cannot copy:
            return  # not measured; the watch never breaks the model's own forward
        dim = self.unit_dims.get(name, -1) % x.dim() if x.dim() else 0
        others = [d for d in range(x.dim()) if d != dim]
        per_unit = usable.amax(dim=others) if others else usable
        seen = self.active.get(name)
        if seen is not None and seen.shape != per_unit.shape:
            return  # the same layer read with another unit count: not one set of units
        self.active[name] = per_unit if seen is None else seen | per_unit
        self.activation[name] = kind


def flat_units(watch: FlatWatch) -> dict[str, tuple[float, int, str]]:
    """layer name -> (fraction of its units that never left the flat region, the unit count, the activation),
    for the layers where some unit stayed flat. One host read for all layers, once per run."""
    names = list(watch.active)
    if not names:
        return {}
    counts = torch.stack([watch.active[name].logical_not().sum() for name in names]).tolist()
    return {
        name: (flat / watch.active[name].numel(), watch.active[name].numel(), watch.activation[name])
        for name, flat in zip(names, counts, strict=True)
        if flat
    }
