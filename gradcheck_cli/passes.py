"""Run the passes: forward and backward as training would run them (autocast, fp16 loss scaling, a watched
training run before measuring), with every failure of the user's code turned into a one-line error naming where it
happened. The measured loop itself is `measure`: hooks on, one collector transfer per step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradcheck_cli.batch import Batch
from gradcheck_cli.collect import Collector
from gradcheck_cli.distributed import Combiner
from gradcheck_cli.errors import ModelRunError, UserError, exited, first_line, is_out_of_memory
from gradcheck_cli.gradsave import GradientWriter
from gradcheck_cli.layers import LayerSpec
from gradcheck_cli.optimizers import OptimizerSource
from gradcheck_cli.probe import Probe
from gradcheck_cli.report import Layer, NanOrigin, ParameterRecord, Training, TrainingLayer
from gradcheck_cli.resolve.losses import LossSelector
from gradcheck_cli.series import median
from gradcheck_cli.tracing import locate_failure, trace_nonfinite

Progress = Callable[[str, int, int], None]

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# GradScaler's policy: start at 2^16, halve on overflow. A step is retried at most this many times.
MAX_BACKOFFS = 24


class Passes:
    """One forward and backward, as training would run it: under autocast, with fp16's loss scaling."""

    def __init__(self, runner: nn.Module, loss: LossSelector, device: torch.device, dtype: torch.dtype | None):
        self.runner = runner
        self.loss = loss
        self.device = device
        self.dtype = dtype
        self.scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
        self.backoffs = 0

    @property
    def scale(self) -> float:
        return float(self.scaler.get_scale()) if self.scaler is not None else 1.0

    def can_back_off(self) -> bool:
        return self.scaler is not None and self.backoffs < MAX_BACKOFFS

    def back_off(self) -> None:
        assert self.scaler is not None
        self.backoffs += 1
        self.scaler.update(new_scale=self.scale * 0.5)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def forward_loss(self, batch: Batch) -> torch.Tensor:
        """The loss of one forward, before any backward."""
        with self.autocast():
            # No name for the output: it is freed once the loss is computed, as in a training loop, not kept
            # through the backward (a language model's logits are often the largest tensor of the step).
            return _loss(self.loss, forward(self.runner, batch), batch)

    def forward_backward(self, batch: Batch) -> torch.Tensor:
        """The loss (unscaled) after backward; gradients carry `scale`."""
        value = self.forward_loss(batch)
        _backward(self.scaler.scale(value) if self.scaler is not None else value)
        return value


def unwrap(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """The eager module inside torch.compile (hooks added after compiling are ignored, pytorch #117265) and
    inside DataParallel / DistributedDataParallel wrappers."""
    notes = []
    while True:
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            notes.append("torch.compile wrapper: measured the eager module inside it")
            model = inner
            continue
        if isinstance(model, nn.DataParallel | nn.parallel.DistributedDataParallel):
            notes.append(f"{type(model).__name__} wrapper: measured the module inside it")
            model = model.module
            continue
        return model, notes


def materialize_lazy(model: nn.Module, batch: Batch) -> None:
    """Lazy modules (nn.LazyLinear...) create their parameters on the first forward: run one, without
    gradients, in eval mode (no BatchNorm statistics move), before hooks and snapshots need the tensors."""
    if not any(isinstance(p, nn.parameter.UninitializedParameter) for p in model.parameters()):
        return
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            forward(model, batch)
    finally:
        for module, training in modes:
            module.training = training


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed dropout and friends for this run only; the caller's RNG state is restored afterwards."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def clear_grads(model: nn.Module, params: list[nn.Parameter] | None = None) -> None:
    """Drop every gradient (`params`: the model's parameters listed once, where a model has thousands)."""
    for param in model.parameters() if params is None else params:
        param.grad = None


def forward(model: nn.Module, batch: Batch) -> Any:
    """The model's output; a failure becomes a ModelRunError naming the module that raised. Out of memory
    propagates as it is: the batch, not the model, is at fault (the CLI says so)."""
    try:
        return model(*batch.args, **batch.kwargs)
    except UserError:
        raise
    except SystemExit as exc:
        raise ModelRunError(
            f"the model's forward called sys.exit({exc.code})",
            "raise an exception instead of exiting (--debug shows the traceback)",
        ) from exc
    except Exception as exc:
        if is_out_of_memory(exc):
            raise
        raise locate_failure(model, batch, exc) from exc


def _loss(loss: LossSelector, output: Any, batch: Batch) -> torch.Tensor:
    try:
        return loss(output, batch)
    except UserError:
        raise
    except SystemExit as exc:
        raise exited(exc, "the loss") from exc
    except Exception as exc:
        if is_out_of_memory(exc):
            raise
        raise ModelRunError(
            f"the loss raised {type(exc).__name__}: {first_line(exc)}",
            "check --loss and that targets fit the output (--debug shows the traceback)",
        ) from exc


def _backward(value: torch.Tensor) -> None:
    try:
        value.backward()
    except SystemExit as exc:  # a hook or a custom autograd Function of the model's
        raise exited(exc, "the model's backward") from exc
    except RuntimeError as exc:
        if is_out_of_memory(exc):
            raise
        raise ModelRunError(
            f"the backward pass raised: {first_line(exc)}",
            "the model's forward must be differentiable (--debug shows the traceback)",
        ) from exc


# -- the measured run ---------------------------------------------------------------------------------------


@dataclass
class Setup:
    """What the passes run on, resolved once (api.prepare)."""

    model: nn.Module  # the eager module: hooks go here
    runner: nn.Module  # what is called: the model, or its DDP wrapper
    device: torch.device
    batches: Sequence[Batch]  # train_steps + steps of them, on the host, made as the steps read them
    loss: LossSelector
    layers: list[LayerSpec]
    amp_dtype: torch.dtype | None


@dataclass
class Measurement:
    """What the passes measured, for the diagnosis and the report."""

    layers: list[Layer]
    parameters: list[ParameterRecord]
    loss: list[float | None]
    train_loss: list[float]
    nan_origin: NanOrigin | None
    loss_scale: float | None
    skipped_steps: int
    training: Training | None = None
    # layer name -> (fraction of units in an activation's flat region for every input, units, the activation)
    flat: dict[str, tuple[float, int, str]] = dataclasses.field(default_factory=dict)
    # layer name -> its depth in the first measured forward's graph (depth.py); empty when not watched
    depths: dict[str, int] = dataclasses.field(default_factory=dict)
    # the BatchNorm that normalised fewest values per channel, and how many, when under SMALL_NORM_VALUES
    small_norm: tuple[str, int] | None = None


# BatchNorm over two values per channel: x_hat = +-1 whatever the two values are, so its output does not depend
# on its input and no gradient passes it (dL/dx = g - mean(g) - x_hat mean(g x_hat) = 0) but for what eps (in
# sqrt(var + eps)) and rounding leave, divided by the pair's spread: huge gradients that mean nothing
# (torchvision's EfficientNet-B0 at batch 2, 32 px: 1x1 maps in its last stages, 31 `exploding` errors). One
# value per channel PyTorch refuses itself.
DEGENERATE_NORM_VALUES = 2
# Over m values the batch variance is sigma^2 chi2(m-1)/(m-1), and BN's backward divides by its square root:
# P(a channel's spread under a tenth of sigma, a 10x larger gradient) is 1.4e-3 at m = 4, 7e-7 at m = 8. Below
# 8, a network's thousands of channels hold some so amplified: a note names the layer, since what is measured is
# then the batch's statistics as much as the model.
SMALL_NORM_VALUES = 8


def _check_batch_norms(probe: Probe, layers: Sequence[LayerSpec]) -> tuple[str, int] | None:
    """The BatchNorm layer (train mode) that normalised the fewest values per channel (batch x positions) in
    the first measured step, if under SMALL_NORM_VALUES; UserError at DEGENERATE_NORM_VALUES or fewer, so that
    noise is not judged. SyncBatchNorm across processes pools the batches of all of them, which one process
    cannot count: not checked."""
    pooled = torch.distributed.is_available() and torch.distributed.is_initialized()
    norm_values = probe.take_norm_values()
    counted = [
        (norm_values[spec.index], spec)
        for spec in layers
        if spec.index in norm_values and not (pooled and isinstance(spec.module, nn.SyncBatchNorm))
    ]
    if not counted:
        return None
    values, spec = min(counted, key=lambda item: item[0])
    if values <= DEGENERATE_NORM_VALUES:
        raise UserError(
            f"{spec.name} ({type(spec.module).__name__}) normalises {values} values per channel in train mode (batch "
            "x positions): its output is +-1 whatever its input, so no gradient passes it and what reaches the "
            "layers before it is an artifact of eps and rounding",
            "use batches of 4 or more samples, or larger inputs; or --eval for the running statistics",
        )
    return (spec.name, values) if values < SMALL_NORM_VALUES else None


def small_norm_note(found: tuple[str, int] | None) -> str | None:
    if found is None:
        return None
    name, values = found
    return (
        f"{name} (BatchNorm) normalises only {values} values per channel (batch x positions): its backward divides "
        "by their spread, so some channels' gradients are inflated by chance; judge with the batch size and input "
        "size you train with"
    )


@dataclass(frozen=True)
class TrainPlan:
    """The watched training run before the measured passes (watch.py)."""

    steps: int
    optimizer: OptimizerSource
    lr: float
    weight_decay: float | None = None
    clip: float | None = None
    save_bad_batch: tuple[Path, Path] | None = None  # (as the user gave it, where it is written)


@dataclass(frozen=True)
class Plan:
    """How many passes of which kind, and what to keep from them."""

    steps: int
    training: TrainPlan
    seed: int
    eval_mode: bool
    grad_writer: GradientWriter | None = None
    progress: Progress | None = None
    # the first measured step also counts units in a GELU/SiLU/...'s flat region (flat.py) and reads each layer's
    # depth in the graph (depth.py); not under torchrun, where each process holds another slice of the batch
    # (and may route it elsewhere) and the verdict must be the same on all
    watch_first: bool = False

    @property
    def train_steps(self) -> int:
        return self.training.steps


def measure(setup: Setup, plan: Plan, collector: Collector, combiner: Combiner) -> Measurement:
    """Train (the watched run, watch.py) if asked, then measure `plan.steps` passes with hooks; replay a batch
    that gave NaN/Inf to find where it started. The model is restored afterwards (restore.Restorer), and the
    optimizer's state dropped."""
    from gradcheck_cli.firststep import watching
    from gradcheck_cli.flat import flat_units
    from gradcheck_cli.restore import Restorer

    model = setup.model
    passes = Passes(setup.runner, setup.loss, setup.device, setup.amp_dtype)
    probe = Probe(model, setup.layers, amp_tiny=collector.amp_tiny)
    training = None
    nan_origin = None
    flat: dict[str, tuple[float, int, str]] = {}
    depths: dict[str, int] = {}
    small_norm: tuple[str, int] | None = None
    with (
        seeded(plan.seed, setup.device),
        Restorer(model, save_parameters=plan.train_steps > 0),
        plan.grad_writer or contextlib.nullcontext(),
    ):
        model.train(not plan.eval_mode)
        if plan.train_steps:
            training = _train(setup, passes, plan, combiner)
        collector.prepare()
        first_bad: tuple[Batch, Any] | None = None
        with probe:
            for step in range(plan.steps):
                batch = setup.batches[plan.train_steps + step].to(setup.device)
                rng = torch.random.get_rng_state()
                first = step == 0 and plan.watch_first
                with watching(model, setup.layers, probe) if first else contextlib.nullcontext() as watch:
                    value = _measured_step(passes, probe, collector, batch, rng)
                if watch is not None:
                    flat, depths = flat_units(watch.flat), dict(watch.depth.depth)
                if step == 0:
                    small_norm = _check_batch_norms(probe, setup.layers)
                if plan.grad_writer is not None:
                    plan.grad_writer.add_step(step, setup.layers, 1.0 / passes.scale)
                if first_bad is None and not (math.isfinite(value) and collector.grads_finite(step)):
                    first_bad = (batch, rng)
                if plan.progress:
                    plan.progress("measure", step + 1, plan.steps)
            layers, parameters = collector.finish(probe.ever_active, probe.tape.order, probe.feeds_norm, probe.used_as)
        if first_bad is not None:
            batch, rng = first_bad
            torch.random.set_rng_state(rng)
            with passes.autocast():
                nan_origin = trace_nonfinite(model, setup.runner, batch, setup.loss)
        clear_grads(model)
    loss_scale = collector.loss_scale if setup.amp_dtype == torch.float16 else None
    if training is not None:
        layers = [
            dataclasses.replace(layer, update_ratio=_median_update(training.layer(layer.name))) for layer in layers
        ]
    train_loss = list(training.loss) if training is not None else []
    return Measurement(
        layers,
        parameters,
        collector.loss.values,
        train_loss,
        nan_origin,
        loss_scale,
        collector.skipped_steps,
        training,
        flat,
        depths,
        small_norm,
    )


def _train(setup: Setup, passes: Passes, plan: Plan, combiner: Combiner) -> Training:
    """The watched steps (watch.Watch); a step that diverges ends them, replayed to find where it started."""
    from gradcheck_cli.optimizers import build
    from gradcheck_cli.watch import Watch, save_bad_batch

    spec = plan.training
    watch = Watch(
        setup.model,
        setup.layers,
        build(spec.optimizer, setup.model, spec.lr, spec.weight_decay),
        spec.clip,
        combiner,
        passes.scaler,
    )
    nan_step, origin, saved = None, None, None
    for step in range(spec.steps):
        host_batch = setup.batches[step]
        batch = host_batch.to(setup.device)
        rng = torch.random.get_rng_state()
        if not watch.step(functools.partial(passes.forward_backward, batch)):
            nan_step = step
            torch.random.set_rng_state(rng)  # the same dropout masks as the step that diverged
            with passes.autocast():
                origin = trace_nonfinite(setup.model, setup.runner, batch, setup.loss)
            if spec.save_bad_batch is not None:
                shown, target = spec.save_bad_batch
                saved = save_bad_batch(target, shown, host_batch, setup.model)
            break
        if plan.progress:
            plan.progress("train", step + 1, spec.steps)
    clear_grads(setup.model)
    return watch.result(nan_step, origin, saved, spec.clip)  # the optimizer and its state go with `watch`


def _median_update(layer: TrainingLayer | None) -> float | None:
    """A layer's typical watched update: the median over the steps that made one. A weight that starts at
    zero (a zero-initialised head) has no relative update at its first step, and at its second it changes by
    about its whole norm as it grows from nothing: the steps until it has a norm of its own are left out."""
    if layer is None:
        return None
    ratios = list(layer.update_ratio)
    if ratios and ratios[0] is None:
        grown = next((i for i, r in enumerate(ratios) if r is not None), len(ratios))
        ratios = ratios[grown + 1 :]
    return median(r for r in ratios if r is not None and math.isfinite(r))


def _measured_step(passes: Passes, probe: Probe, collector: Collector, batch: Batch, rng: torch.Tensor) -> float:
    """One measured forward and backward, retried at half the loss scale while fp16 gradients overflow."""
    while True:
        clear_grads(probe.model, probe.parameters)
        torch.random.set_rng_state(rng)  # a retried step sees the same dropout masks
        probe.start_step()
        try:
            loss_value = passes.forward_backward(batch)
        finally:
            probe.stop_step()
        value = collector.collect(probe.tape, loss_value, passes.scale, passes.can_back_off())
        del loss_value  # nothing allocated in a step outlives it (Collector.prepare says why)
        probe.tape.release()
        if value is not None:
            return value
        passes.back_off()  # fp16 overflow: GradScaler would skip this step and halve the scale
