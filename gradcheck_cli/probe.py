"""Hooks: the only module that touches the user's model while it runs.

`Probe` is a context manager. On entry it registers
- a forward hook on every module that directly owns parameters: it counts calls, notes the forward order,
  measures the module's input, and registers a tensor hook on the module's output to capture dL/dz;
- a forward pre-hook on every ReLU / sigmoid / tanh module: it measures dead and saturated units.
On exit it removes every handle it registered, whatever happened in between.

Why tensor hooks on outputs rather than module full-backward hooks: full-backward hooks wrap outputs in views,
so in-place ops downstream (ReLU(inplace=True), `x += shortcut`) raise errors (pytorch #61519), and they warn
when no input requires grad (pytorch #100528). A hook registered on the output tensor sees dL/dz for the value
the module produced, even when it is later modified in place.

Hooks only do constant work: a few reductions that stay on the device. The host reads everything once per
step (collect.Collector.collect).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from types import TracebackType
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from gradcheck_cli.batch import first_tensor
from gradcheck_cli.functional import MatmulWatch, owned, watched
from gradcheck_cli.layers import DEAD_TYPES, SATURATION_LIMITS, LayerSpec
from gradcheck_cli.reduce import count_subnormal, sample, square_norm
from gradcheck_cli.tape import StepTape


class Probe:
    """Hooks for one analysis; use as `with Probe(model, layers) as probe:`.

    Between `start_step()` and the end of backward, `tape` collects the step's raw device tensors.
    `ever_active[layer]` (bool per unit, on the device) accumulates over all steps.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: list[LayerSpec],
        amp_tiny: float | None = None,
    ) -> None:
        self.model = model
        self.parameters = list(model.parameters())  # listed once: the measured steps clear their gradients
        self.amp_tiny = amp_tiny
        self.layers = layers
        self.tape = StepTape()
        self.ever_active: dict[int, torch.Tensor] = {}
        # Layers whose output went straight into a normalisation layer: scale-invariant, see diagnose.
        self.feeds_norm: set[int] = set()
        # The last hooked module's output, weakly: a strong reference would keep the model's final output
        # (a language model's logits: often the step's largest tensor) alive through the whole backward.
        self._last_output: weakref.ref[torch.Tensor] | None = None
        # and the autograd node that made it: an activation that saves only its result (ReLU) frees that tensor,
        # but its node still points to this one
        self._last_node: Any = None
        self._handles: list[RemovableHandle] = []
        self._last_layer: int | None = None
        self._layer_category = {spec.index: spec.category for spec in layers}
        # BatchNorm layers: the fewest values one of their channels was normalised over in a call with batch
        # statistics (batch x positions), counted in the first step only (take_norm_values)
        self._batch_norms = {spec.index for spec in layers if isinstance(spec.module, nn.modules.batchnorm._BatchNorm)}
        self.norm_values: dict[int, int] = {}
        self._recording = False
        # matrices no module applies (functional.py): watched through the functions they are passed to, each
        # call handled as its layer's forward hook; `used_as` what they were applied as (linear or conv)
        self._functional = watched(layers)
        # the matrices of `other` modules, watched in the first step only: what they were applied as, if anything
        matrices = owned(layers)
        self._owners = {index for index, _ in matrices.values()}
        self._functional |= matrices
        self._functional_hooks: dict[int, Callable[[nn.Module | None, Any, Any], None]] = {}
        self._matmuls: MatmulWatch | None = None
        self.used_as: dict[int, str] = {}
        self.also_on_call: list[Callable[[int, torch.Tensor | None, torch.Tensor], None]] = []  # firststep.py

    def __enter__(self) -> Probe:
        try:
            for spec in self.layers:
                if spec.module is self.model or spec.functional:
                    # The root's "output gradient" would be dL/d(model output): not a layer's. Skip it. A bare
                    # matrix's calls come through MatmulWatch (start_step), not its owner's hooks.
                    continue
                self._handles.append(spec.module.register_forward_hook(self._forward_hook(spec.index)))
            for module in self.model.modules():
                hook = self._activation_hook(module)
                if hook is not None:
                    self._handles.append(module.register_forward_pre_hook(hook))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook this probe registered (also those registered before a failure)."""
        while self._handles:
            self._handles.pop().remove()

    def start_step(self) -> None:
        self.tape = StepTape()
        self._last_layer = None
        self._last_output = self._last_node = None
        self._recording = True
        if self._functional:
            self._matmuls = MatmulWatch(self._functional, self._functional_call)
            self._matmuls.__enter__()  # type: ignore[no-untyped-call]  # left in stop_step

    def stop_step(self) -> None:
        self._recording = False
        self._last_output = self._last_node = None
        if self._matmuls is not None:
            self._matmuls.__exit__(None, None, None)  # type: ignore[no-untyped-call]
            self._matmuls = None
            # The steps after the first run without watching `other` modules' matrices (what they were applied
            # as is known), and without the watch at all when no bare matrix was applied (a positional table
            # added to the input): it costs a Python call per torch function.
            bare = {key: value for key, value in self._functional.items() if value[0] not in self._owners}
            self._functional = bare if any(index in self.used_as for index, _ in bare.values()) else {}
            self._owners = set()

    def take_norm_values(self) -> dict[int, int]:
        """The counts of the first step's BatchNorm calls; the hooks stop counting (no later step reads them)."""
        self._batch_norms = set()
        return self.norm_values

    def category(self, index: int) -> str:
        """The kind of layer `index` is measured as: its spec's, or what its matrix was seen applied as."""
        return self._layer_category[index]

    def _functional_call(self, index: int, kind: str, inputs: torch.Tensor | None, output: torch.Tensor) -> None:
        if index not in self.used_as:
            # the kind it is measured as from now on: for a module's matrix already in this call, whose forward
            # hook runs when the module returns
            self.used_as[index] = self._layer_category[index] = kind
        if index in self._owners:
            return
        hook = self._functional_hooks.get(index)
        if hook is None:
            hook = self._functional_hooks[index] = self._forward_hook(index)
        hook(None, (inputs,) if inputs is not None else (), output)
        for listener in self.also_on_call:
            listener(index, inputs, output)

    # -- hooks ------------------------------------------------------------------------------------------

    def _forward_hook(self, index: int) -> Callable[[nn.Module | None, Any, Any], None]:
        grad_hook = self._output_grad_hook(index)  # one per layer, not one per call

        def hook(module: nn.Module | None, args: Any, output: Any) -> None:
            if not self._recording:
                return
            category = self._layer_category[index]  # read per call: a module's matrix may be seen applied (above)
            out = first_tensor(output)
            if in_backward():
                # torch.utils.checkpoint recomputing the forward during backward: not another call (its inputs
                # were measured the first time), but the only output that gets a gradient (reentrant mode)
                if out is not None and out.requires_grad and out.dtype.is_floating_point:
                    out.register_hook(grad_hook)
                return
            tape = self.tape
            if index not in tape.calls:
                tape.calls[index] = 0
                tape.order.append(index)
            tape.calls[index] += 1
            inputs = first_tensor(args)
            if index in self._batch_norms and _batch_statistics(module) and inputs is not None and inputs.dim() >= 2:
                values = inputs.numel() // max(1, inputs.shape[1])
                self.norm_values[index] = min(values, self.norm_values.get(index, values))
            if category == "norm" and inputs is not None and self._last_layer is not None:
                last = self._last_output() if self._last_output is not None else None
                if (last is not None and inputs is last) or _activated(inputs, self._last_node):
                    self.feeds_norm.add(self._last_layer)
            previous, self._last_layer = self._last_layer, index
            if inputs is not None and inputs.numel() and inputs.dtype.is_floating_point:
                # RMS and zero fraction of what the layer reads, from a sample (reduced at the step's end, tape.py).
                # Saturation whatever form the activation takes (torch.tanh, F.sigmoid, inside a gated unit): a
                # weight layer's input squashed into [-1, 1] or [0, 1] counts for the layer before it, as a module
                # activation's would (tape._sample_blocks has the rule).
                squashed = (
                    category in ("linear", "conv") and previous not in tape.saturated_numel and not _averaged(inputs)
                )
                kept = tape.keep(inputs, index, previous if squashed else None)
                tape.input_numel[index] = tape.input_numel.get(index, 0) + kept
            self._last_output = weakref.ref(out) if out is not None else None
            self._last_node = out.grad_fn if out is not None else None
            if out is not None and out.requires_grad and out.dtype.is_floating_point:
                out.register_hook(grad_hook)

        return hook

    def _output_grad_hook(self, index: int) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            unit_dim = 1 if self._layer_category[index] == "conv" else -1
            # Squares summed over every call in the step (tape.py): the norm of all of this module's dL/dz together.
            self.tape.output_squares.append(square_norm(grad.detach()))
            self.tape.output_layers.append(index)
            # Positions = elements per unit (batch x sequence x spatial): what the signal view averages over.
            units = grad.shape[unit_dim] if grad.dim() else 1
            positions = grad.numel() // max(1, units)
            self.tape.output_positions[index] = self.tape.output_positions.get(index, 0) + positions
            if self.amp_tiny is not None:
                # Mixed precision: how much of dL/dz is zero or subnormal in the AMP dtype (sampled).
                values = sample(grad.detach())
                self.tape.output_underflow.setdefault(index, []).append(count_subnormal(values, self.amp_tiny))
                self.tape.output_sampled[index] = self.tape.output_sampled.get(index, 0) + values.numel()

        return hook

    def _activation_hook(self, module: nn.Module) -> Callable[[nn.Module, Any], None] | None:
        limit = next((v for t, v in SATURATION_LIMITS.items() if isinstance(module, t)), None)
        if isinstance(module, nn.Hardtanh):
            limit = float(module.max_val)  # derivative is 0 outside [min_val, max_val]
        dead = isinstance(module, DEAD_TYPES)
        if limit is None and not dead:
            return None

        def hook(mod: nn.Module, args: Any) -> None:
            layer = self._last_layer
            if not self._recording or layer is None or in_backward():
                return
            x = first_tensor(args)
            if x is None or not x.numel() or not x.dtype.is_floating_point:
                return
            x = x.detach()
            if dead:
                self._record_active_units(layer, x)
            if limit is not None:
                # A fraction: estimated from a sample (reduced at the step's end, tape.py).
                kept = self.tape.keep(x, None, saturated_for=layer, limit=limit)
                self.tape.saturated_numel[layer] = self.tape.saturated_numel.get(layer, 0) + kept

        return hook

    def _record_active_units(self, layer: int, x: torch.Tensor) -> None:
        """OR into ever_active[layer] which units had a positive input somewhere in this batch."""
        unit_dim = self._unit_dim(layer, x)
        if x.dim() > 1:
            # The largest input each unit saw (a plain reduction, no boolean temporaries), then > 0.
            if unit_dim % x.dim() == 1 and x.dim() >= 3 and x.is_contiguous():
                # channels of N,C,...: the contiguous spatial run first, then the batch (1.3-2.7x faster on a
                # CPU than one reduction over dims 0, 2, 3; the same maxima)
                largest = x.view(x.shape[0], x.shape[1], -1).amax(dim=2).amax(dim=0)
            else:
                largest = x.amax(dim=[d for d in range(x.dim()) if d != unit_dim % x.dim()])
            positive = largest > 0
        else:
            positive = x > 0
        previous = self.ever_active.get(layer)
        if previous is None:
            self.ever_active[layer] = positive
        elif previous.shape == positive.shape:
            previous |= positive
        # A layer feeding activations of different widths is ambiguous: keep the first.

    def _unit_dim(self, layer: int, x: torch.Tensor) -> int:
        """Which dimension indexes units: channels (dim 1) after conv/norm on N,C,... tensors; else the last."""
        if x.dim() <= 1:
            return 0
        if x.dim() == 2:
            return 1
        if x.dim() >= 4 or self._layer_category.get(layer) in ("conv", "norm"):
            return 1
        return x.dim() - 1


def hook_count(model: nn.Module) -> int:
    """Hooks currently registered on any module of the model (used by tests and by the API's self-check)."""
    total = 0
    for module in model.modules():
        for attr in (
            "_forward_hooks",
            "_forward_pre_hooks",
            "_backward_hooks",
            "_backward_pre_hooks",
        ):
            total += len(getattr(module, attr, {}))
    return total


# autograd nodes that only rearrange a tensor, and those that average it (global average pooling, x.mean(...))
_REARRANGING = frozenset(
    ("View", "UnsafeView", "ReshapeAlias", "Squeeze", "Unsqueeze", "Permute", "Transpose", "T", "Clone", "Expand")
)
_AVERAGING = ("Mean", "Sum", "AvgPool", "AdaptiveAvgPool")


# Activations through which a normalisation still makes the layer before them scale-invariant: positively
# homogeneous ones exactly (BN(relu(a z)) = BN(relu(z)) for a > 0), and those that are homogeneous in both limits
# (GELU and SiLU: z/2 near 0, relu(z) far from it; Mish, Hardswish, ELU alike) nearly so. Not sigmoid or tanh,
# whose middle range is neither. In place (ReLU(inplace=True)) the norm reads the layer's own output tensor.
_HOMOGENEOUS = frozenset(("Relu", "LeakyRelu", "PreluKernel", "Prelu", "Gelu", "Silu", "Mish", "Hardswish", "Elu"))


def _activated(tensor: torch.Tensor, made_by: Any) -> bool:
    """Whether `tensor` is one such activation (a module's or a function's) applied to the output of the autograd
    node `made_by`."""
    node = tensor.grad_fn
    if node is None or made_by is None or not node.next_functions:
        return False
    kind = type(node).__name__.rstrip("0123456789").removesuffix("Backward")
    return kind in _HOMOGENEOUS and node.next_functions[0][0] is made_by


def _averaged(tensor: torch.Tensor) -> bool:
    """Whether a layer's input is an average over positions (a global average pool of ReLU features): its values
    may lie in [0, 1] as a sigmoid's do, but they are no unit's activation, so not a saturation to count."""
    node = tensor.grad_fn
    for _ in range(4):
        if node is None:
            return False
        kind = type(node).__name__.rstrip("0123456789").removesuffix("Backward")
        if kind.startswith(_AVERAGING):
            return True
        if kind not in _REARRANGING:
            return False
        node = node.next_functions[0][0] if node.next_functions else None
    return False


def in_backward() -> bool:
    """Whether autograd is running a backward pass right now (a checkpointed forward being recomputed)."""
    current = getattr(torch._C, "_current_graph_task_id", None)
    return current is not None and current() != -1


def _batch_statistics(module: nn.Module | None) -> bool:
    """Whether a BatchNorm module normalises by the batch's statistics in this call (not its running ones)."""
    return module is not None and (module.training or not getattr(module, "track_running_stats", True))
