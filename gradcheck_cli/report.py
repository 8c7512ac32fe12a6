"""The report: what was measured, what it means, and its versioned JSON form.

Plain dataclasses with no torch inside, so a report can be built, compared and rendered without torch (and
read back from JSON by `gradcheck compare`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from gradcheck_cli.kinds import DEFAULT_FAIL_ON

SCHEMA = "gradcheck.report/1"


@dataclass(frozen=True)
class Finding:
    """One problem with one layer (or with the loss: layer "<loss>"), its evidence and its fix. One cause is one
    finding: a trend of the signal view that leaves several layers past a threshold is reported on the first of
    them, with the others in `also` (they carry its status in the table)."""

    layer: str
    kind: str
    severity: str
    view: str
    message: str
    fix: str
    factor: float | None = None  # how far past the threshold's reference, e.g. 1e-3 for "1000x smaller"
    also: tuple[str, ...] = ()  # the other layers this finding covers

    def covers(self, name: str) -> bool:
        """Whether this finding is about layer `name` (its own layer or one of `also`)."""
        return name == self.layer or name in self.also


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
    [-limit, limit] (limit = the largest |g| seen), estimated from a sample of at most 8,192 values per tensor
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
    histogram: tuple[int, ...] | None = None  # counts of |g| in fixed power-of-two bins (Report.histogram_edges)
    feeds_norm: bool = False  # its output goes straight into a normalisation layer: scale-invariant
    # per-step signed-value histograms; only when asked for (analyze(value_histograms=True), --plot, --tensorboard)
    value_histograms: tuple[ValueHistogram, ...] | None = None
    # the number of units behind dead_fraction (or zero_grad_unit_fraction when that is what was measured)
    units: int | None = None
    # --amp only: fraction of gradient values that underflow the AMP dtype: nonzero but below its smallest
    # normal number, so subnormal (losing precision) or flushed to zero; sampled; parameter gradients and dL/dz
    underflow_fraction: float | None = None
    output_grad_underflow_fraction: float | None = None
    # its trainable parameters are all per-channel scales or shifts (norms, LayerScale, ReZero): none mixes
    # features (layers.is_matrix), so a step's size relative to them says nothing about its stability; a tied
    # matrix counts for its first owner only (a head that adds its own bias to a tied embedding table)
    scale_only: bool = False
    # elements per unit of dL/dz (batch x sequence x spatial positions) in a step: layers with the same count
    # see the signal at the same resolution, which is what the signal view compares
    output_positions: float | None = None
    # every gradient is exactly 0 only because a zero-initialised layer after it multiplies its signal by 0:
    # measured by opening those layers (passes.open_gates); it learns once they move
    gated: bool = False
    # no gradient in any step only because it feeds outputs of the model that the loss does not read (an
    # auxiliary classifier): measured by a backward from those outputs (confirm.side_outputs); not judged
    side_output: bool = False
    # every gradient exactly 0, and the loss the same whatever its parameters hold (unread.unread_parameters):
    # nothing it computes reaches the loss (the model reads one class token of a block that also transforms
    # the others); unused, not dead
    unread: bool = False
    # more than role_error below the network median, or most of its units starved (zero_grad_unit_fraction), only
    # because small per-channel scales (LayerScale) gate its path: measured by setting them to 1
    # (scales.open_scales); it learns as they grow
    behind_scales: bool = False
    # a tied tensor is one verdict: this module only reuses the parameters of `alias_of` (its dL/dz is its own)
    alias_of: str | None = None
    # convolutions: kernel and grouping (layers.layout: "3x3 depthwise", "1x1"); one role holds one layout
    layout: str | None = None
    # recurrent layers: ||dL/dx_t|| per time step under the model's loss, the first step first (confirm.through_time)
    time_grad_norms: tuple[float, ...] | None = None
    # recurrent layers whose memory is gated (nn.LSTM, nn.GRU and their cells): the through-time gain at
    # initialisation is set by gates that learn (Gers et al. 2000), not fixed by W_hh's spectrum
    time_gated: bool = False
    # a layer called again on its own result rather than on the steps of a sequence (weight sharing across depth:
    # ALBERT's shared layer; loops.py): its time_grad_norms are per call, judged with the loop's other layers
    loop_over_depth: bool = False
    # gated recurrent layers: the factor by which their gates at the neutral point sigmoid(0) = 1/2 scale the
    # gradient reaching their input (LSTM: input x output gate, 1/4; GRU: 1 - update gate, 1/2); gates learn
    neutral_gate_gain: float | None = None
    # dead_fraction measured as units that never left the flat region of this activation applied to the layer's
    # output ("gelu", "silu", ...: flat.py, the first measured forward) rather than by a ReLU module in every step
    flat_activation: str | None = None
    # layers between it and the input on the deepest path through the graph, itself included (depth.py): what
    # the signal view counts as depth; None where not read (torchrun, a forward that gave NaN)
    depth: int | None = None
    # the views that compared this layer with others (signal, update, time): empty for a weight layer means it
    # was checked numerically (NaN, all-zero) but nothing could say whether its gradient is too small or large
    views: tuple[str, ...] = ()
    # --train-steps: median over the watched steps of ||dW||/||W||, the update the optimizer made (watch.py)
    update_ratio: float | None = None
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
    # whether the signal has a path around the chain's layers (skip connections; confirm.find_bypass); None: not
    # checked (it is only when the trend is past the warning threshold)
    residual: bool | None = None
    # the per-layer gain once the gated recurrent layers' factor at their neutral gates (Layer.neutral_gate_gain)
    # is taken out: set only when the chain decays and holds such layers; it, not gain_per_layer, is judged
    beyond_gates_gain: float | None = None
    # the per-layer gain with each layer's ||dL/dz|| taken at its input's scale where that is below unit RMS
    # (signal._at_input_scale): set only when a normalised residual net's trend passed residual_gain and is
    # explained so, in which case it, not gain_per_layer, was judged
    input_scale_gain: float | None = None
    # the per-layer gain of ||dL/dz|| x input RMS (the scale of dL/dW) where a plain chain without normalisation
    # carries its trend past the trainable depth (6 depth scales) into its weights' gradients
    # (signal._past_trainable_depth): set only then, and the trend is an error
    weight_gradient_gain: float | None = None


@dataclass(frozen=True)
class UpdateSummary:
    """The update-balance view: each weight layer's ||g||/||W|| against the network's median."""

    layers: tuple[str, ...]
    median_grad_to_weight: float | None
    # what the view compared: "grad_to_weight" (||g||/||W||), or after --train-steps "update_ratio", the
    # median ||dW||/||W|| the watched optimizer steps made (median_grad_to_weight is then that quantity's median)
    quantity: str = "grad_to_weight"


@dataclass(frozen=True)
class NanOrigin:
    """Where non-finite values first appeared."""

    phase: str  # "input" | "forward" | "loss" | "backward"
    module: str | None
    detail: str


@dataclass(frozen=True)
class TrainingLayer:
    """One layer over the watched training steps (--train-steps), one value per step."""

    name: str
    grad_norm: tuple[float | None, ...]  # ||g|| before clipping
    # ||W_after - W_before|| / ||W_before|| over its weight tensors: the update the optimizer actually made
    update_ratio: tuple[float | None, ...]
    # its output units (weight rows) with no usable gradient in that step (reduce.STARVED_UNIT)
    dead_fraction: tuple[float | None, ...]
    # of the sampled weight values with a nonzero gradient, those the step left unchanged: updates below the
    # precision of the weights' dtype
    stalled_fraction: tuple[float | None, ...]
    nonfinite: tuple[int, ...]  # NaN/Inf gradient values (counted in steps whose gradient norm is not finite)


@dataclass(frozen=True)
class Training:
    """The watched training run before the measured passes (--train-steps), one value per step taken."""

    optimizer: str  # what stepped, with its settings: "adamw (lr 0.001, weight decay 0.01)"
    clip: float | None  # --clip's max norm
    steps: int  # steps taken: fewer than asked when one diverged
    loss: tuple[float, ...]
    grad_norm: tuple[float, ...]  # global gradient norm before clipping
    clipped: tuple[bool, ...]  # whether --clip scaled the gradients
    loss_scale: tuple[float, ...] | None  # fp16: GradScaler's scale in that step
    skipped: tuple[bool, ...]  # fp16: the scaler skipped the update (gradients overflowed)
    lr: tuple[float, ...]  # the learning rate of the first parameter group (a scheduler moves it)
    layers: tuple[TrainingLayer, ...]
    nan_step: int | None = None  # the step (0-based) whose loss or gradients were not finite; the run stopped
    nan_origin: NanOrigin | None = None  # where that step's NaN/Inf started (its batch replayed)
    bad_batch: str | None = None  # --save-bad-batch: where that batch was saved

    def layer(self, name: str) -> TrainingLayer | None:
        return next((layer for layer in self.layers if layer.name == name), None)


@dataclass(kw_only=True)
class Report:
    """Everything one analysis found. `healthy` is False when any finding is an error.

    Its JSON form (`to_dict`, `to_json`) is derived from these fields, and `from_dict` reads every one of them
    back, so a report written by `gradcheck analyze` and read by `gradcheck compare` or `--plot` is the same.
    """

    torch_version: str = ""
    model: str
    target: str | None = None
    steps: int
    train_steps: int = 0
    batch_size: int | None = None
    lr: float = 0.01
    device: str = "cpu"
    mode: str = "train"
    seed: int = 0
    loss_name: str = ""
    loss: list[float]
    train_loss: list[float] = field(default_factory=list)
    training: Training | None = None  # --train-steps: the watched run, step by step
    thresholds: dict[str, float]
    signal: SignalSummary
    update: UpdateSummary
    nan_origin: NanOrigin | None = None
    amp: str | None = None  # "bf16" | "fp16"
    loss_scale: float | None = None  # fp16: the GradScaler scale the reported (unscaled) gradients carried
    skipped_steps: int = 0  # fp16: steps whose gradients overflowed and were retried at half the scale
    parallel: str | None = None  # "ddp" | "fsdp"
    world_size: int = 1
    notes: list[str] = field(default_factory=list)
    # Edges (log10 |g|) of every layer's `histogram`: written into the report so that a plot needs nothing else.
    histogram_edges: list[float] = field(default_factory=list)
    findings: list[Finding]
    layers: list[Layer]
    parameters: list[ParameterRecord]

    @property
    def healthy(self) -> bool:
        return not any(f.severity == "error" for f in self.findings)

    def failing(self, fail_on: Iterable[str] = DEFAULT_FAIL_ON, fail_level: str = "error") -> list[Finding]:
        """The findings that should fail a CI step under these options (gate.Gate decides it)."""
        from gradcheck_cli.gate import Gate

        return list(Gate.of(self, fail_on, fail_level).failing)

    def layer(self, name: str) -> Layer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        from gradcheck_cli._version import __version__

        return {"schema": SCHEMA, "gradcheck_version": __version__, **_encode(self)}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(json_safe(self.to_dict()), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        """The inverse of to_dict (after a JSON round trip): what `gradcheck compare` and plots read.

        Raises ValueError naming what is wrong when `data` is not a gradcheck.report/1 document.
        """
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            found = data.get("schema") if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"not a {SCHEMA} document (schema: {found!r})")
        try:
            report: Report = _decode(cls, data)
        except (KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"malformed {SCHEMA} document ({type(error).__name__}: {error})") from None
        return report


# Properties written beside a record's fields (read back as they follow from the fields).
_COMPUTED = {"Report": ("healthy",), "Layer": ("frozen",)}


def _encode(value: Any) -> Any:
    """A record as JSON-ready data: every dataclass field, nested records and sequences included."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        data = {item.name: _encode(getattr(value, item.name)) for item in dataclasses.fields(value)}
        for name in _COMPUTED.get(type(value).__name__, ()):
            data[name] = getattr(value, name)
        return data
    if isinstance(value, list | tuple):
        return [_encode(item) for item in value]
    if isinstance(value, dict):
        return {key: _encode(item) for key, item in value.items()}
    return value


def _decode(hint: Any, value: Any) -> Any:
    """Data from JSON back to the type a field declares: records, tuples, lists, and the strings "nan", "inf",
    "-inf" that stand for numbers (json_safe) only where the field holds a number."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        (inner,) = [arg for arg in args if arg is not type(None)]
        return _decode(inner, value)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise TypeError(f"{hint.__name__} is a {type(value).__name__}, not an object")
        hints = typing.get_type_hints(hint)
        values = {
            item.name: _decode(hints[item.name], value[item.name])
            for item in dataclasses.fields(hint)
            if item.name in value or _required(item)  # a field added after this report was written: its default
        }
        return hint(**values)
    if origin in (tuple, list):
        if not isinstance(value, list):
            raise TypeError(f"expected a list, got {type(value).__name__}")
        items = [_decode(args[0], item) for item in value]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        return {key: _decode(args[1], item) for key, item in value.items()}
    if hint is float and isinstance(value, str) and value in ("nan", "inf", "-inf"):
        return float(value)
    return value


def _required(item: dataclasses.Field[Any]) -> bool:
    return item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING


def json_safe(value: Any) -> Any:
    """JSON has no NaN or Infinity: write them as the strings "nan", "inf", "-inf" (documented)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value
