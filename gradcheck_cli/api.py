"""The Python API, and the pipeline the CLI runs:

    resolve (TARGET, weights, data, loss) -> prepare -> passes.measure (probe, collect) -> diagnose -> Report

Usable from pytest:

    report = gradcheck_cli.analyze(model, (inputs, targets))
    assert report.healthy, report.findings
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradcheck_cli.batch import Batch
from gradcheck_cli.collect import Collector
from gradcheck_cli.diagnose import diagnose
from gradcheck_cli.distributed import Combiner, Parallel, shard, wrap
from gradcheck_cli.errors import UserError
from gradcheck_cli.gradsave import GradientWriter, check_path
from gradcheck_cli.layers import discover_layers
from gradcheck_cli.optimizers import OptimizerSource
from gradcheck_cli.options import Options
from gradcheck_cli.passes import (
    AMP_DTYPES,
    Measurement,
    Plan,
    Progress,
    Setup,
    TrainPlan,
    materialize_lazy,
    measure,
    seeded,
    small_norm_note,
    unwrap,
)
from gradcheck_cli.reduce import released_caches
from gradcheck_cli.report import Report
from gradcheck_cli.resolve.data import collect_batches, synthetic_batches
from gradcheck_cli.resolve.losses import LossFunction, LossSelector
from gradcheck_cli.series import histogram_edges

RUN = ("run",)


def analyze(
    model: nn.Module,
    batches: Any = None,
    loss_fn: str | LossFunction = "auto",
    options: Options | None = None,
    progress: Progress | None = None,
    **settings: Any,
) -> Report:
    """Run `steps` forward/backward passes with hooks and diagnose every layer's gradients.

    model: any nn.Module (a torch.compile wrapper is unwrapped: hooks need the eager module).
    batches: one batch or an iterable of batches; a batch is a tensor (inputs), a tuple (inputs, targets) or
        a dict of keyword arguments. None: random inputs shaped for the first layer (Linear, Conv, Embedding).
    loss_fn: "auto", "cross-entropy", "mse" or a callable (output, targets) -> scalar tensor.
    options, or settings by name (the fields of gradcheck_cli.Options that shape the passes):
      steps, train_steps (optimizer steps taken and watched before measuring: report.training), optimizer
      ("sgd", "momentum", "adam", "adamw" or "FILE.py:FN"), lr, weight_decay, clip, save_bad_batch, seed,
      device (None keeps the model where it is; the model is moved there and left there), eval_mode,
      batch_size (of random inputs), thresholds, amp ("bf16" or "fp16": passes under torch.autocast; fp16
      scales the loss as GradScaler does and reports gradients unscaled), parallel ("ddp" or "fsdp" under
      torchrun: join the process group, wrap the model, slice the batches, combine the statistics; FSDP shards
      the model's parameters in place), value_histograms (also keep each layer's signed gradient values per
      step, the tutorial's picture: plots and TensorBoard use it; off by default, it costs time), save_grads
      (a .safetensors file for every measured gradient, copied to the CPU one tensor at a time).
    progress: called as progress(phase, done, total) after each pass ("train" or "measure").

    The model is left as found: no hooks, the same .grad tensors, train/eval flags, buffers (BatchNorm
    running statistics) and, after train_steps, parameter values restored. The global RNG state is untouched.
    """
    options = options or Options.of(RUN, settings, "analyze")
    return run(model, batches, loss_fn, options, progress=progress)


def run(
    model: nn.Module,
    batches: Any,
    loss_fn: str | LossFunction | LossSelector,
    options: Options,
    *,
    target: str | None = None,
    notes: Sequence[str] = (),
    progress: Progress | None = None,
    file_loss: LossFunction | None = None,
    optimizer: OptimizerSource | None = None,
) -> Report:
    """analyze() with resolved options, and what analyze_target adds: the TARGET label, notes, a progress
    callback, the model file's loss_fn and optimizer."""
    model, unwrap_notes = unwrap(model)
    if not any(p.requires_grad for p in model.parameters()):
        raise UserError(
            f"{type(model).__name__} has no trainable parameters",
            "nothing to check: unfreeze some parameters (requires_grad=True)",
        )
    # grad on even when the caller is under torch.no_grad(): the passes are what measures the gradients
    with _process_group(options) as parallel, released_caches(), torch.enable_grad():
        setup, global_batch, batch_notes = prepare(model, batches, loss_fn, options, parallel, file_loss)
        if optimizer is None:
            from gradcheck_cli.resolve import optimizer_source

            optimizer = optimizer_source(options.optimizer)
        measurement, saved_notes = _measure(setup, options, parallel, progress, optimizer)
        residual, confirmed_notes = _confirm(setup, measurement, options, parallel)
    report = _report(setup, measurement, options, parallel, residual)
    report.target, report.batch_size = target, global_batch
    report.notes[:0] = [*notes, *unwrap_notes, *batch_notes, *saved_notes, *confirmed_notes]
    return report


@contextlib.contextmanager
def _process_group(options: Options) -> Iterator[Parallel | None]:
    """--parallel: join the process group torchrun set up, and leave it at the end."""
    if options.parallel is None:
        yield None
        return
    from gradcheck_cli.distributed import setup, teardown

    try:
        yield setup(options.parallel, options.device)
    finally:
        teardown()


def prepare(
    model: nn.Module,
    batches: Any,
    loss_fn: str | LossFunction | LossSelector,
    options: Options,
    parallel: Parallel | None,
    file_loss: LossFunction | None = None,
) -> tuple[Setup, int | None, list[str]]:
    """The device, the batches (synthesised when none are given), the loss, the layers; lazy modules made."""
    from gradcheck_cli.devices import check_model, resolve_device

    check_model(model)
    device = parallel.device if parallel is not None else resolve_device(model, options.device)
    if options.device is not None or parallel is not None:
        model.to(device)
    total = options.train_steps + options.steps
    notes = []
    if batches is None:
        prepared, description = synthetic_batches(model, total, options.batch_size, options.seed)
        notes.append(f"no data given: random inputs {description}")
    else:
        prepared = collect_batches(batches, total)
    prepared = prepared.map(_not_empty)
    global_batch = prepared[0].size
    if parallel is not None:
        prepared = prepared.map(lambda _, batch: shard(batch, parallel))
    rank, world = (parallel.rank, parallel.world_size) if parallel is not None else (0, 1)
    loss = loss_fn if isinstance(loss_fn, LossSelector) else LossSelector(loss_fn, file_loss, options.seed, rank, world)
    with seeded(options.seed, device):  # lazy parameters drawn from --seed, the caller's RNG left as it was
        materialize_lazy(model, prepared[0].to(device))
    notes += [] if options.eval_mode else _heavy_dropout(model)
    runner = wrap(model, parallel) if parallel is not None else model
    amp_dtype = AMP_DTYPES[options.amp] if options.amp is not None else None
    return Setup(model, runner, device, prepared, loss, discover_layers(model), amp_dtype), global_batch, notes


# Dropout rates past which a layer before the dropout gets a gradient in few samples: Srivastava et al. (2014)
# drop 0.2 of the inputs and 0.5 of hidden units, and rates used in practice stay at or under 0.5. At p = 0.999
# (Hugging Face MobileNetV1Config's default classifier_dropout_prob, where the original's keep probability was
# 0.999) a unit passes 1 sample in 1000, so over 3 steps of 8 samples 98% of the units before it get no
# gradient at all: a dead [activation] finding whose cause is the dropout, named here.
HEAVY_DROPOUT = 0.9


def _heavy_dropout(model: nn.Module) -> list[str]:
    """A note naming each dropout module of p >= HEAVY_DROPOUT (train mode: it is active)."""
    return [
        f"{name} ({type(module).__name__}, p={module.p:g}) passes {1 - module.p:.2g} of what it reads in train "
        "mode: the units before it get a gradient in few samples (a dead [activation] finding there can be "
        "this; rates in use are 0.5 or less)"
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p >= HEAVY_DROPOUT
    ]


def _not_empty(index: int, batch: Batch) -> Batch:
    if batch.size == 0:  # a mean over no examples is NaN: that would read as a broken model
        raise UserError(f"batch {index + 1} holds 0 samples", "give every batch at least one example")
    return batch


def _measure(
    setup: Setup, options: Options, parallel: Parallel | None, progress: Progress | None, optimizer: OptimizerSource
) -> tuple[Measurement, list[str]]:
    from gradcheck_cli.watch import bad_step_note, check_savable

    combiner = _combiner(parallel)
    tiny = torch.finfo(setup.amp_dtype).tiny if setup.amp_dtype is not None else None
    collector = Collector(setup.layers, combiner, tiny, options.wants_value_histograms)
    bad = options.save_bad_batch
    if bad is not None and options.train_steps:
        check_savable(setup.batches[0])
    training = TrainPlan(
        options.train_steps,
        optimizer,
        options.lr,
        options.weight_decay,
        options.clip,
        (bad, options.located(bad)) if bad is not None else None,
    )
    plan = Plan(
        options.steps,
        training,
        options.seed,
        options.eval_mode,
        _gradient_writer(options, setup.model),
        progress,
        watch_first=parallel is None,
    )
    measurement = measure(setup, plan, collector, combiner)
    notes = []
    note = small_norm_note(measurement.small_norm)
    notes += [note] if note else []
    if measurement.training is not None:
        note = bad_step_note(measurement.training)
        notes += [note] if note else []
    writer = plan.grad_writer
    if writer is not None:
        size = writer.bytes_written / 1e6
        notes.append(f"gradients saved: {writer.path} ({len(writer.header)} tensors, {size:.3g} MB)")
    return measurement, notes


def _confirm(
    setup: Setup, measurement: Measurement, options: Options, parallel: Parallel | None
) -> tuple[bool | None, list[str]]:
    """What the records raise and one replay settles (confirm.py): zero gradients explained by zero-initialised
    gates (the layers are marked gated), and whether a strong signal trend runs through a plain chain."""
    from gradcheck_cli.confirm import find_bypass, gated_cells, open_gates, through_time
    from gradcheck_cli.diagnose.signal import signal_view

    if measurement.nan_origin is not None:
        return None, []
    combiner = _combiner(parallel)
    notes = []
    opened, gates = open_gates(setup, measurement.layers, measurement.parameters, combiner)
    if opened:
        measurement.layers = [dataclasses.replace(layer, gated=layer.name in opened) for layer in measurement.layers]
        shown = ", ".join(gates[:3]) + (f" and {len(gates) - 3} more" if len(gates) > 3 else "")
        notes.append(
            f"{len(opened)} layer(s) get exactly zero gradient only because zero-initialised layers after them "
            f"({shown}) gate their path (checked by opening them); they learn once those move: see --train-steps 1"
        )
    notes += _mark_side_outputs(setup, measurement) if parallel is None else []
    if parallel is None:
        _mark_unread(setup, measurement)
    notes += _mark_behind_scales(setup, measurement, options) if parallel is None else []
    _mark_first_step(measurement)
    in_time, gated_loops, over_depth = through_time(setup, measurement.layers, combiner)
    gated = gated_cells(setup)
    if in_time or gated:
        measurement.layers = [
            dataclasses.replace(
                layer,
                time_grad_norms=in_time.get(layer.name),
                time_gated=layer.name in gated or layer.name in gated_loops,
                loop_over_depth=layer.name in over_depth,
                neutral_gate_gain=gated.get(layer.name),
            )
            for layer in measurement.layers
        ]
    summary, _ = signal_view(measurement.layers, options.thresholds)
    total = summary.total_factor
    if total is None or not total > 0 or max(total, 1 / total) < options.thresholds.signal_warning:
        return None, notes
    by_name = {layer.name: layer for layer in measurement.layers}
    return find_bypass(setup, [by_name[name] for name in summary.chain], combiner), notes


def _mark_first_step(measurement: Measurement) -> None:
    """What the first measured step's forward showed (firststep.py): each layer's depth in the graph, and units
    that never leave the flat region of a GELU/SiLU/... applied to its output, its dead units where no ReLU
    module measured them in every step."""
    flat, depths = measurement.flat, measurement.depths
    marked = []
    for layer in measurement.layers:
        layer = dataclasses.replace(layer, depth=depths.get(layer.name))
        if layer.name in flat and layer.dead_fraction is None:
            fraction, units, activation = flat[layer.name]
            layer = dataclasses.replace(layer, dead_fraction=fraction, units=units, flat_activation=activation)
        marked.append(layer)
    measurement.layers = marked


def _mark_side_outputs(setup: Setup, measurement: Measurement) -> list[str]:
    """Auxiliary heads: layers that feed only outputs the loss does not read (confirm.side_outputs)."""
    from gradcheck_cli.confirm import side_outputs

    aside = side_outputs(setup, measurement.layers)
    if not aside:
        return []
    measurement.layers = [dataclasses.replace(layer, side_output=layer.name in aside) for layer in measurement.layers]
    names = [layer.name for layer in measurement.layers if layer.name in aside]
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return [
        f"{len(names)} layer(s) ({shown}) feed only outputs of the model that the loss does not read (auxiliary "
        "heads): not measured, status unjudged; a --loss that reads those outputs measures them"
    ]


def _mark_unread(setup: Setup, measurement: Measurement) -> None:
    """Layers with exactly zero gradient because nothing they compute reaches the loss (unread.unread_parameters)."""
    from gradcheck_cli.unread import unread_parameters

    unread = unread_parameters(setup, measurement.layers, measurement.parameters)
    if unread:
        measurement.layers = [dataclasses.replace(layer, unread=layer.name in unread) for layer in measurement.layers]


def _mark_behind_scales(setup: Setup, measurement: Measurement, options: Options) -> list[str]:
    """Layers that small per-channel scales gate far below the network, or starve (scales.open_scales)."""
    from gradcheck_cli.scales import open_scales

    thresholds = options.thresholds
    behind = open_scales(setup, measurement.layers, thresholds.role_error, thresholds.dead_warning)
    if not behind:
        return []
    measurement.layers = [
        dataclasses.replace(layer, behind_scales=layer.name in behind) for layer in measurement.layers
    ]
    names = [layer.name for layer in measurement.layers if layer.name in behind]
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return [
        f"{len(names)} layer(s) ({shown}) learn over role_error slower than the network, or get no usable "
        "gradient in most units, only because small per-channel scales (LayerScale) gate their path (checked by "
        "setting those to 1): they learn as the scales grow"
    ]


def _combiner(parallel: Parallel | None) -> Combiner:
    return Combiner(parallel.world_size, parallel.sharded) if parallel is not None else Combiner()


def _report(
    setup: Setup, measurement: Measurement, options: Options, parallel: Parallel | None, residual: bool | None
) -> Report:
    thresholds = options.thresholds
    verdict = diagnose(
        measurement.layers,
        measurement.loss,
        thresholds,
        nan_origin=measurement.nan_origin,
        lr=options.lr,
        amp=options.amp,
        residual=residual,
        training_run=measurement.training,
    )
    return Report(
        torch_version=torch.__version__,
        model=type(setup.model).__name__,
        steps=options.steps,
        train_steps=options.train_steps,
        lr=options.lr,
        device=str(setup.device),
        mode="eval" if options.eval_mode else "train",
        seed=options.seed,
        loss_name=setup.loss.choice.name if setup.loss.choice else "",
        loss=[v for v in measurement.loss if v is not None],
        train_loss=measurement.train_loss,
        training=measurement.training,
        thresholds=thresholds.as_dict(),
        signal=verdict.signal,
        update=verdict.update,
        nan_origin=measurement.nan_origin,
        amp=options.amp,
        loss_scale=measurement.loss_scale,
        skipped_steps=measurement.skipped_steps,
        parallel=parallel.mode if parallel else None,
        world_size=parallel.world_size if parallel else 1,
        notes=list(verdict.notes),
        histogram_edges=histogram_edges(),
        findings=verdict.findings,
        layers=verdict.layers,
        parameters=measurement.parameters,
    )


def _gradient_writer(options: Options, model: nn.Module) -> GradientWriter | None:
    if options.save_grads is None:
        return None
    path = Path(options.save_grads)
    check_path(path)
    metadata = {
        "model": type(model).__name__,
        "train_steps": str(options.train_steps),
        "torch_version": torch.__version__,
    }
    return GradientWriter(path, metadata, options.located(path))


def analyze_target(
    target: str, options: Options | None = None, progress: Progress | None = None, **settings: Any
) -> Report:
    """What `gradcheck analyze` does: resolve TARGET (and --weights, --data, --loss), then run the analysis.

    settings: the fields of gradcheck_cli.Options that say what to load and how to run (model_name, weights,
    strict, allow_pickle, data, loss, batch_size, steps, ...); device defaults to "auto" here."""
    from gradcheck_cli.resolve import resolve
    from gradcheck_cli.resolve.modules import no_bytecode

    if options is None:
        options = Options.of(("source", "run"), {"device": "auto", **settings}, "analyze_target")
    if options.base is None:  # before the model file runs: it may change directory
        options = dataclasses.replace(options, base=Path.cwd())
    with no_bytecode():
        resolved = resolve(target, options)
        return run(
            resolved.model,
            resolved.batches,
            resolved.loss,
            options,
            target=resolved.label,
            notes=resolved.notes,
            progress=progress,
            file_loss=resolved.file_loss,
            optimizer=resolved.optimizer,
        )
