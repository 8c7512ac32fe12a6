"""Failure-path tracing: re-run one batch with extra hooks to say *where* something went wrong.

These hooks cost a host sync per module, so they never run on a healthy model: the measured passes only
notice that a forward raised or that a loss or gradient was non-finite, then one batch is replayed here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from gradcheck_cli.batch import Batch, tensors_in
from gradcheck_cli.errors import ModelRunError, first_line
from gradcheck_cli.report import NanOrigin


def _finite(value: Any) -> bool:
    return all(
        bool(torch.isfinite(t).all()) for t in tensors_in(value) if t.dtype.is_floating_point or t.dtype.is_complex
    )


def _shapes(value: Any) -> str:
    shapes = [tuple(t.shape) for t in tensors_in(value)]
    return ", ".join(str(s) for s in shapes[:3]) or "no tensors"


class _Hooks:
    """Handles registered on many modules, removed together."""

    def __init__(self) -> None:
        self.handles: list[RemovableHandle] = []

    def __enter__(self) -> _Hooks:
        return self

    def __exit__(self, *exc: object) -> None:
        while self.handles:
            self.handles.pop().remove()


def _named(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name or type(model).__name__, module) for name, module in model.named_modules()]


def locate_failure(model: nn.Module, batch: Batch, error: Exception) -> ModelRunError:
    """Re-run the forward that raised `error`, tracking the module stack, and name the innermost module that
    was running (with the shapes it received). Returns the error to raise."""
    stack: list[tuple[str, nn.Module, str]] = []
    failed: list[tuple[str, nn.Module, str]] = []

    def pre(name: str) -> Callable[[nn.Module, Any], None]:
        def hook(module: nn.Module, args: Any) -> None:
            stack.append((name, module, _shapes(args)))

        return hook

    def post(module: nn.Module, args: Any, output: Any) -> None:
        if stack:
            stack.pop()

    with _Hooks() as hooks, torch.no_grad():
        try:
            for name, module in _named(model):
                hooks.handles.append(module.register_forward_pre_hook(pre(name)))
                hooks.handles.append(module.register_forward_hook(post))
            model(*batch.args, **batch.kwargs)
        except Exception:
            failed = list(stack)
    message = first_line(error)
    if failed and len(failed) > 1:
        name, module, shapes = failed[-1]
        return ModelRunError(
            f"the forward pass failed in {name} ({type(module).__name__}, input {shapes}): "
            f"{type(error).__name__}: {message}",
            "check that --data fits the model's expected input (--debug shows the traceback)",
            module=name,
        )
    return ModelRunError(
        f"the model's forward raised {type(error).__name__}: {message}",
        "check that --data fits the model's expected input (--debug shows the traceback)",
    )


def trace_nonfinite(
    model: nn.Module,
    runner: nn.Module,
    batch: Batch,
    loss: Callable[[Any, Batch], torch.Tensor],
) -> NanOrigin:
    """Replay one batch and find where non-finite values first appear.

    Forward: the first module (in completion order) whose inputs are finite but whose output is not.
    Backward: the first module output whose dL/dz is non-finite, in the order backward reaches it (the op
    consuming it produced the bad gradient), or a module whose own parameter gradient is non-finite while
    its dL/dz is finite. The replay always runs the whole forward and backward, whatever it finds on the
    way, so that processes under torchrun stay in step (DDP and FSDP communicate inside both).
    `model` carries the hooks; `runner` is what is called (the model, or its DDP wrapper).
    """
    bad_input = not _finite((batch.args, batch.kwargs))
    forward_origin: list[tuple[str, nn.Module]] = []
    backward_events: list[tuple[str, bool]] = []

    def forward_hook(name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not forward_origin and not _finite(output) and _finite(args):
                forward_origin.append((name, module))
            for tensor in tensors_in(output):
                if tensor.requires_grad:
                    tensor.register_hook(lambda g, n=name: backward_events.append((n, _finite(g))))
                    break

        return hook

    model.zero_grad(set_to_none=True)
    with _Hooks() as hooks:
        for name, module in _named(model):
            if module is not model:
                hooks.handles.append(module.register_forward_hook(forward_hook(name)))
        output = runner(*batch.args, **batch.kwargs)
        value = loss(output, batch)
        loss_finite = math.isfinite(float(value.detach()))
        value.backward()
    if bad_input:
        return NanOrigin("input", None, "the input batch already contains NaN or Inf")
    if forward_origin:
        name, module = forward_origin[0]
        return NanOrigin(
            "forward", name, f"{name} ({type(module).__name__}) produced NaN/Inf from finite inputs in the forward pass"
        )
    if not loss_finite:
        return NanOrigin("loss", None, "the model output is finite but the loss is NaN/Inf")
    bad_output = next((name for name, finite in backward_events if not finite), None)
    clean_outputs = {name for name, finite in backward_events if finite}
    for name, module in _named(model):
        own = [p.grad for p in module.parameters(recurse=False) if p.grad is not None]
        if own and not all(bool(torch.isfinite(g).all()) for g in own) and name in clean_outputs:
            return NanOrigin(
                "backward",
                name,
                f"{name} ({type(module).__name__}) got finite dL/dz but produced a NaN/Inf parameter gradient",
            )
    if bad_output is not None:
        return NanOrigin(
            "backward",
            bad_output,
            f"dL/dz first became NaN/Inf at the output of {bad_output}, in the backward of the operation using it",
        )
    return NanOrigin("backward", None, "a gradient is NaN/Inf but no module output's gradient was")
