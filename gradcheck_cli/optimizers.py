"""The optimizer a watched training run steps with (--train-steps): a named one (--optimizer sgd|momentum|adam|
adamw, with --lr and --weight-decay), the user's own (--optimizer FILE.py:FN, or the model file's
build_optimizer(model)), and the model file's optional build_scheduler(optimizer).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gradcheck_cli.errors import UserError, calling

FIX = "fix it (--debug shows the traceback)"
# SGD with momentum as most recipes use it (torchvision's reference scripts, the 2017 tutorial's successors).
MOMENTUM = 0.9


@dataclass(frozen=True)
class OptimizerSource:
    """Where the optimizer comes from: a name, or a function of the user's (and its scheduler, if any)."""

    name: str  # sgd | momentum | adam | adamw, or a label for the function ("build_optimizer()", "opt.py:make")
    build: Callable[..., Any] | None = None  # the user's function(model) -> optimizer
    scheduler: Callable[..., Any] | None = None  # the user's function(optimizer) -> LR scheduler


def named(name: str, params: list[nn.Parameter], lr: float, weight_decay: float | None) -> torch.optim.Optimizer:
    """One of the named optimizers with torch's defaults, except lr and (when given) weight decay."""
    if name in ("sgd", "momentum"):
        momentum = MOMENTUM if name == "momentum" else 0.0
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay or 0.0)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay or 0.0)
    if name == "adamw":  # AdamW's own default decay, 0.01, unless given
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.01 if weight_decay is None else weight_decay)
    raise UserError(f"unknown --optimizer '{name}'", "use sgd, momentum, adam, adamw or FILE.py:FN")


@dataclass
class Built:
    optimizer: torch.optim.Optimizer
    scheduler: Any  # torch.optim.lr_scheduler.LRScheduler or anything with .step(); None without one
    description: str  # for the report: "adamw (lr 0.001, weight decay 0.01)"


def build(source: OptimizerSource, model: nn.Module, lr: float, weight_decay: float | None) -> Built:
    """The optimizer over the model's trainable parameters (or the user's), and the scheduler if any."""
    if source.build is None:
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = named(source.name, params, lr, weight_decay)
        group = optimizer.param_groups[0]
        decay = group.get("weight_decay", 0.0)
        extra = f", momentum {MOMENTUM:g}" if source.name == "momentum" else ""
        description = f"{source.name} (lr {lr:g}{extra}, weight decay {decay:g})"
    else:
        build = source.build
        optimizer = calling(source.name, lambda: build(model), FIX)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise UserError(
                f"{source.name} returned {type(optimizer).__name__}, not a torch.optim.Optimizer",
                "return e.g. torch.optim.AdamW(model.parameters(), lr=1e-3)",
            )
        first = optimizer.param_groups[0]
        description = f"{source.name}: {type(optimizer).__name__} (lr {first.get('lr', float('nan')):g})"
    scheduler = None
    if source.scheduler is not None:
        make = source.scheduler
        scheduler = calling("build_scheduler()", lambda: make(optimizer), FIX)
        if not callable(getattr(scheduler, "step", None)):
            raise UserError(
                f"build_scheduler() returned {type(scheduler).__name__}, which has no step()",
                "return e.g. torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=10)",
            )
        description += f", scheduler {type(scheduler).__name__}"
    return Built(optimizer, scheduler, description)


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    return float(optimizer.param_groups[0].get("lr", float("nan")))
