"""The report: what was measured, what it means, and its versioned JSON form.

Plain dataclasses with no torch inside, so a report can be built, compared and rendered without torch (and
read back from JSON by `gradcheck compare`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

SCHEMA = "gradcheck.report/1"

SEVERITIES = ("warning", "error")
# Every kind of finding; the CLI's --fail-on accepts these names.
KINDS = ("vanishing", "exploding", "nan", "dead", "saturated", "unused")
DEFAULT_FAIL_ON = ("vanishing", "exploding", "nan", "dead")
STATUSES = ("ok", "vanishing", "exploding", "nan", "dead", "saturated", "frozen", "unused")
# Which view of the gradients raised a finding.
VIEWS = ("signal", "update", "numeric", "activation", "usage")


@dataclass(frozen=True)
class Finding:
    """One problem with one layer (or with the loss: layer "<loss>"), its evidence and its fix."""

    layer: str
    kind: str
    severity: str
    view: str
    message: str
    fix: str
    factor: float | None = None  # how far past the threshold's reference, e.g. 1e-3 for "1000x smaller"

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ParameterRecord:
    """One tensor from model.named_parameters(), measured over the steps."""

    name: str
    shape: tuple[int, ...]
    requires_grad: bool
    numel: int
    layers: tuple[str, ...]  # every module that owns this tensor (tied weights have several)
    grad_norm: float | None  # L2 norm of the gradient, mean over steps; None when it never got one
    grad_norm_steps: tuple[float | None, ...]
    weight_norm: float
    grad_to_weight: float | None
    rms: float | None
    max_abs: float | None
    zero_fraction: float | None
    nonfinite: int


@dataclass(frozen=True)
class ValueHistogram:
    """A layer's gradient values in one step, the tutorial's histogram: counts in len(counts) equal bins over
    [-limit, limit] (limit = the largest |g| seen), estimated from a sample of at most 65,536 values per tensor
    and scaled to all elements."""

    step: int  # measurement step (0-based)
    limit: float
    counts: tuple[int, ...]

    def edges(self) -> list[float]:
        bins = len(self.counts)
        return [self.limit * (2 * i / bins - 1) for i in range(bins + 1)]


@dataclass(frozen=True)
class Layer:
    """A module that directly owns parameters, measured over the steps, with its verdict."""

    name: str
    type: str  # class name
    category: str  # linear | conv | embedding | norm | recurrent | attention | other
    params: int
    trainable_params: int
    parameters: tuple[str, ...]  # names as named_parameters() gives them
    calls: float  # forward calls per step (median)
    forward_index: int | None  # position in the order of first forward calls; None if never called
    grad_norm: float | None  # L2 norm of all its trainable parameters' gradients, mean over steps
    grad_norm_median: float | None
    grad_norm_steps: tuple[float | None, ...]
    weight_norm: float
    grad_to_weight: float | None  # median over steps; weight tensors only (see README)
    grad_to_weight_steps: tuple[float | None, ...]
    output_grad_norm: float | None  # ||dL/dz||, z = the module's output; mean over steps
    output_grad_norm_median: float | None
    output_grad_norm_steps: tuple[float | None, ...]
    # ||dL/dz|| per position (batch x sequence x spatial), summed over units/channels: what the signal view
    # compares across layers, since mean-field theory treats positions like samples and channels like width.
    output_grad_per_position: float | None
    output_grad_per_position_steps: tuple[float | None, ...]
    # max/min over steps of ||g|| and of ||dL/dz||: how much the batches disagree (1.0 = identical)
    grad_norm_spread: float | None
    output_grad_spread: float | None
    rms: float | None
    max_abs: float | None
    zero_fraction: float | None
    nonfinite: int
    input_rms: float | None  # RMS of the first tensor the module received, median over steps
    input_zero_fraction: float | None
    dead_fraction: float | None  # ReLU-family units fed by this layer that never activated
    saturated_fraction: float | None  # sigmoid/tanh inputs fed by this layer that sit in saturation
    zero_grad_unit_fraction: float | None  # output units whose weight gradient was 0 in every step
    histogram: tuple[int, ...] | None = None  # counts of log10|g| in fixed bins (see HISTOGRAM_EDGES)
    feeds_norm: bool = False  # its output goes straight into a normalisation layer: scale-invariant
    # per-step signed-value histograms; only when asked for (analyze(value_histograms=True), --plot, --tensorboard)
    value_histograms: tuple[ValueHistogram, ...] | None = None
    # --amp only: fraction of gradient values that underflow the AMP dtype: nonzero but below its smallest
    # normal number, so subnormal (losing precision) or flushed to zero; sampled; parameter gradients and dL/dz
    underflow_fraction: float | None = None
    output_grad_underflow_fraction: float | None = None
    status: str = "ok"
    severity: str | None = None

    @property
    def frozen(self) -> bool:
        return self.trainable_params == 0


@dataclass(frozen=True)
class SignalSummary:
    """The signal-propagation view: how dL/dz changes along the forward order."""

    chain: tuple[str, ...]  # layers used for the fit, in forward order
    gain_per_layer: float | None  # robust geometric fit of consecutive ratios (output end -> input end)
    total_factor: float | None  # fitted change of ||dL/dz|| from the output end to the input end


@dataclass(frozen=True)
class UpdateSummary:
    """The update-balance view: each weight layer's ||g||/||W|| against the network's median."""

    layers: tuple[str, ...]
    median_grad_to_weight: float | None


@dataclass(frozen=True)
class NanOrigin:
    """Where non-finite values first appeared."""

    phase: str  # "input" | "forward" | "loss" | "backward"
    module: str | None
    detail: str


@dataclass
class Report:
    """Everything one analysis found. `healthy` is False when any finding is an error."""

    model: str
    steps: int
    loss: list[float]
    layers: list[Layer]
    parameters: list[ParameterRecord]
    findings: list[Finding]
    signal: SignalSummary
    update: UpdateSummary
    thresholds: dict[str, float]
    loss_name: str = ""
    target: str | None = None
    train_steps: int = 0
    train_loss: list[float] = field(default_factory=list)
    lr: float = 0.01
    batch_size: int | None = None
    device: str = "cpu"
    mode: str = "train"
    seed: int = 0
    nan_origin: NanOrigin | None = None
    notes: list[str] = field(default_factory=list)
    torch_version: str = ""
    amp: str | None = None  # "bf16" | "fp16"
    loss_scale: float | None = None  # fp16: the GradScaler scale the reported (unscaled) gradients carried
    skipped_steps: int = 0  # fp16: steps whose gradients overflowed and were retried at half the scale
    parallel: str | None = None  # "ddp" | "fsdp"
    world_size: int = 1
    # Edges (log10 |g|) of every layer's `histogram`: written into the report so that a plot needs nothing else.
    histogram_edges: list[float] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return not any(f.severity == "error" for f in self.findings)

    def failing(self, fail_on: Iterable[str] = DEFAULT_FAIL_ON, fail_level: str = "error") -> list[Finding]:
        """The findings that should fail a CI step under these options."""
        kinds = set(fail_on)
        levels = {"error"} if fail_level == "error" else {"warning", "error"}
        return [f for f in self.findings if f.kind in kinds and f.severity in levels]

    def layer(self, name: str) -> Layer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        from gradcheck_cli._version import __version__

        return {
            "schema": SCHEMA,
            "gradcheck_version": __version__,
            "torch_version": self.torch_version,
            "model": self.model,
            "target": self.target,
            "healthy": self.healthy,
            "steps": self.steps,
            "train_steps": self.train_steps,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "device": self.device,
            "mode": self.mode,
            "seed": self.seed,
            "loss_name": self.loss_name,
            "loss": self.loss,
            "train_loss": self.train_loss,
            "thresholds": self.thresholds,
            "signal": dataclasses.asdict(self.signal),
            "update": dataclasses.asdict(self.update),
            "nan_origin": dataclasses.asdict(self.nan_origin) if self.nan_origin else None,
            "amp": self.amp,
            "loss_scale": self.loss_scale,
            "skipped_steps": self.skipped_steps,
            "parallel": self.parallel,
            "world_size": self.world_size,
            "notes": self.notes,
            "histogram_edges": self.histogram_edges,
            "findings": [f.as_dict() for f in self.findings],
            "layers": [_layer_dict(layer) for layer in self.layers],
            "parameters": [dataclasses.asdict(p) for p in self.parameters],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(_finite(self.to_dict()), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        """The inverse of to_dict (after a JSON round trip): what `gradcheck compare` and plots read.

        Raises ValueError naming what is wrong when `data` is not a gradcheck.report/1 document.
        """
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            found = data.get("schema") if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"not a {SCHEMA} document (schema: {found!r})")
        try:
            return cls(
                model=data["model"],
                target=data.get("target"),
                steps=data["steps"],
                loss=[_float(v) for v in data["loss"]],
                layers=[_record(Layer, item, _LAYER_TEXT) for item in data["layers"]],
                parameters=[_record(ParameterRecord, item, _PARAMETER_TEXT) for item in data["parameters"]],
                findings=[_record(Finding, item, _FINDING_TEXT) for item in data["findings"]],
                signal=_record(SignalSummary, data["signal"], {"chain"}),
                update=_record(UpdateSummary, data["update"], {"layers"}),
                thresholds={k: _float(v) for k, v in data["thresholds"].items()},
                loss_name=data.get("loss_name", ""),
                train_steps=data.get("train_steps", 0),
                train_loss=[_float(v) for v in data.get("train_loss", [])],
                lr=_float(data.get("lr", 0.01)),
                batch_size=data.get("batch_size"),
                device=data.get("device", "cpu"),
                mode=data.get("mode", "train"),
                seed=data.get("seed", 0),
                nan_origin=_record(NanOrigin, data["nan_origin"], {"phase", "module", "detail"})
                if data.get("nan_origin")
                else None,
                notes=list(data.get("notes", [])),
                torch_version=data.get("torch_version", ""),
                histogram_edges=[_float(v) for v in data.get("histogram_edges", [])],
            )
        except (KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"malformed {SCHEMA} document ({type(error).__name__}: {error})") from None


# Fields that hold text, and so are never read as the strings "nan"/"inf" that stand for numbers in JSON.
_LAYER_TEXT = {"name", "type", "category", "parameters", "status", "severity"}
_PARAMETER_TEXT = {"name", "layers"}
_FINDING_TEXT = {"layer", "kind", "severity", "view", "message", "fix"}


def _float(value: Any) -> Any:
    """A JSON number back to a float: "nan", "inf", "-inf" as written by _finite; lists become tuples."""
    if isinstance(value, str):
        return float(value) if value in ("nan", "inf", "-inf") else value
    if isinstance(value, list):
        return tuple(_float(v) for v in value)
    return value


def _record(cls: type[Any], data: dict[str, Any], text: set[str]) -> Any:
    """One dataclass from its dict: known fields only (a newer report may have more), numbers restored."""
    values: dict[str, Any] = {}
    for item in dataclasses.fields(cls):
        if item.name not in data:
            continue  # a field added after this report was written: its default applies
        value = data[item.name]
        if item.name == "value_histograms" and value is not None:
            value = tuple(ValueHistogram(h["step"], _float(h["limit"]), tuple(h["counts"])) for h in value)
        elif item.name in text:
            value = tuple(value) if isinstance(value, list) else value
        else:
            value = _float(value)
        values[item.name] = value
    return cls(**values)


def _layer_dict(layer: Layer) -> dict[str, Any]:
    data = dataclasses.asdict(layer)
    data["frozen"] = layer.frozen
    return data


def _finite(value: Any) -> Any:
    """JSON has no NaN or Infinity: write them as the strings "nan", "inf", "-inf" (documented)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def median(values: Sequence[float]) -> float | None:
    """Median of the finite values; None for none."""
    finite = sorted(v for v in values if v is not None and math.isfinite(v))
    if not finite:
        return None
    mid = len(finite) // 2
    return finite[mid] if len(finite) % 2 else 0.5 * (finite[mid - 1] + finite[mid])
