"""Resolve: what the user named (TARGET, --weights, --data, --loss) -> a model, batches and a loss.

Each spec is parsed once, in specs.py, into a typed value; modules.py imports user code, weights.py loads
parameters, data.py makes batches, losses.py chooses the loss, config.py reads [tool.gradcheck].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradcheck_cli.errors import UserError
from gradcheck_cli.resolve.specs import parse_data_spec, parse_loss_spec, parse_target

if TYPE_CHECKING:
    from torch import nn

    from gradcheck_cli.batch import Batches
    from gradcheck_cli.hub import HubTarget
    from gradcheck_cli.optimizers import OptimizerSource
    from gradcheck_cli.options import Options


@dataclass(frozen=True)
class Resolved:
    model: nn.Module
    batches: Batches | None  # None: let the passes synthesise inputs for the first layer
    loss: str | Callable[..., Any]  # a named loss or the user's function
    file_loss: Callable[..., Any] | None  # the model file's loss_fn, which --loss auto prefers
    label: str  # TARGET as the report names it
    notes: list[str]
    optimizer: OptimizerSource  # what --train-steps steps with


def _resolve_hub(hub: HubTarget, options: Options) -> Resolved:
    """hf:, timm:, torchvision: targets (gradcheck_cli.hub): the library builds the model, its configuration
    says what inputs it takes."""
    import torch

    from gradcheck_cli.hub import build
    from gradcheck_cli.resolve.data import load_data
    from gradcheck_cli.resolve.weights import load_weights

    if options.model_name:
        raise UserError(f"--model does not apply to {hub.hub}: targets", "drop --model")
    data_spec = parse_data_spec(options.data) if options.data else None
    loss_spec = parse_loss_spec(options.loss)
    torch.manual_seed(options.seed)  # a random initialisation is part of what is reproduced
    built = build(hub, options)
    notes = list(built.notes)
    if options.weights:
        notes += load_weights(
            built.model, Path(options.weights), strict=options.strict, allow_pickle=options.allow_pickle
        )
    total = options.train_steps + options.steps
    batches: Batches | None
    if data_spec is None:
        assert built.make_batches is not None
        batches = built.make_batches(total, options.batch_size, options.seed)
        notes.append(f"no data given: {built.description}")
    elif data_spec.kind == "text":
        from gradcheck_cli.hub.hf import text_batches

        batches = text_batches(hub.label, built, Path(data_spec.path or ""), total, options.batch_size)
    else:
        batches, data_notes = load_data(data_spec, total, options.batch_size, options.seed)
        notes += data_notes
    from gradcheck_cli.resolve.modules import function_in

    loss = loss_spec if isinstance(loss_spec, str) else function_in(loss_spec)
    return Resolved(built.model, batches, loss, None, hub.label, notes, optimizer_source(options.optimizer))


def optimizer_source(spec: str | None, module: Any = None) -> OptimizerSource:
    """--optimizer: a named optimizer, FILE.py:FN, or (not given) the model file's build_optimizer, else sgd;
    with the model file's build_scheduler (or FILE.py's own) when there is one."""
    from gradcheck_cli.optimizers import OptimizerSource
    from gradcheck_cli.options import OPTIMIZER_CHOICES
    from gradcheck_cli.resolve.modules import file_function, function_in, import_target

    scheduler = file_function(module, "build_scheduler") if module is not None else None
    if spec is None:
        build = file_function(module, "build_optimizer") if module is not None else None
        if build is None:
            return OptimizerSource("sgd", scheduler=scheduler)
        return OptimizerSource("build_optimizer()", build, scheduler)
    if spec in OPTIMIZER_CHOICES:
        return OptimizerSource(spec, scheduler=scheduler)
    target = parse_target(spec, what="--optimizer")
    if target.name is None:
        raise UserError(f"--optimizer '{spec}' names no function", "use FILE.py:FN, FN(model) -> optimizer")
    build = function_in(target)
    own = file_function(import_target(target), "build_scheduler")
    return OptimizerSource(target.label(), build, own or scheduler)


def resolve(target: str, options: Options) -> Resolved:
    """Parse every spec first (a typo costs nothing), then import, build, load weights and data."""
    import torch

    from gradcheck_cli.hub import parse_hub
    from gradcheck_cli.resolve.data import load_data, model_file_batches
    from gradcheck_cli.resolve.modules import file_function, function_in, import_target, resolve_model
    from gradcheck_cli.resolve.weights import load_weights

    hub = parse_hub(target)
    if hub is not None:
        return _resolve_hub(hub, options)
    for flag, given in (
        ("--task", options.task),
        ("--from-config", options.from_config),
        ("--adapter", options.adapter),
    ):
        if given:
            raise UserError(f"{flag} applies to hf: targets", f"drop {flag}, or give TARGET as hf:DIR")
    parsed = parse_target(target)
    name = options.model_name
    if name and parsed.name and name != parsed.name:
        raise UserError(
            f"TARGET names '{parsed.name}' but --model names '{name}'",
            "give the name once, either as TARGET:NAME or with --model",
        )
    data_spec = parse_data_spec(options.data) if options.data else None
    loss_spec = parse_loss_spec(options.loss)
    loss = loss_spec if isinstance(loss_spec, str) else function_in(loss_spec)
    torch.manual_seed(options.seed)  # model files initialise weights at import or build time: make that reproducible
    module = import_target(parsed)
    model = resolve_model(module, name or parsed.name, parsed.source)
    notes: list[str] = []
    if options.weights:
        notes += load_weights(model, Path(options.weights), strict=options.strict, allow_pickle=options.allow_pickle)
    total = options.train_steps + options.steps
    batches: Batches | None
    if data_spec is not None:
        batches, data_notes = load_data(data_spec, total, options.batch_size, options.seed)
        notes += data_notes
    else:
        batches = model_file_batches(module, total)
    label = parsed.label() if not name else f"{parsed.source}:{name}"
    optimizer = optimizer_source(options.optimizer, module)
    return Resolved(model, batches, loss, file_function(module, "loss_fn"), label, notes, optimizer)
