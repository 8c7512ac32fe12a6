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
from gradcheck_cli.errors import ModelRunError, UserError
from gradcheck_cli.losses import LossFunction, LossSelector
from gradcheck_cli.probe import Probe, Restorer, discover_layers
from gradcheck_cli.report import Report
from gradcheck_cli.stats import Collector, histogram_edges
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
    model, unwrap_notes = unwrap(model)
    if not any(p.requires_grad for p in model.parameters()):
        raise UserError(
            f"{type(model).__name__} has no trainable parameters",
            "nothing to check: unfreeze some parameters (requires_grad=True)",
        )
    run_device = _resolve_device(model, device)
    if device is not None:
        model.to(run_device)
    notes = [*notes, *unwrap_notes]
    total = train_steps + steps
    if batches is None:
        prepared, description = synthetic_batches(model, total, batch_size, seed)
        notes.append(f"no data given: random inputs {description}")
    else:
        prepared = collect_batches(batches, total)
    loss = loss_fn if isinstance(loss_fn, LossSelector) else LossSelector(loss_fn, file_loss, seed)

    _materialize_lazy(model, prepared[0].to(run_device))
    layers = discover_layers(model)
    collector = Collector(layers, want_histograms=histograms, want_value_histograms=value_histograms)
    probe = Probe(model, layers)
    train_loss: list[float] = []
    nan_origin = None
    grad_writer = _gradient_writer(save_grads, model, train_steps)
    with (
        _seeded(seed, run_device),
        Restorer(model, save_parameters=train_steps > 0),
        grad_writer or contextlib.nullcontext(),
    ):
        model.train(not eval_mode)
        for step in range(train_steps):
            train_loss.append(_sgd_step(model, prepared[step].to(run_device), loss, lr))
            if progress:
                progress("train", step + 1, train_steps)
        collector.measure_weights()
        first_bad: tuple[Batch, Any] | None = None
        with probe:
            for step in range(steps):
                batch = prepared[train_steps + step].to(run_device)
                rng = torch.random.get_rng_state()
                _clear_grads(model)
                probe.start_step()
                try:
                    loss_value = _forward_backward(model, batch, loss)
                finally:
                    probe.stop_step()
                value = collector.collect(probe.tape, loss_value)
                if grad_writer is not None:
                    grad_writer.add_step(step, layers)
                if first_bad is None and not (math.isfinite(value) and _grads_finite(collector, step)):
                    first_bad = (batch, rng)
                if progress:
                    progress("measure", step + 1, steps)
            layer_records, param_records = collector.finish(probe.ever_active, probe.tape.order, probe.feeds_norm)
        if first_bad is not None:
            batch, rng = first_bad
            torch.random.set_rng_state(rng)
            nan_origin = trace_nonfinite(model, batch, loss, [spec.name for spec in layers])
        _clear_grads(model)

    if grad_writer is not None:
        notes.append(
            f"gradients saved: {grad_writer.path} ({len(grad_writer.header)} tensors, "
            f"{grad_writer.bytes_written / 1e6:.3g} MB)"
        )
    verdict = diagnose(layer_records, collector.loss.values, thresholds, nan_origin=nan_origin, lr=lr)
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
        batch_size=prepared[0].size,
        device=str(run_device),
        mode="eval" if eval_mode else "train",
        seed=seed,
        nan_origin=nan_origin,
        notes=[*notes, *verdict.notes],
        torch_version=torch.__version__,
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
    try:
        return model(*batch.args, **batch.kwargs)
    except (UserError, KeyboardInterrupt):
        raise
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:
        raise locate_failure(model, batch, exc) from exc


def _forward_backward(model: nn.Module, batch: Batch, loss: LossSelector) -> torch.Tensor:
    output = _forward(model, batch)
    try:
        value = loss(output, batch)
    except (UserError, KeyboardInterrupt, torch.OutOfMemoryError):
        raise
    except Exception as exc:
        raise ModelRunError(
            f"the loss raised {type(exc).__name__}: {_first_line(exc)}",
            "check --loss and that targets fit the output (--debug shows the traceback)",
        ) from exc
    try:
        value.backward()
    except (KeyboardInterrupt, torch.OutOfMemoryError):
        raise
    except RuntimeError as exc:
        raise ModelRunError(
            f"the backward pass raised: {_first_line(exc)}",
            "the model's forward must be differentiable (--debug shows the traceback)",
        ) from exc
    return value


def _sgd_step(model: nn.Module, batch: Batch, loss: LossSelector, lr: float) -> float:
    """One plain SGD step (p -= lr * grad), as the tutorial trains, without hooks."""
    _clear_grads(model)
    value = _forward_backward(model, batch, loss)
    with torch.no_grad():
        for param in model.parameters():
            if param.grad is not None:
                param.add_(param.grad, alpha=-lr)
    return float(value.detach())


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
    value_histograms: bool = False,
    save_grads: str | Path | None = None,
    progress: Progress | None = None,
) -> Report:
    """What `gradcheck analyze` does: load TARGET (and --weights, --data, --loss), then analyze()."""
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
        value_histograms=value_histograms,
        save_grads=save_grads,
        progress=progress,
        target=parsed.label() if not model_name else f"{parsed.source}:{model_name}",
        notes=notes,
    )
