"""Watch a short training run (--train-steps): real optimizer steps, every one measured.

A watched step is the step a training loop takes (forward, backward, fp16 unscale, clip_grad_norm_, the
optimizer's step, the scheduler's), plus, on the device and without hooks:

- per parameter: ||g||^2 before clipping; for weights whose rows are output units, the rows with no usable
  gradient (reduce.STARVED_UNIT, the dead-unit test of the measured passes);
- the update the optimizer actually made, ||W_after - W_before||^2, against one kept copy of the weights
  (refreshed in place after each step: memory does not grow with the steps), so it is right for any
  optimizer; ||W_before||^2 from the same copy;
- for weights stored in bfloat16 or float16, on their leading values (STALL_SAMPLE), how many had a nonzero
  gradient but did not change: updates below the precision of the weight's dtype.

Then one transfer to the host (steps.transfer, combined across processes like the measured passes). A step
whose loss or gradients are not finite (and that the fp16 loss scaler does not skip) ends the run: the
weights go back to what they were before it, the batch is replayed to find where the NaN started
(tracing.trace_nonfinite), and --save-bad-batch writes the batch and those weights, which replay it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic

import torch
from torch import nn

from gradcheck_cli.batch import Batch
from gradcheck_cli.distributed import GRADIENT_SUM, Combiner, local
from gradcheck_cli.errors import ModelRunError, UserError, exited, first_line, is_out_of_memory
from gradcheck_cli.files import bad_batch_weights
from gradcheck_cli.layers import LayerSpec, has_units, is_matrix
from gradcheck_cli.optimizers import Built, current_lr
from gradcheck_cli.reduce import STARVED_UNIT, norm_dtype, sample, square_norm
from gradcheck_cli.report import NanOrigin, Training, TrainingLayer
from gradcheck_cli.steps import Step as StepRecord
from gradcheck_cli.steps import V, combined, transfer

# clip_grad_norm_'s own guard against dividing by a zero norm
CLIP_EPS = 1e-6
# Norms are accumulated in float32 (float64 reductions cost 27x more on a CPU). A diverging run's gradients
# reach 1e19 and beyond, where a float32 sum of squares overflows to Inf: a step whose norm is not finite gets
# its NaN/Inf values counted, and when there are none its norms are taken again in float64 (Watch._overflow),
# so a finite step never reads as NaN.
WIDE = torch.float64


@dataclass
class TrainParamStep(Generic[V]):
    """One parameter in one watched step."""

    grad_sq: V | None = combined(GRADIENT_SUM)  # ||g||^2 before clipping (after fp16 unscaling)
    dead_rows: V | None = combined(GRADIENT_SUM)  # rows (output units) with no usable gradient
    delta_sq: V | None = combined(GRADIENT_SUM)  # ||W_after - W_before||^2
    weight_sq: V | None = combined(GRADIENT_SUM)  # ||W_before||^2
    stalled: V | None = combined(GRADIENT_SUM)  # sampled values with g != 0 whose weight did not change
    moving: V | None = combined(GRADIENT_SUM)  # sampled values with g != 0


@dataclass
class Tracked:
    """A trainable tensor of the model, the copy of it kept to measure each step's update, and its layer."""

    name: str
    param: nn.Parameter
    kept: torch.Tensor  # the weights before the current step (this process's shard)
    layer: int  # index of the first layer owning it
    units: bool  # its rows (dim 0) are the layer's output units
    weight: bool  # counts in the layer's ||dW||/||W|| (its matrices, or all its tensors when it has none)


@dataclass
class HostSeries:
    """What the watched steps measured, on the host."""

    loss: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    clipped: list[bool] = field(default_factory=list)
    loss_scale: list[float] = field(default_factory=list)
    skipped: list[bool] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    params: list[dict[int, TrainParamStep[float]]] = field(default_factory=list)
    nonfinite: list[dict[int, int]] = field(default_factory=list)  # counted only in steps whose norm is not finite


@dataclass(frozen=True)
class Watched:
    training: Training
    bad_batch: Batch | None  # the batch of the step that diverged (and the run's weights are before it)


def track(layers: list[LayerSpec]) -> list[Tracked]:
    """Every trainable tensor once (a tied tensor under its first owner), with the copy its updates are
    measured against."""
    seen: set[int] = set()
    tracked = []
    for spec in layers:
        trainable = [(n, p) for n, p in spec.params if p.requires_grad]
        matrices = any(is_matrix(p) for _, p in trainable)
        for name, param in trainable:
            if id(param) in seen:
                continue
            seen.add(id(param))
            units = param.dim() >= 2 and has_units(spec) and spec.category != "embedding"
            weight = is_matrix(param) or not matrices
            kept = local(param.detach()).clone()
            tracked.append(Tracked(name, param, kept, spec.index, units, weight))
    return tracked


class Watch:
    """Takes the watched steps; see the module's docstring."""

    def __init__(
        self,
        model: nn.Module,
        layers: list[LayerSpec],
        built: Built,
        clip: float | None,
        combiner: Combiner,
        scaler: torch.amp.GradScaler | None,
    ) -> None:
        self.model = model
        self.layers = layers
        self.built = built
        self.clip = clip
        self.combiner = combiner
        self.scaler = scaler
        self.tracked = track(layers)
        self.scratch = Scratch([t.kept for t in self.tracked if t.weight])
        self.series = HostSeries()

    def step(self, backward: Callable[[], torch.Tensor]) -> bool:
        """One watched step: `backward` runs forward and backward and returns the (unscaled) loss. Returns
        False when the step diverged: the weights are then put back to what they were before it."""
        optimizer = self.built.optimizer
        optimizer.zero_grad(set_to_none=True)
        loss = backward()
        scale = float(self.scaler.get_scale()) if self.scaler is not None else None
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        # every rank's loss is the mean over its slice of the batch: the global loss is their mean
        device_step: StepRecord[torch.Tensor] = StepRecord(loss=loss.detach().float() / self.combiner.world_size)
        samples = {}
        for index, item in enumerate(self.tracked):
            record, grad_sample = _gradient(item)
            device_step.params[index] = record
            samples[index] = grad_sample
        total = _global_norm(device_step, self.combiner)
        if self.clip is not None:
            self._clip(total)
        lr = current_lr(optimizer)
        # only what the optimizer steps can stall: a tensor it leaves out, or steps at lr 0, is kept still on purpose
        stepped = {id(p) for group in optimizer.param_groups if group.get("lr", 0) > 0 for p in group["params"]}
        self._optimizer_step()
        for index, item in enumerate(self.tracked):
            _update(
                item, device_step.params[index], samples[index] if id(item.param) in stepped else None, self.scratch
            )
        host = transfer(device_step, self.combiner, loss.device)
        grad_norm = math.sqrt(sum(p.grad_sq or 0.0 for p in host.params.values()))
        nonfinite = self._nonfinite() if not math.isfinite(grad_norm) else {}
        if not math.isfinite(grad_norm) and not any(nonfinite.values()):
            grad_norm = self._overflow(host.params)
        skipped = self.scaler is not None and not math.isfinite(grad_norm)
        self.series.loss.append(host.loss)
        self.series.grad_norm.append(grad_norm)
        self.series.clipped.append(self.clip is not None and grad_norm > self.clip)
        self.series.loss_scale.append(scale if scale is not None else 1.0)
        self.series.skipped.append(skipped)
        self.series.lr.append(lr)
        self.series.params.append(host.params)
        self.series.nonfinite.append(nonfinite)
        if not math.isfinite(host.loss) or (not math.isfinite(grad_norm) and not skipped):
            self._restore()
            return False
        with torch.no_grad():
            torch._foreach_copy_([t.kept for t in self.tracked], [local(t.param.detach()) for t in self.tracked])
        return True

    def _clip(self, total: torch.Tensor) -> None:
        """clip_grad_norm_ with the norm already measured (the same coefficient, without a second pass)."""
        assert self.clip is not None
        grads = [t.param.grad for t in self.tracked if t.param.grad is not None]
        if self.combiner.sharded:  # FSDP: torch's own, which knows DTensor shards
            torch.nn.utils.clip_grad_norm_([t.param for t in self.tracked], self.clip)
            return
        coefficient = torch.clamp(self.clip / (total + CLIP_EPS), max=1.0)
        torch._foreach_mul_(grads, coefficient)

    def _optimizer_step(self) -> None:
        try:
            if self.scaler is not None:
                self.scaler.step(self.built.optimizer)
                self.scaler.update()
            else:
                self.built.optimizer.step()
            if self.built.scheduler is not None:
                self.built.scheduler.step()
        except UserError:
            raise
        except SystemExit as exc:
            raise exited(exc, "the optimizer's step") from exc
        except Exception as exc:
            if is_out_of_memory(exc):
                raise
            raise ModelRunError(
                f"the optimizer's step raised {type(exc).__name__}: {first_line(exc)}",
                "check --optimizer / build_optimizer (--debug shows the traceback)",
            ) from exc

    def _nonfinite(self) -> dict[int, int]:
        """NaN/Inf gradient values per tensor: one more transfer, only in a step whose norm is not finite."""
        grads = {i: local(t.param.grad.detach()) for i, t in enumerate(self.tracked) if t.param.grad is not None}
        if not grads:
            return {}
        counts = torch.stack([(~torch.isfinite(g)).sum() for g in grads.values()]).float()
        self.combiner.grads(counts)
        return dict(zip(grads, (int(c) for c in counts.tolist()), strict=True))

    def _overflow(self, params: dict[int, TrainParamStep[float]]) -> float:
        """Every gradient value is finite but a float32 sum of squares overflowed: the norms again in float64.
        Under --clip the gradients are already scaled as clip_grad_norm_ scales them on an Inf norm (to 0),
        which is what the user's loop does too: the norm before clipping is then reported as Inf."""
        if self.clip is not None:
            return math.inf
        for index, item in enumerate(self.tracked):
            record = params[index]
            if item.param.grad is not None and record.grad_sq is not None and not math.isfinite(record.grad_sq):
                grad = local(item.param.grad.detach())
                square = torch.linalg.vector_norm(grad, dtype=WIDE).square()
                self.combiner.grads(square)
                record.grad_sq = float(square)
        return math.sqrt(sum(p.grad_sq or 0.0 for p in params.values()))

    def _restore(self) -> None:
        with torch.no_grad():
            for item in self.tracked:
                local(item.param.detach()).copy_(item.kept)

    def result(
        self, nan_step: int | None, origin: NanOrigin | None, bad_batch_path: str | None, clip: float | None
    ) -> Training:
        series = self.series
        layers = []
        for spec in self.layers:
            mine = [(i, t) for i, t in enumerate(self.tracked) if t.layer == spec.index]
            if mine:
                layers.append(_layer_series(spec, mine, series))
        return Training(
            optimizer=self.built.description,
            clip=clip,
            steps=len(series.loss),
            loss=tuple(series.loss),
            grad_norm=tuple(series.grad_norm),
            clipped=tuple(series.clipped),
            loss_scale=tuple(series.loss_scale) if self.scaler is not None else None,
            skipped=tuple(series.skipped),
            lr=tuple(series.lr),
            layers=tuple(layers),
            nan_step=nan_step,
            nan_origin=origin,
            bad_batch=bad_batch_path,
        )


def _gradient(item: Tracked) -> tuple[TrainParamStep[torch.Tensor], torch.Tensor | None]:
    """||g||^2 (and the dead rows of a unit weight) before clipping, and a sample of g for the stall count."""
    record: TrainParamStep[torch.Tensor] = TrainParamStep()
    if item.param.grad is None:
        return record, None
    grad = local(item.param.grad.detach())
    sparse = grad.is_sparse
    if sparse:
        grad = grad.coalesce().values()
    dtype = norm_dtype(grad)
    if item.units and grad.dim() >= 2 and grad.shape[0] > 0:
        rows = torch.linalg.vector_norm(grad.reshape(grad.shape[0], -1), dim=1, dtype=dtype).square()
        record.grad_sq = rows.sum()
        # the measured passes' dead-unit test, in one step: a row far below the layer's mean row is no gradient
        record.dead_rows = (rows <= rows.mean() * STARVED_UNIT**2).sum().to(dtype)
    else:
        record.grad_sq = square_norm(grad)
    if not item.weight or sparse or not _narrow(item.param):
        return record, None
    return record, _leading(grad)


def _update(
    item: Tracked, record: TrainParamStep[torch.Tensor], grad_sample: torch.Tensor | None, scratch: Scratch
) -> None:
    """The step's update against the kept copy, the difference written into a reused buffer (a fresh
    tensor-sized temporary costs more than the subtraction: the allocator maps and faults in its pages)."""
    if not item.weight:
        return
    after = local(item.param.detach())
    with torch.no_grad():
        delta = scratch.difference(after, item.kept)
        record.delta_sq = square_norm(delta)
        record.weight_sq = square_norm(item.kept)
        if grad_sample is not None:
            moving = grad_sample != 0
            record.moving = torch.count_nonzero(moving)  # 3x faster than a sum of booleans on a CPU
            record.stalled = torch.count_nonzero(moving & (_leading(delta) == 0))


# The stall count reads the first STALL_SAMPLE values of each weight (whole leading rows: units, which are
# initialised and updated alike), a view with no copy; a random gather costs a tenth of a millisecond per
# tensor, as much as the rest of the watch on a 1M-parameter model. 16,384 values give the fraction to within
# 1% (binomial standard error <= 0.4%), far finer than the thresholds (50%, 90%).
STALL_SAMPLE = 16384


def _narrow(param: torch.Tensor) -> bool:
    """Weights stored with less precision than float32 (bfloat16: 8 significant bits, float16: 11), whose
    updates the dtype itself can lose. A float32 weight is the precision training keeps master weights in:
    when its update rounds away, the update was ~1e-8 of it, which is a gradient too small for the layer
    (the update view compares those), not a dtype too coarse (ConvNeXt's branches behind LayerScale 1e-6 get
    such updates from SGD until the scale grows)."""
    return param.is_floating_point() and torch.finfo(param.dtype).eps > torch.finfo(torch.float32).eps


def _leading(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.is_contiguous():
        return tensor.reshape(-1)[:STALL_SAMPLE]
    return sample(tensor, STALL_SAMPLE)


class Scratch:
    """One flat buffer per dtype and device, as large as the largest tensor: where W_after - W_before goes."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.sizes: dict[tuple[torch.dtype, torch.device], int] = {}
        for tensor in tensors:
            key = (tensor.dtype, tensor.device)
            self.sizes[key] = max(self.sizes.get(key, 0), tensor.numel())
        self.buffers: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def difference(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        key = (a.dtype, a.device)
        if key not in self.buffers:
            self.buffers[key] = torch.empty(self.sizes.get(key, a.numel()), dtype=a.dtype, device=a.device)
        out = self.buffers[key][: a.numel()].view(a.shape)
        torch.sub(a, b, out=out)
        return out


def _global_norm(step: StepRecord[torch.Tensor], combiner: Combiner) -> torch.Tensor:
    """The global gradient norm on the device, before clipping (summed over shards under FSDP, only where
    clipping needs it)."""
    squares = [record.grad_sq for record in step.params.values() if record.grad_sq is not None]
    if not squares:
        return torch.zeros(())
    total = torch.stack(squares).sum()
    if combiner.sharded:
        combiner.grads(total)
    return total.sqrt()


def _layer_series(spec: LayerSpec, mine: list[tuple[int, Tracked]], series: HostSeries) -> TrainingLayer:
    grad_norm: list[float | None] = []
    ratio: list[float | None] = []
    dead: list[float | None] = []
    stalled: list[float | None] = []
    rows = sum(t.param.shape[0] for _, t in mine if t.units)
    nonfinite = [sum(counts.get(i, 0) for i, _ in mine) for counts in series.nonfinite]
    for params in series.params:
        records = [params[i] for i, _ in mine]
        grads = [r.grad_sq for r in records if r.grad_sq is not None]
        grad_norm.append(math.sqrt(sum(grads)) if grads else None)
        weights = [params[i] for i, t in mine if t.weight]
        delta = sum(r.delta_sq or 0.0 for r in weights)
        weight = sum(r.weight_sq or 0.0 for r in weights)
        ratio.append(math.sqrt(delta / weight) if weight > 0 and math.isfinite(delta) else None)
        dead_rows = [r.dead_rows for r in records if r.dead_rows is not None]
        dead.append(sum(dead_rows) / rows if dead_rows and rows else None)
        moving = sum(r.moving or 0.0 for r in weights)
        stalled.append(sum(r.stalled or 0.0 for r in weights) / moving if moving else None)
    return TrainingLayer(
        name=spec.name,
        grad_norm=tuple(grad_norm),
        update_ratio=tuple(ratio),
        dead_fraction=tuple(dead),
        stalled_fraction=tuple(stalled),
        nonfinite=tuple(nonfinite),
    )


def check_savable(batch: Batch) -> None:
    """--save-bad-batch writes what --data reads: one input tensor and optional targets (checked up front)."""
    if batch.kwargs or len(batch.args) != 1 or not isinstance(batch.args[0], torch.Tensor):
        raise UserError(
            "--save-bad-batch saves batches of one input tensor (and targets), as --data reads them; "
            "this model's batches are not",
            "drop --save-bad-batch, or save the batch from your own loop",
        )
    if batch.targets is not None and not isinstance(batch.targets, torch.Tensor):
        raise UserError(
            "--save-bad-batch saves targets that are one tensor; this model's are not", "drop --save-bad-batch"
        )


def save_bad_batch(path: Path, shown: Path, batch: Batch, model: nn.Module) -> str:
    """The diverging step's batch as --data reads it ('inputs', 'targets'), and beside it the weights the
    step started from (FILE.weights.safetensors, for --weights): the pair replays the NaN."""
    from gradcheck_cli.gradsave import GradientWriter

    tensors = [batch.args[0]]
    weights_path = bad_batch_weights(path)
    option = "--save-bad-batch"
    with GradientWriter(shown, {"format": "gradcheck.batch/1"}, path, option) as writer:
        writer.add("inputs", tensors[0])
        if isinstance(batch.targets, torch.Tensor):
            writer.add("targets", batch.targets)
    with GradientWriter(bad_batch_weights(shown), {"format": "gradcheck.weights/1"}, weights_path, option) as out:
        for name, value in model.state_dict().items():
            if isinstance(value, torch.Tensor):
                out.add(name, local(value))
    return str(shown)


def bad_step_note(training: Training) -> str | None:
    if training.bad_batch is None:
        return None
    weights = bad_batch_weights(Path(training.bad_batch))
    return (
        f"bad batch saved: {training.bad_batch} (step {training.nan_step}); replay it on the weights of that step: "
        f"--data {training.bad_batch} --weights {weights}"
    )
