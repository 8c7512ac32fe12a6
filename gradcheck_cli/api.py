"""analyze(): the Python API, and the pipeline the CLI runs.

    load -> instrument (probe) -> run passes -> measure (stats) -> diagnose -> Report

Usable from pytest:

    report = gradcheck_cli.analyze(model, (inputs, targets))
    assert report.healthy, report.findings
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from gradcheck_cli.data import DEFAULT_BATCH_SIZE, Batch, collect_batches, synthetic_batches
from gradcheck_cli.diagnose import Thresholds, diagnose
from gradcheck_cli.distributed import Parallel, shard, wrap
from gradcheck_cli.errors import ModelRunError, UserError, is_out_of_memory
from gradcheck_cli.losses import LossFunction, LossSelector
from gradcheck_cli.probe import Probe, Restorer, discover_layers
from gradcheck_cli.report import Report
from gradcheck_cli.stats import Collector, Combiner, histogram_edges
from gradcheck_cli.tracing import locate_failure, trace_nonfinite

if TYPE_CHECKING:
    from gradcheck_cli.gradsave import GradientWriter

Progress = Callable[[str, int, int], None]


def analyze(
    model: nn.Module,
    batches: Any = None,
    loss_fn: str | LossFunction = "auto",
    *,
    steps: int = 3,
    train_steps: int = 0,
    lr: float = 0.01,
    seed: int = 0,
    device: str | torch.device | None = None,
    eval_mode: bool = False,
    thresholds: Thresholds | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    file_loss: LossFunction | None = None,
    histograms: bool = True,
    amp: str | None = None,
    parallel: Parallel | None = None,
    value_histograms: bool = False,
    save_grads: str | Path | None = None,
    progress: Progress | None = None,
    target: str | None = None,
    notes: Sequence[str] = (),
) -> Report:
    """Run `steps` forward/backward passes with hooks and diagnose every layer's gradients.

    model: any nn.Module (a torch.compile wrapper is unwrapped: hooks need the eager module).
    batches: one batch or an iterable of batches; a batch is a tensor (inputs), a tuple (inputs, targets) or
        a dict of keyword arguments. None: random inputs shaped for the first layer (Linear, Conv, Embedding).
    loss_fn: "auto", "cross-entropy", "mse" or a callable (output, targets) -> scalar tensor.
    train_steps, lr: plain SGD steps before measuring, to see the picture after some training.
    device: where to run; None keeps the model where it is. The model is moved there and left there.
    amp: "bf16" or "fp16": passes under torch.autocast; fp16 scales the loss as GradScaler does (gradients are
        reported unscaled, with the loss scale and the fraction that underflows in fp16).
    parallel: from gradcheck_cli.distributed.setup() under torchrun: wrap in DDP or FSDP2, slice the batches,
        combine the statistics across processes. (FSDP shards the model's parameters in place.)
    value_histograms: also keep each layer's signed gradient values per step as a histogram (Layer.
        value_histograms), the tutorial's picture; plots and TensorBoard use it. Off by default: it costs time.
    save_grads: a .safetensors file to write every measured gradient to (see gradsave.py); each step's
        gradients are copied to the CPU, one tensor at a time.

    The model is left as found: no hooks, the same .grad tensors, train/eval flags, buffers (BatchNorm
    running statistics) and, after train_steps, parameter values restored. The global RNG state is untouched.
    """
    if steps < 1:
        raise UserError(f"steps must be at least 1, got {steps}", "use --steps 1 or more")
    if train_steps < 0:
        raise UserError(f"train steps must be 0 or more, got {train_steps}", "use --train-steps 0 or more")
    if not math.isfinite(lr) or lr <= 0:
        raise UserError(f"learning rate must be a positive number, got {lr}", "use e.g. --lr 0.01")
    thresholds = thresholds or Thresholds()
    thresholds.validate()
    amp_dtype = _amp_dtype(amp)
    model, unwrap_notes = unwrap(model)
    if not any(p.requires_grad for p in model.parameters()):
        raise UserError(
            f"{type(model).__name__} has no trainable parameters",
            "nothing to check: unfreeze some parameters (requires_grad=True)",
        )
    run_device = parallel.device if parallel is not None else _resolve_device(model, device)
    if device is not None or parallel is not None:
        model.to(run_device)
    notes = [*notes, *unwrap_notes]
    total = train_steps + steps
    if batches is None:
        prepared, description = synthetic_batches(model, total, batch_size, seed)
        notes.append(f"no data given: random inputs {description}")
    else:
        prepared = collect_batches(batches, total)
    global_batch = prepared[0].size
    if parallel is not None:
        prepared = [shard(batch, parallel) for batch in prepared]
    loss = (
        loss_fn
        if isinstance(loss_fn, LossSelector)
        else LossSelector(
            loss_fn,
            file_loss,
            seed,
            rank=parallel.rank if parallel else 0,
            world_size=parallel.world_size if parallel else 1,
        )
    )

    _materialize_lazy(model, prepared[0].to(run_device))
    runner = wrap(model, parallel) if parallel is not None else model
    layers = discover_layers(model)
    tiny = torch.finfo(amp_dtype).tiny if amp_dtype is not None else None
    combiner = Combiner(parallel.world_size, parallel.sharded) if parallel is not None else Combiner()
    collector = Collector(
        layers,
        want_histograms=histograms,
        combiner=combiner,
        amp_tiny=tiny,
        want_value_histograms=value_histograms,
    )
    probe = Probe(model, layers, amp_tiny=tiny)
    passes = _Passes(runner, loss, run_device, amp_dtype)
    train_loss: list[float] = []
    nan_origin = None
    if save_grads is not None and parallel is not None:
        raise UserError("--save-grads does not work with --parallel yet", "run it in one process, without torchrun")
    grad_writer = _gradient_writer(save_grads, model, train_steps)
    with (
        _seeded(seed, run_device),
        Restorer(model, save_parameters=train_steps > 0),
        grad_writer or contextlib.nullcontext(),
    ):
        model.train(not eval_mode)
        for step in range(train_steps):
            train_loss.append(passes.sgd_step(model, prepared[step].to(run_device), lr))
            if progress:
                progress("train", step + 1, train_steps)
        collector.prepare()
        first_bad: tuple[Batch, Any] | None = None
        with probe:
            for step in range(steps):
                batch = prepared[train_steps + step].to(run_device)
                rng = torch.random.get_rng_state()
                while True:
                    _clear_grads(model)
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
                        break
                    passes.back_off()  # fp16 overflow: GradScaler would skip this step and halve the scale
                if grad_writer is not None:
                    grad_writer.add_step(step, layers, 1.0 / passes.scale)
                if first_bad is None and not (math.isfinite(value) and _grads_finite(collector, step)):
                    first_bad = (batch, rng)
                if progress:
                    progress("measure", step + 1, steps)
            layer_records, param_records = collector.finish(probe.ever_active, probe.tape.order, probe.feeds_norm)
        if first_bad is not None:
            batch, rng = first_bad
            torch.random.set_rng_state(rng)
            with passes.autocast():
                nan_origin = trace_nonfinite(model, runner, batch, loss)
        _clear_grads(model)

    if grad_writer is not None:
        notes.append(
            f"gradients saved: {grad_writer.path} ({len(grad_writer.header)} tensors, "
            f"{grad_writer.bytes_written / 1e6:.3g} MB)"
        )
    verdict = diagnose(layer_records, collector.loss.values, thresholds, nan_origin=nan_origin, lr=lr, amp=amp)
    return Report(
        model=type(model).__name__,
        target=target,
        steps=steps,
        loss=[v for v in collector.loss.values if v is not None],
        layers=verdict.layers,
        parameters=param_records,
        findings=verdict.findings,
        signal=verdict.signal,
        update=verdict.update,
        thresholds=thresholds.as_dict(),
        loss_name=loss.choice.name if loss.choice else "",
        train_steps=train_steps,
        train_loss=train_loss,
        lr=lr,
        batch_size=global_batch,
        device=str(run_device),
        mode="eval" if eval_mode else "train",
        seed=seed,
        nan_origin=nan_origin,
        notes=[*notes, *verdict.notes],
        torch_version=torch.__version__,
        amp=amp,
        loss_scale=collector.loss_scale if amp_dtype == torch.float16 else None,
        skipped_steps=collector.skipped_steps,
        parallel=parallel.mode if parallel else None,
        world_size=parallel.world_size if parallel else 1,
        histogram_edges=histogram_edges(),
    )


def _gradient_writer(save_grads: str | Path | None, model: nn.Module, train_steps: int) -> GradientWriter | None:
    if save_grads is None:
        return None
    from gradcheck_cli.gradsave import GradientWriter, check_path

    path = Path(save_grads)
    check_path(path)
    return GradientWriter(
        path, {"model": type(model).__name__, "train_steps": str(train_steps), "torch_version": torch.__version__}
    )


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# GradScaler's policy: start at 2^16, halve on overflow. A step is retried at most this many times.
MAX_BACKOFFS = 24


def _amp_dtype(amp: str | None) -> torch.dtype | None:
    if amp is None:
        return None
    if amp not in AMP_DTYPES:
        raise UserError(f"unknown --amp '{amp}'", "use bf16 or fp16")
    return AMP_DTYPES[amp]


class _Passes:
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

    def forward_backward(self, batch: Batch) -> torch.Tensor:
        """The loss (unscaled) after backward; gradients carry `scale`."""
        with self.autocast():
            # No name for the output: it is freed once the loss is computed, as in a training loop, not kept
            # through the backward (a language model's logits are often the largest tensor of the step).
            value = _loss(self.loss, _forward(self.runner, batch), batch)
        _backward(self.scaler.scale(value) if self.scaler is not None else value)
        return value

    def sgd_step(self, model: nn.Module, batch: Batch, lr: float) -> float:
        """One plain SGD step (p -= lr * grad), as the tutorial trains, without hooks; fp16 steps that
        overflow are skipped and the scale halved, as GradScaler does."""
        _clear_grads(model)
        value = self.forward_backward(batch)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if self.scaler is not None and not all(bool(torch.isfinite(g).all()) for g in grads):
            if self.can_back_off():
                self.back_off()
            return float(value.detach())
        with torch.no_grad():
            for param in model.parameters():
                if param.grad is not None:
                    param.add_(param.grad, alpha=-lr / self.scale)
        return float(value.detach())


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


def _materialize_lazy(model: nn.Module, batch: Batch) -> None:
    """Lazy modules (nn.LazyLinear...) create their parameters on the first forward: run one, without
    gradients, in eval mode (no BatchNorm statistics move), before hooks and snapshots need the tensors."""
    if not any(isinstance(p, nn.parameter.UninitializedParameter) for p in model.parameters()):
        return
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            _forward(model, batch)
    finally:
        for module, training in modes:
            module.training = training


def _resolve_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    if device is None:
        first = next(model.parameters(), None)
        return first.device if first is not None else torch.device("cpu")
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is available", "use --device cpu or auto")
    return resolved


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed dropout and friends for this run only; the caller's RNG state is restored afterwards."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _clear_grads(model: nn.Module) -> None:
    for param in model.parameters():
        param.grad = None


def _forward(model: nn.Module, batch: Batch) -> Any:
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
    except Exception as exc:
        if is_out_of_memory(exc):
            raise
        raise ModelRunError(
            f"the loss raised {type(exc).__name__}: {_first_line(exc)}",
            "check --loss and that targets fit the output (--debug shows the traceback)",
        ) from exc


def _backward(value: torch.Tensor) -> None:
    try:
        value.backward()
    except RuntimeError as exc:
        if is_out_of_memory(exc):
            raise
        raise ModelRunError(
            f"the backward pass raised: {_first_line(exc)}",
            "the model's forward must be differentiable (--debug shows the traceback)",
        ) from exc


def _grads_finite(collector: Collector, step: int) -> bool:
    for series in collector.param_series:
        norm = series.norm.values[step] if step < len(series.norm.values) else None
        if norm is not None and not math.isfinite(norm):
            return False
    return True


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def analyze_target(
    target: str,
    *,
    model_name: str | None = None,
    weights: str | None = None,
    strict: bool = True,
    allow_pickle: bool = False,
    data: str | None = None,
    loss: str = "auto",
    steps: int = 3,
    batch_size: int = DEFAULT_BATCH_SIZE,
    train_steps: int = 0,
    lr: float = 0.01,
    seed: int = 0,
    device: str = "auto",
    eval_mode: bool = False,
    thresholds: Thresholds | None = None,
    amp: str | None = None,
    parallel: str | None = None,
    value_histograms: bool = False,
    save_grads: str | Path | None = None,
    progress: Progress | None = None,
) -> Report:
    """What `gradcheck analyze` does: load TARGET (and --weights, --data, --loss), then analyze().

    parallel ("ddp" | "fsdp"): join the process group torchrun set up, and leave it at the end."""
    from gradcheck_cli.data import load_data, model_file_batches, parse_data_spec
    from gradcheck_cli.loading import file_function, import_target, load_weights, parse_target, resolve_model
    from gradcheck_cli.losses import NAMED_LOSSES

    if steps < 1:
        raise UserError(f"--steps must be at least 1, got {steps}", "use --steps 1 or more")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}", "use e.g. --batch-size 32")
    parsed = parse_target(target)
    if model_name and parsed.name and model_name != parsed.name:
        raise UserError(
            f"TARGET names '{parsed.name}' but --model names '{model_name}'",
            "give the name once, either as TARGET:NAME or with --model",
        )
    data_spec = parse_data_spec(data) if data else None
    loss_spec: str | LossFunction = loss
    if loss not in NAMED_LOSSES:
        loss_target = parse_target(loss, what="--loss")
        if loss_target.name is None:
            raise UserError(f"unknown loss '{loss}'", "use auto, cross-entropy, mse or FILE.py:FN")
        loss_module = import_target(loss_target)
        found = getattr(loss_module, loss_target.name, None)
        if not callable(found):
            raise UserError(f"{loss_target.source} has no function '{loss_target.name}'", "check the name after ':'")
        loss_spec = found
    torch.manual_seed(seed)  # model files initialise weights at import or build time: make that reproducible
    module = import_target(parsed)
    model = resolve_model(module, model_name or parsed.name, parsed.source)
    notes: list[str] = []
    if weights:
        notes += load_weights(model, Path(weights), strict=strict, allow_pickle=allow_pickle)
    total = train_steps + steps
    batches: list[Batch] | None
    if data_spec is not None:
        batches, data_notes = load_data(data_spec, total, batch_size, seed)
        notes += data_notes
    else:
        batches = model_file_batches(module, total)
    group = None
    if parallel is not None:
        from gradcheck_cli.distributed import setup

        group = setup(parallel, device)
    try:
        return analyze(
            model,
            batches,
            loss_spec,
            steps=steps,
            train_steps=train_steps,
            lr=lr,
            seed=seed,
            device=device,
            eval_mode=eval_mode,
            thresholds=thresholds,
            batch_size=batch_size,
            file_loss=file_function(module, "loss_fn"),
            amp=amp,
            parallel=group,
            value_histograms=value_histograms,
            save_grads=save_grads,
            progress=progress,
            target=parsed.label() if not model_name else f"{parsed.source}:{model_name}",
            notes=notes,
        )
    finally:
        if group is not None:
            from gradcheck_cli.distributed import teardown

            teardown()
