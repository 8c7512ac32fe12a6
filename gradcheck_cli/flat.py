"""Units that never leave their activation's flat region, whatever form the activation takes.

GELU, SiLU (the gate of SwiGLU), Mish, Hardswish and the ELU family pass almost no gradient deep in their
negative tails: GELU's derivative is -3.5e-8 at -6, SiLU's -0.012 (1% of its peak). A unit whose
pre-activation sits there for every example learns nothing, as a dead ReLU does, and when every unit of a
layer sits there no comparison among its own rows can see it. FlatWatch watches the first measured step's
forward (no extra forward of the user's code) under a TorchFunctionMode, so it sees these activations as
modules (nn.GELU, nn.SiLU), as functional calls (F.silu) and inside library code alike. Libraries also write
these activations as modules of their own that compose the formula from elementary ops (transformers'
NewGELUActivation, the tanh GELU of GPT-2; timm's Swish): such a module, found by its class name (MODULE_NAMES)
and holding no parameters, is evaluated itself, through its forward. For each call whose input is exactly a
layer's output, it evaluates the activation's derivative at every input value (autograd on
a copy) and marks the units with at least one value where the derivative reaches FLAT of the activation's
peak. A unit never so marked is dead.

Left out on purpose: ReLU-like functions (their dead units are measured in every step, diagnose/activation.py),
sigmoid and tanh (saturation, measured in every step) and softplus, which models use as a positivity transform
whose flat tail is the design (Mamba initialises dt so that softplus' derivative is 0.001-0.1).
"""

from __future__ import annotations

import math
import re
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

# The class names of library modules that compute one of these activations from elementary ops.
MODULE_NAMES = re.compile(r"gelu|silu|swish|mish", re.IGNORECASE)


def activation_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules of `model` that compute an activation FlatWatch cannot see as one call: a class whose name says
    it (MODULE_NAMES), with no parameters or children, from outside torch.nn (whose modules call F.gelu & co.)."""
    return [
        module
        for module in model.modules()
        if MODULE_NAMES.search(type(module).__name__)
        and not type(module).__module__.startswith("torch.")
        and next(module.parameters(), None) is None
        and next(module.children(), None) is None
    ]


@cache
def peak(func: Callable[..., Any], extra: tuple[Any, ...], options: tuple[tuple[str, Any], ...]) -> float:
    """The largest |f'(x)| over x in [-20, 20], for these arguments."""
    return _peak(func, extra, dict(options))


def _grid() -> torch.Tensor:
    """The inputs an activation's peak derivative is searched over: [-20, 20] in steps of 0.001."""
    return torch.linspace(-20.0, 20.0, 40001, dtype=torch.float64)


def _peak(func: Callable[..., Any], extra: tuple[Any, ...], options: dict[str, Any]) -> float:
    return float(_derivative(func, _grid(), extra, options).abs().max())


def _elementwise_peak(func: Callable[..., Any]) -> float:
    """_peak of a module's forward, or NaN where it is not elementwise (a gated unit that splits its input, say):
    an elementwise function commutes with reversing its input."""
    x = _grid()
    out = func(x)
    if not isinstance(out, torch.Tensor) or out.shape != x.shape or not torch.equal(func(x.flip(0)).flip(0), out):
        return math.nan
    return _peak(func, (), {})


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
        self._module_peaks: dict[int, float] = {}  # id(activation module) -> its derivative's peak, for this run

    def output(self, name: str, tensor: torch.Tensor) -> None:
        """The layer `name` returned `tensor`."""
        self._outputs[id(tensor)] = (weakref.ref(tensor), name)

    def module_input(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        """The activation module `module` (activation_modules) is called on `args`."""
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point or not x.numel():
            return
        entry = self._outputs.get(id(x))
        if entry is None or entry[0]() is not x:
            return
        with torch._C.DisableTorchFunction():  # the module's own ops are not the model's calls
            try:
                if id(module) not in self._module_peaks:
                    self._module_peaks[id(module)] = _elementwise_peak(module.forward)
                top = self._module_peaks[id(module)]
                if math.isfinite(top):
                    self._record(entry[1], type(module).__name__, module.forward, x, (), {}, top)
            except Exception:  # a forward that takes no 1-D tensor (any error of its own): not measured, and
                self._module_peaks[id(module)] = math.nan  # the model's own forward goes on untouched

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        kind = ACTIVATIONS.get(func)
        x = args[0] if args else kwargs.get("input")
        if kind is not None and isinstance(x, torch.Tensor) and x.dtype.is_floating_point and x.numel():
            entry = self._outputs.get(id(x))
            if entry is not None and entry[0]() is x:  # before the call: an in-place activation overwrites x
                options = {k: v for k, v in kwargs.items() if k not in ("input", "inplace")}
                try:
                    top = peak(func, tuple(args[1:]), tuple(sorted(options.items())))
                except (TypeError, RuntimeError):  # arguments that cannot key the cache: not measured
                    return func(*args, **kwargs)
                self._record(entry[1], kind, func, x, tuple(args[1:]), options, top)
        return func(*args, **kwargs)

    def _record(
        self,
        name: str,
        kind: str,
        func: Callable[..., Any],
        x: torch.Tensor,
        extra: tuple[Any, ...],
        options: dict[str, Any],
        top: float,
    ) -> None:
        try:
            usable = _derivative(func, x.float(), extra, options).abs() >= FLAT * top
        except (TypeError, RuntimeError):  # a tensor autograd cannot copy: not measured; the watch never breaks
            return  # the model's own forward
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
