"""Diagnosis: measured layers -> statuses and findings, each with its evidence and a fix.

Pure functions over the report's dataclasses: no torch, no hooks, no printing.

Two views of the gradients (both reported, each finding names the one that raised it):
- signal: how ||dL/dz|| (z = a layer's output) changes along the forward order. The chain rule multiplies
  per-layer Jacobians, so a consistent per-layer gain != 1 compounds geometrically (mean-field chi1; Poole et
  al. 2016, Schoenholz et al. 2017). This is where vanishing and exploding gradients live.
- update: each weight layer's ||g|| / ||W||, the relative change one SGD step makes. Against the network's
  median it tells which layers learn orders of magnitude slower; times the learning rate it tells whether
  steps are absurdly large. Glorot & Bengio (2010) show the two views can disagree, so both are needed.
Plus numeric checks (NaN/Inf, all-zero gradients), activation checks (dead ReLU units, saturated
sigmoid/tanh inputs) and usage (trainable parameters that got no gradient).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

from gradcheck_cli.errors import UserError
from gradcheck_cli.report import Finding, Layer, NanOrigin, SignalSummary, UpdateSummary, median
from gradcheck_cli.stats import theil_sen_slope

LOSS_LAYER = "<loss>"


@dataclass(frozen=True)
class Thresholds:
    """Every threshold of the diagnosis, with the reason for its default (README: "Thresholds")."""

    # signal view: factor by which ||dL/dz|| at a layer differs from the output end of the chain, flagged only
    # when the fitted per-layer gain compounds to at least the same factor over the chain (a trend, not one
    # odd layer). Over L layers the factor is exp(L / (2 xi)), xi = -1/ln(chi1) the depth scale; plain nets
    # stop training beyond L ~ 6 xi (Schoenholz et al. 2017), a factor of e^3 ~ 20: the warning. Twice that
    # depth, e^6 ~ 400: the error. Critical nets stay within ~2x over tens of layers at practical widths.
    signal_warning: float = 20.0
    signal_error: float = 400.0
    # update view, balance: a weight layer whose ||g||/||W|| is this many times below the network median
    # learns that many times slower under SGD (the tutorial's layer 1).
    balance_warning: float = 10.0
    balance_error: float = 1000.0
    # update view, size: lr * ||g||/||W||, the fraction by which one SGD step changes the weights. Above 1 a
    # step is no longer an update but a re-initialisation of the layer; 10 is ten of them. (The usual healthy
    # range is 1e-4..1e-2; DeepDiagnosis flags > 0.1, but output heads legitimately reach ~0.1 at init.)
    update_warning: float = 1.0
    update_error: float = 10.0
    # activation view: fraction of ReLU units never active over all batches (a He-initialised unit is active
    # for half the examples, so chance alone leaves ~0.5^batch of them dead), and fraction of sigmoid/tanh
    # inputs where the derivative is under 5% of its peak (DeepDiagnosis flags > 50% outside [-5, 5]).
    dead_warning: float = 0.5
    dead_error: float = 0.9
    saturation_warning: float = 0.5
    saturation_error: float = 0.9
    # --amp: fraction of gradient values below the AMP dtype's smallest normal (subnormal, or flushed to zero).
    # Values only get there when the distribution straddles the underflow edge, and everything further below
    # is already zero: 1% in that band means a visible tail of the updates is being lost; 10% a large part.
    underflow_warning: float = 0.01
    underflow_error: float = 0.1
    # update view, input scale: dL/dW = dL/dz x input, so the layer reading the model's input learns in
    # proportion to the input's scale. When that input is not standardised (RMS outside [1/2, 2] or over half
    # exact zeros; LeCun et al. 1998, "Efficient BackProp") and the layer's ||g||/||W|| lags the median by
    # this factor, the lag has a measured cause and a standard fix, so it is flagged below balance_warning.
    input_lag: float = 2.0
    # fewest layers for a signal fit and for a balance median. The fit is a Theil-Sen line, which ignores up to
    # ~29% outlying points: with 5 or more layers one odd end (an embedding, an output head) cannot fake a trend.
    min_chain: int = 5

    def validate(self) -> None:
        for name in ("signal", "balance", "update", "dead", "saturation", "underflow"):
            low = getattr(self, f"{name}_warning")
            high = getattr(self, f"{name}_error")
            if not (math.isfinite(low) and math.isfinite(high)) or low <= 0:
                raise UserError(f"threshold {name} must be a positive number", "see gradcheck analyze --help")
            if high < low:
                raise UserError(
                    f"{name} error threshold ({high:g}) is below its warning threshold ({low:g})",
                    "the error threshold must be at least the warning threshold",
                )
        if not math.isfinite(self.input_lag) or self.input_lag <= 1:
            raise UserError("input_lag is a factor and must be above 1", "e.g. 2")
        for name in ("signal", "balance"):
            if getattr(self, f"{name}_warning") <= 1:
                raise UserError(f"{name} thresholds are factors and must be above 1", "e.g. 10")
        for name in ("dead", "saturation", "underflow"):
            if getattr(self, f"{name}_error") > 1:
                raise UserError(f"{name} thresholds are fractions and must be in (0, 1]", "e.g. 0.5")
        if self.min_chain < 3:
            raise UserError("min_chain must be at least 3", "use 5 or more")

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class Verdict:
    layers: list[Layer]
    findings: list[Finding]
    signal: SignalSummary
    update: UpdateSummary
    notes: list[str] = dataclasses.field(default_factory=list)


SIGNAL_CATEGORIES = ("linear", "conv", "recurrent", "attention", "embedding", "other")
BALANCE_CATEGORIES = ("linear", "conv", "recurrent", "attention", "embedding")
# When a layer has several findings, its status is the most serious kind.
STATUS_ORDER = ("nan", "dead", "exploding", "vanishing", "saturated", "unused")


def diagnose(
    layers: Sequence[Layer],
    loss: Sequence[float | None],
    thresholds: Thresholds,
    *,
    nan_origin: NanOrigin | None = None,
    lr: float = 0.01,
    amp: str | None = None,
) -> Verdict:
    """Statuses and findings for every layer; the two views' summaries."""
    findings: list[Finding] = []
    findings += _numeric(layers, loss, nan_origin)
    signal, signal_findings = _signal(layers, thresholds)
    update, update_findings = _update(layers, thresholds, lr, signal)
    findings += _consistent(signal_findings + update_findings, layers, thresholds, lr)
    findings += _activations(layers, thresholds)
    findings += _usage(layers)
    findings += _underflow(layers, thresholds, amp)
    notes = []
    gated = gates(layers)
    if gated:
        names = sorted(set(gated.values()))
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        notes.append(
            f"{len(gated)} layer(s) get exactly zero gradient only because zero-initialised layers after them "
            f"({shown}) gate their branch (zero_init_residual / Fixup / ReZero); the gates get gradients and open "
            "on the first update: check with --train-steps 1"
        )
    return Verdict(_with_status(layers, findings), _ordered(findings, layers), signal, update, notes)


# -- stability: a finding must hold on most batches, not only on their median -------------------------------


def _consistent(findings: list[Finding], layers: Sequence[Layer], thresholds: Thresholds, lr: float) -> list[Finding]:
    """Keep a signal/update finding only if the same (layer, kind, view) also comes out of at least half of
    the single-step diagnoses, so one odd batch can neither make nor break a CI verdict."""
    steps = max((len(layer.grad_norm_steps) for layer in layers), default=0)
    if steps < 2:
        return findings
    votes: dict[tuple[str, str, str], int] = {}
    for step in range(steps):
        single = [_at_step(layer, step) for layer in layers]
        signal, signal_findings = _signal(single, thresholds)
        _, update_findings = _update(single, thresholds, lr, signal)
        for key in {(f.layer, f.kind, f.view) for f in signal_findings + update_findings}:
            votes[key] = votes.get(key, 0) + 1
    needed = (steps + 1) // 2
    return [f for f in findings if votes.get((f.layer, f.kind, f.view), 0) >= needed]


def _at_step(layer: Layer, step: int) -> Layer:
    def pick(values: tuple[float | None, ...]) -> float | None:
        return values[step] if step < len(values) else None

    return dataclasses.replace(
        layer,
        grad_norm_median=pick(layer.grad_norm_steps),
        grad_to_weight=pick(layer.grad_to_weight_steps),
        output_grad_norm_median=pick(layer.output_grad_norm_steps),
        output_grad_per_position=pick(layer.output_grad_per_position_steps),
    )


# -- numeric: NaN/Inf and all-zero gradients ---------------------------------------------------------------


def gates(layers: Sequence[Layer]) -> dict[str, str]:
    """Layers whose gradient is exactly zero because a zero-initialised layer after them in the same block
    multiplies their signal by 0 (torchvision's zero_init_residual, Fixup, ReZero, SkipInit). Such a gate gets
    a gradient itself, moves on the first update, and opens the branch: not a dead layer. Returns
    {gated layer: gate layer}."""
    gate_layers = [
        g
        for g in layers
        if g.trainable_params and g.weight_norm == 0 and g.forward_index is not None and _got_gradient(g)
    ]
    gated = {}
    for layer in layers:
        if not (layer.trainable_params and _all_zero(layer)) or layer.forward_index is None:
            continue
        for gate in gate_layers:
            block = gate.name.rpartition(".")[0]
            same_block = layer.name.startswith(block + ".") if block else True
            ancestor = layer.name.startswith(gate.name + ".") or gate.name == ""
            if (gate.forward_index or 0) > layer.forward_index and (same_block or ancestor):
                gated[layer.name] = gate.name
                break
    return gated


def _got_gradient(layer: Layer) -> bool:
    return any(v is not None and v > 0 for v in layer.grad_norm_steps)


def _numeric(layers: Sequence[Layer], loss: Sequence[float | None], origin: NanOrigin | None) -> list[Finding]:
    findings = []
    gated = gates(layers)
    bad_loss = [v for v in loss if v is not None and not math.isfinite(v)]
    where = _origin_text(origin)
    if bad_loss:
        findings.append(
            Finding(
                LOSS_LAYER,
                "nan",
                "error",
                "numeric",
                f"loss is NaN/Inf in {len(bad_loss)} of {len(loss)} steps{where}",
                _nan_fix(origin),
            )
        )
    for layer in layers:
        if layer.trainable_params and layer.nonfinite:
            started_here = origin is not None and origin.module == layer.name
            message = (
                f"{layer.nonfinite} NaN/Inf gradient values; non-finite values start here ({origin.phase})"
                if started_here and origin is not None
                else f"{layer.nonfinite} NaN/Inf gradient values{where}"
            )
            findings.append(Finding(layer.name, "nan", "error", "numeric", message, _nan_fix(origin)))
        elif layer.trainable_params and _all_zero(layer) and layer.name not in gated:
            findings.append(
                Finding(
                    layer.name,
                    "dead",
                    "error",
                    "numeric",
                    f"every gradient value is exactly 0 in all {len(layer.grad_norm_steps)} steps: "
                    "this layer cannot learn",
                    "check what zeroes its signal: dead ReLUs after it (kaiming_normal_ init, LeakyReLU), a "
                    "zero-initialised layer downstream, or a detach()/no_grad in the forward",
                )
            )
    return findings


def _all_zero(layer: Layer) -> bool:
    got = [v for v in layer.grad_norm_steps if v is not None]
    return bool(got) and all(v == 0 for v in got)


def _origin_text(origin: NanOrigin | None) -> str:
    if origin is None:
        return ""
    if origin.module:
        return f"; spread from {origin.module} ({origin.phase})"
    return f"; {origin.detail}"


def _nan_fix(origin: NanOrigin | None) -> str:
    where = f" in {origin.module}" if origin and origin.module else ""
    if origin and origin.phase == "input":
        return "the data holds NaN/Inf: clean or impute it before training"
    return (
        f"look for log/sqrt/division of values that reach 0 or below{where}; add an epsilon, lower the learning "
        "rate, clip with torch.nn.utils.clip_grad_norm_; torch.autograd.set_detect_anomaly(True) names the op"
    )


# -- signal view ------------------------------------------------------------------------------------------


def _signal(layers: Sequence[Layer], thresholds: Thresholds) -> tuple[SignalSummary, list[Finding]]:
    chain = sorted(
        (
            layer
            for layer in layers
            if layer.category in SIGNAL_CATEGORIES
            and layer.forward_index is not None
            and layer.output_grad_per_position is not None
            and math.isfinite(layer.output_grad_per_position)
            and layer.output_grad_per_position > 0
        ),
        key=lambda layer: layer.forward_index or 0,
    )
    names = tuple(layer.name for layer in chain)
    if len(chain) < thresholds.min_chain:
        return SignalSummary(names, None, None), []
    xs = [float(i) for i in range(len(chain))]
    ys = [math.log10(layer.output_grad_per_position or 1.0) for layer in chain]
    slope = theil_sen_slope(xs, ys)
    assert slope is not None
    intercept = median([y - slope * x for x, y in zip(xs, ys, strict=True)]) or 0.0
    end = intercept + slope * xs[-1]
    # Toward the input, each layer multiplies ||dL/dz|| by 10**(-slope).
    gain = 10 ** (-slope)
    total = gain ** (len(chain) - 1)
    summary = SignalSummary(names, gain, total)
    findings = []
    trend = abs(math.log10(total))
    for layer, y in zip(chain, ys, strict=True):
        deviation = y - end  # log10 of ||dL/dz|| here over the fitted value at the output end
        kind = "vanishing" if deviation < 0 else "exploding"
        if (deviation < 0) != (total < 1):
            continue  # a layer off the trend's direction is not explained by it
        level = min(abs(deviation), trend)
        severity = _level(10**level, thresholds.signal_warning, thresholds.signal_error)
        if severity is None:
            continue
        factor = 10**deviation
        direction = "smaller" if kind == "vanishing" else "larger"
        findings.append(
            Finding(
                layer.name,
                kind,
                severity,
                "signal",
                f"dL/dz is {_times(factor)} {direction} than at the output end: x{gain:.3g} per layer over "
                f"{len(chain)} layers",
                _signal_fix(kind, layer, chain),
                factor,
            )
        )
    return summary, findings


def _signal_fix(kind: str, layer: Layer, chain: Sequence[Layer]) -> str:
    saturated = [c.saturated_fraction for c in chain if c.saturated_fraction is not None]
    if kind == "vanishing":
        if saturated and (median(saturated) or 0) > 0.2:
            return (
                "activations saturate: use nn.ReLU/nn.GELU with nn.init.kaiming_normal_, or put nn.LayerNorm/"
                "nn.BatchNorm before the sigmoid/tanh; residual connections keep the signal over depth"
            )
        return (
            "weights too small for gain 1: nn.init.xavier_normal_ (tanh), nn.init.kaiming_normal_ (ReLU) or "
            "nn.init.orthogonal_; add normalization layers or residual connections"
        )
    return (
        "weights too large for gain 1: re-initialise with nn.init.xavier_normal_ / kaiming_normal_ / "
        "orthogonal_, add normalization layers; clip with torch.nn.utils.clip_grad_norm_ while training"
    )


# -- update view ------------------------------------------------------------------------------------------


def _update(
    layers: Sequence[Layer], thresholds: Thresholds, lr: float, signal: SignalSummary
) -> tuple[UpdateSummary, list[Finding]]:
    findings = []
    members = [
        layer
        for layer in layers
        if layer.category in BALANCE_CATEGORIES
        and layer.trainable_params
        and layer.grad_to_weight is not None
        and math.isfinite(layer.grad_to_weight)
        and layer.grad_to_weight > 0
    ]
    reference = median([layer.grad_to_weight or 0.0 for layer in members])
    summary = UpdateSummary(tuple(layer.name for layer in members), reference)
    if reference and len(members) >= thresholds.min_chain:
        first = _input_layer(layers)
        peers = _peer_medians(members, thresholds.min_chain)
        for layer in members:
            if layer.feeds_norm:
                # Scale-invariant (its output is normalised): SGD tunes its effective learning rate by itself
                # (Arora et al. 2019), so a slow start is not a lasting imbalance.
                continue
            ratio = layer.grad_to_weight or 0.0
            group, peer_reference = peers.get(layer.name, (None, None))
            # Against its peers (the same role in the other blocks) at both levels; against the whole network
            # only at the error level, since roles differ by design (see _peer_medians).
            severity = None
            if peer_reference:
                factor = ratio / peer_reference
                against = f"the median of its {layer.type} peers ({group}) {peer_reference:.2g}"
                severity = _level(1 / factor, thresholds.balance_warning, thresholds.balance_error)
            if severity is None:
                factor, against = ratio / reference, f"the network median {reference:.2g}"
                limit = thresholds.balance_error if peer_reference else thresholds.balance_warning
                severity = _level(1 / factor, limit, thresholds.balance_error)
            message = (
                f"||g||/||W|| = {layer.grad_to_weight:.2g} is {_times(factor)} below {against}: "
                "this layer learns that much slower under SGD"
            )
            fix = _balance_fix(layer, signal)
            if layer is first and _unstandardised(layer) and reference / ratio >= thresholds.input_lag:
                factor = ratio / reference
                severity = severity or "warning"
                message += "; its input is not standardised" + _input_text(layer) + _signal_context(signal)
                fix = (
                    "dL/dW = dL/dz x input, so this layer's steps shrink with its input: standardise the inputs, "
                    "x = (x - mean) / std (torchvision transforms.Normalize; MNIST: mean 0.1307, std 0.3081)"
                )
            if severity is None:
                continue
            findings.append(Finding(layer.name, "vanishing", severity, "update", message, fix, factor))
    for layer in layers:
        relative = layer.grad_to_weight
        if not layer.trainable_params or relative is None or not math.isfinite(relative):
            continue
        if layer.feeds_norm:
            # Its output is normalised, so the loss does not depend on its weights' scale: a large step grows
            # ||W|| (the gradient is orthogonal to W), which shrinks the next steps by itself (van Laarhoven
            # 2017; Hoffer et al. 2018). Step size relative to ||W|| is not a hazard here.
            continue
        size = lr * relative
        severity = _level(size, thresholds.update_warning, thresholds.update_error)
        if severity is None:
            continue
        findings.append(
            Finding(
                layer.name,
                "exploding",
                severity,
                "update",
                f"one SGD step at lr {lr:g} changes the weights by {size:.3g}x their norm "
                f"(||g||/||W|| = {relative:.3g})",
                "gradients are huge for these weights: lower the learning rate, clip with "
                "torch.nn.utils.clip_grad_norm_, and check the weight and input scale (nn.init.kaiming_normal_, "
                "standardised inputs)",
                size,
            )
        )
    return summary, findings


def peer_group(name: str) -> str:
    """A layer's role: its name with block indices wildcarded (encoder.layers.3.linear1 -> encoder.layers.#.linear1)."""
    return ".".join("#" if part.isdigit() else part for part in name.split("."))


def _peer_medians(members: Sequence[Layer], least: int) -> dict[str, tuple[str, float]]:
    """{layer: (group, median ||g||/||W|| of its group)} for groups of at least `least` layers.

    Layers in different roles learn at different speeds by design: GPT-2's scaled initialisation makes the
    residual projections' weights sqrt(2 * blocks) smaller, uniform attention at initialisation gives query and
    key projections gradients ~30x smaller than value projections. The same role in another block should learn
    at a similar speed, so a layer is compared with its peers when it has enough of them.
    """
    groups: dict[str, list[Layer]] = {}
    for layer in members:
        if "#" in peer_group(layer.name):
            groups.setdefault(f"{peer_group(layer.name)}:{layer.type}", []).append(layer)
    result = {}
    for key, group in groups.items():
        if len(group) >= least:
            value = median([layer.grad_to_weight or 0.0 for layer in group])
            if value:
                for layer in group:
                    result[layer.name] = (key.split(":")[0], value)
    return result


def _input_layer(layers: Sequence[Layer]) -> Layer | None:
    """The first layer in forward order: the one that reads the model's input."""
    called = [layer for layer in layers if layer.forward_index is not None]
    return min(called, key=lambda layer: layer.forward_index or 0) if called else None


# A standardised input has RMS 1 and few exact zeros; a factor of 2 either way, or mostly zeros, is not.
STANDARD_INPUT_RMS = (0.5, 2.0)
SPARSE_INPUT = 0.5


def _unstandardised(layer: Layer) -> bool:
    if layer.input_rms is None:
        return False  # integer ids (embeddings) have no scale
    low, high = STANDARD_INPUT_RMS
    return not low <= layer.input_rms <= high or (layer.input_zero_fraction or 0.0) > SPARSE_INPUT


def _input_text(layer: Layer) -> str:
    return f" (RMS {layer.input_rms:.2g}, {layer.input_zero_fraction or 0.0:.0%} exact zeros; standardised: RMS 1)"


def _signal_context(signal: SignalSummary) -> str:
    """Whether the backpropagated signal explains a lag: the two views side by side."""
    gain = signal.gain_per_layer
    if gain is None:
        return ""
    if 0.8 <= gain <= 1.25:
        return f"; the backpropagated signal is not the cause (dL/dz x{gain:.2f} per layer)"
    return f"; dL/dz also changes x{gain:.2f} per layer (signal view)"


def _balance_fix(layer: Layer, signal: SignalSummary) -> str:
    return (
        "give this layer a larger share of the updates: initialise it like its neighbours (kaiming_normal_/"
        "xavier_normal_), or use an adaptive optimizer (torch.optim.Adam) or a per-layer learning rate"
    )


# -- activations -------------------------------------------------------------------------------------------


def _activations(layers: Sequence[Layer], thresholds: Thresholds) -> list[Finding]:
    findings = []
    for layer in layers:
        dead = layer.dead_fraction
        source = "ReLU units never activate over all batches"
        if dead is None and layer.zero_grad_unit_fraction is not None and not _all_zero(layer):
            dead, source = (
                layer.zero_grad_unit_fraction,
                "output units got an all-zero gradient in every step",
            )
        severity = _level(dead or 0.0, thresholds.dead_warning, thresholds.dead_error)
        if severity is not None and dead is not None:
            findings.append(
                Finding(
                    layer.name,
                    "dead",
                    severity,
                    "activation",
                    f"{dead:.0%} of {source}",
                    "dead ReLUs: initialise with nn.init.kaiming_normal_ and zero biases, lower the learning "
                    "rate, or use nn.LeakyReLU / nn.GELU",
                    dead,
                )
            )
        saturated = layer.saturated_fraction
        severity = _level(saturated or 0.0, thresholds.saturation_warning, thresholds.saturation_error)
        if severity is not None and saturated is not None:
            findings.append(
                Finding(
                    layer.name,
                    "saturated",
                    severity,
                    "activation",
                    f"{saturated:.0%} of the sigmoid/tanh inputs it feeds are saturated (derivative < 5% of peak)",
                    "pre-activations too large: scale the weights down (nn.init.xavier_normal_), standardise "
                    "inputs, or add nn.LayerNorm/nn.BatchNorm before the activation",
                    saturated,
                )
            )
    return findings


# -- mixed precision -------------------------------------------------------------------------------------


def _underflow(layers: Sequence[Layer], thresholds: Thresholds, amp: str | None) -> list[Finding]:
    """Gradient values below the AMP dtype's normal range lose precision or vanish: vanishing by precision."""
    if amp is None:
        return []
    dtype = {"bf16": "bfloat16", "fp16": "float16"}.get(amp, amp)
    findings = []
    for layer in layers:
        fraction = max(
            (f for f in (layer.underflow_fraction, layer.output_grad_underflow_fraction) if f is not None),
            default=None,
        )
        severity = _level(fraction or 0.0, thresholds.underflow_warning, thresholds.underflow_error)
        if severity is None or fraction is None or not layer.trainable_params:
            continue
        findings.append(
            Finding(
                layer.name,
                "vanishing",
                severity,
                "numeric",
                f"{fraction:.0%} of its gradient values are below {dtype}'s smallest normal number (subnormal or "
                "flushed to zero): those updates vanish in mixed precision",
                "keep more of the gradient in range: raise the loss scale (torch.amp.GradScaler(init_scale=...)) "
                "for fp16, use bf16, or keep this layer in float32 (autocast(enabled=False) around it)",
                fraction,
            )
        )
    return findings


# -- usage ------------------------------------------------------------------------------------------------


def _usage(layers: Sequence[Layer]) -> list[Finding]:
    findings = []
    for layer in layers:
        if layer.trainable_params and all(v is None for v in layer.grad_norm_steps):
            findings.append(
                Finding(
                    layer.name,
                    "unused",
                    "warning",
                    "usage",
                    "trainable, but got no gradient in any step (not used in the forward, or detached)",
                    "remove it, freeze it (requires_grad_(False)), or check the forward uses it",
                )
            )
    return findings


# -- helpers ----------------------------------------------------------------------------------------------


def _level(value: float, warning: float, error: float) -> str | None:
    """Severity of a value measured against (warning, error) thresholds, larger is worse."""
    if not math.isfinite(value):
        return "error"
    if value >= error:
        return "error"
    if value >= warning:
        return "warning"
    return None


def _times(factor: float) -> str:
    """A factor the way people say it: 1.2e-03 -> '830x', 25 -> '25x'."""
    if factor <= 0 or not math.isfinite(factor):
        return str(factor)
    value = factor if factor >= 1 else 1 / factor
    text = f"{value:.0f}x" if value < 1e4 else f"{value:.1e}x"
    return text


def _with_status(layers: Sequence[Layer], findings: Sequence[Finding]) -> list[Layer]:
    by_layer: dict[str, list[Finding]] = {}
    for finding in findings:
        by_layer.setdefault(finding.layer, []).append(finding)
    result = []
    for layer in layers:
        mine = by_layer.get(layer.name, [])
        if mine:
            worst = min(mine, key=lambda f: (f.severity != "error", STATUS_ORDER.index(f.kind)))
            status, severity = worst.kind, worst.severity
        elif layer.frozen:
            status, severity = "frozen", None
        else:
            status, severity = "ok", None
        result.append(dataclasses.replace(layer, status=status, severity=severity))
    return result


def _ordered(findings: Sequence[Finding], layers: Sequence[Layer]) -> list[Finding]:
    """Errors first; then by kind and view (findings that share a fix sit together); then forward order."""
    position = {layer.name: (layer.forward_index if layer.forward_index is not None else 10**9) for layer in layers}
    return sorted(
        findings,
        key=lambda f: (f.severity != "error", STATUS_ORDER.index(f.kind), f.view, position.get(f.layer, -1)),
    )
