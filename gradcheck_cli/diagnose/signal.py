"""The signal view: how ||dL/dz|| (z = a layer's output) changes along the forward order.

The chain rule multiplies per-layer Jacobians, so a consistent per-layer gain != 1 compounds geometrically
(mean-field chi1; Poole et al. 2016, Schoenholz et al. 2017). This is where vanishing and exploding gradients
live.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from gradcheck_cli.diagnose.common import level, times
from gradcheck_cli.diagnose.peers import peer_group
from gradcheck_cli.diagnose.thresholds import Thresholds
from gradcheck_cli.report import Finding, Layer, SignalSummary
from gradcheck_cli.series import median, theil_sen_slope

SIGNAL_CATEGORIES = ("linear", "conv", "recurrent", "attention", "embedding", "other")


def signal_view(
    layers: Sequence[Layer], thresholds: Thresholds, residual: bool | None = None
) -> tuple[SignalSummary, list[Finding]]:
    """The per-layer gain of ||dL/dz|| along depth, and the layers the trend leaves far from the output end.
    Depth is each layer's depth in the graph (depth.py: experts and branches side by side share one), or the
    order of forward calls where it was not read.

    The gain is fitted (Theil-Sen, over pairs of layers) only between layers that should see the same signal
    but for depth: the same role (the same name in another block, or the same type in a net without blocks)
    at the same resolution (the same number of positions: batch x sequence x spatial). A residual branch
    behind a LayerScale of 1e-6 sees 1e-6 of the stream's signal by design, and pooling, striding or a head on
    a pooled vector changes the position count without being a layer of the chain: pairs across those would
    measure the architecture, not the depth. Each group is then moved onto the fitted line, so that the
    verdict depends on depth alone, not on input size or branch scales.

    residual (confirm.find_bypass): with a path around the layers, the depth limit of plain chains does not
    apply; only a per-layer gain beyond thresholds.residual_gain is judged.
    """
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
        key=lambda layer: (layer.depth or 0, layer.forward_index or 0),
    )
    names = tuple(layer.name for layer in chain)
    groups = [_group(layer) for layer in chain]
    xs = _depths(chain)
    if len(chain) < thresholds.min_chain or _fitted_layers(xs, groups) < FEWEST_FITTED:
        return SignalSummary(names, None, None, residual), []
    ys = [math.log10(layer.output_grad_per_position or 1.0) for layer in chain]
    slope = theil_sen_slope(xs, ys, groups)
    assert slope is not None
    # Toward the input, each step of depth multiplies ||dL/dz|| by 10**(-slope); the chain spans xs[-1] steps.
    gain = 10 ** (-slope)
    span = xs[-1] - xs[0]
    summary = SignalSummary(names, gain, gain**span, residual)
    beyond = _beyond_gates(chain, ys) if gain < 1 else None
    if beyond is not None:
        ys = beyond
        slope = theil_sen_slope(xs, ys, groups) or 0.0
        summary = dataclasses.replace(summary, beyond_gates_gain=10 ** (-slope))
        if slope <= 0:
            return summary, []  # the whole decay is the gates at their neutral point: they learn to open
        gain = 10 ** (-slope)
    ys = _stitched(xs, ys, groups, slope)
    end = (median([y - slope * x for x, y in zip(xs, ys, strict=True)]) or 0.0) + slope * xs[-1]
    total = gain**span
    if residual and 1 / thresholds.residual_gain < gain < thresholds.residual_gain:
        return summary, []  # polynomial growth through skip connections: trainable at any depth
    scaled = _at_input_scale(chain, xs, groups) if residual and gain >= thresholds.residual_gain else None
    if scaled is not None and 1 / thresholds.residual_gain < scaled < thresholds.residual_gain:
        return dataclasses.replace(summary, input_scale_gain=scaled), []
    described = f"{len(chain)} layers" + (f", {span + 1:.0f} deep" if span + 1 != len(chain) else "")
    findings = _findings(chain, ys, end, gain, total, thresholds, described, beyond is not None)
    if findings and findings[0].severity == "warning" and residual is False and beyond is None:
        weight_gain = _past_trainable_depth(chain, xs, groups, total, span, thresholds)
        if weight_gain is not None:
            summary = dataclasses.replace(summary, weight_gradient_gain=weight_gain)
            findings = [_untrainable(findings[0], weight_gain, span)]
    return summary, findings


def _past_trainable_depth(
    chain: Sequence[Layer],
    xs: Sequence[float],
    groups: Sequence[object],
    total: float,
    span: float,
    thresholds: Thresholds,
) -> float | None:
    """The per-layer gain of ||dL/dz|| x input RMS, the scale of dL/dW = dL/dz x^T, where a plain chain without
    normalisation carries the trend past the trainable depth into its weights' gradients (None otherwise).

    Past about 6 depth scales (a factor e^3 = 20 over the chain: signal_warning) a plain network does not train
    (Schoenholz et al. 2017): its input end learns from a signal e^3 apart from the output end's. That holds
    where the forward pass keeps its scale, as bounded activations do (tanh in the chaotic phase, an ordered
    phase held up by biases): there the weights' gradients spread as dL/dz does. A ReLU chain at PyTorch's
    default init shrinks forward as it shrinks backward (x0.41 per layer both ways; He et al. 2015), so its
    layers' dL/dW stay level and each layer's steps keep their size; such chains train (AlexNet) and stay a
    warning. So does a chain that mostly feeds normalisation layers, which divide the weights' scale out (its
    growth is the one BatchNorm causes: Yang et al. 2019). Layers whose input has no RMS (an embedding reads
    indices) are left out of this fit; too few left to fit, and the trend stays a warning."""
    if 2 * sum(layer.feeds_norm for layer in chain) > len(chain):
        return None
    measured = [i for i, layer in enumerate(chain) if layer.input_rms and math.isfinite(layer.input_rms)]
    xs, groups = [xs[i] for i in measured], [groups[i] for i in measured]
    if _fitted_layers(xs, groups) < FEWEST_FITTED:
        return None
    ys = [
        math.log10(chain[i].output_grad_per_position or 1.0) + math.log10(chain[i].input_rms or 1.0) for i in measured
    ]
    slope = theil_sen_slope(xs, ys, groups)
    if slope is None:
        return None
    weight_gain = 10 ** (-slope)
    spread = weight_gain**span
    if (spread < 1) != (total < 1) or max(spread, 1 / spread) < thresholds.signal_warning:
        return None
    return weight_gain


def _untrainable(finding: Finding, weight_gain: float, span: float) -> Finding:
    """A plain chain's trend past the trainable depth, carried into its weights' gradients: an error."""
    spread = times(max(weight_gain**span, weight_gain ** (-span)))
    message = (
        f"{finding.message}; past the trainable depth of a plain network (6 depth scales, a factor of 20: "
        f"Schoenholz et al. 2017), and the layers' weight gradients follow it (dL/dz x input RMS x{weight_gain:.3g} "
        f"per layer, {spread} over the chain)"
    )
    return dataclasses.replace(finding, severity="error", message=message)


# Fewest layers, in groups that span more than one depth, that the fitted slope may rest on. Two layers are one
# step between two particular layers (an attention-score projection and an output head, both nn.Linear in a
# seq2seq GRU at one resolution, differ by 13x by design), not a trend; with three, Theil-Sen has pairs to
# take a median of, and one odd layer no longer sets the gain alone.
FEWEST_FITTED = 3


def _fitted_layers(xs: Sequence[float], groups: Sequence[object]) -> int:
    """How many layers belong to groups whose members sit at two or more depths (the groups that vote)."""
    depths: dict[object, set[float]] = {}
    for x, group in zip(xs, groups, strict=True):
        depths.setdefault(group, set()).add(x)
    return sum(1 for group in groups if len(depths[group]) >= 2)


def _depths(chain: Sequence[Layer]) -> list[float]:
    """The depth axis of the fit: the rank of each layer's depth in the graph (depth.py) among the chain's, where
    every layer of the chain has one, so that layers side by side (experts, branches, towers) share a step;
    otherwise the call order. Ranks, not the depths themselves: a step counts the chain's layers, as the call
    order does, not the layers between them that the chain leaves out (timm's ResNets, whose block convs sit
    behind zero-initialised norms, keep 8 layers in the chain over a graph 52 layers deep)."""
    if not all(layer.depth is not None for layer in chain):
        return [float(i) for i in range(len(chain))]
    depths = [layer.depth or 0 for layer in chain]
    rank = {depth: float(i) for i, depth in enumerate(sorted(set(depths)))}
    return [rank[depth] for depth in depths]


def _beyond_gates(chain: Sequence[Layer], ys: Sequence[float]) -> list[float] | None:
    """log10 ||dL/dz|| with the neutral-gate factor of every gated recurrent layer after each layer taken out
    (None without such layers). At PyTorch's default init every LSTM/GRU gate sits at sigmoid(0) = 1/2, which
    scales the gradient reaching the layer's input by 1/4 (LSTM) or 1/2 (GRU), as the forget gate halves it per
    time step (diagnose/time.py); the gates learn to open from the first steps (Gers et al. 2000). A 3-layer
    LSTM stack so loses ~x0.2 per layer at init and trains. What remains is the weights' and nonlinearities'
    share, judged as any chain. Only a decay is so explained: gates pushed off neutral are judged as measured."""
    logs = [math.log10(layer.neutral_gate_gain) if layer.neutral_gate_gain else 0.0 for layer in chain]
    if not any(logs):
        return None
    corrected = []
    after = 0.0  # the neutral-gate factors of the gated layers after this one (closer to the loss)
    for y, log in zip(reversed(ys), reversed(logs), strict=True):
        corrected.append(y - after)
        after += log
    return corrected[::-1]


def _at_input_scale(chain: Sequence[Layer], xs: Sequence[float], groups: Sequence[object]) -> float | None:
    """The per-layer gain of ||dL/dz|| x min(input RMS, 1), in a net with normalisation layers (None without).

    A normalised layer's gradient is inversely proportional to the scale of what it normalises, so a branch
    whose output is normalised (OLMo-2 and EXAONE-4 normalise each branch's output and none of its input)
    sends back dL/dz x 1/RMS of the stream it reads: where the stream starts from the embeddings' 0.02 and
    grows block by block toward unit scale, dL/dz falls along the depth as the stream rises, while
    dL/dW = dL/dz x^T, what the weights learn from, does not (the update view). Only inputs below unit RMS are
    credited: a stream growing past the scale normalisation restores is a forward explosion, whose gradient
    growth stays a finding."""
    if not any(layer.feeds_norm for layer in chain):
        return None
    ys = [
        math.log10(layer.output_grad_per_position or 1.0) + math.log10(min(layer.input_rms or 1.0, 1.0))
        for layer in chain
    ]
    slope = theil_sen_slope(xs, ys, groups)
    return None if slope is None else 10 ** (-slope)


def _group(layer: Layer) -> tuple[str, str | None, float | None]:
    """Layers that see the same signal but for depth: one role (peer_group; the type in a net without block
    indices, such as fc1..fc4), one layout (a depthwise 3x3 and a pointwise 1x1 under one name, as in Hugging
    Face's MobileNet-v1, sit ~4x apart in per-position dL/dz by design) and one position count."""
    role = peer_group(layer.name)
    return (role if "#" in role else layer.type, layer.layout, layer.output_positions)


def _stitched(xs: Sequence[float], ys: Sequence[float], groups: Sequence[object], slope: float) -> list[float]:
    """log ||dL/dz|| with each group moved onto one line: its median offset from the fit replaced by the
    median of all groups' offsets."""
    offsets: dict[object, list[float]] = {}
    for x, y, group in zip(xs, ys, groups, strict=True):
        offsets.setdefault(group, []).append(y - slope * x)
    middle = {group: median(values) or 0.0 for group, values in offsets.items()}
    common = median(list(middle.values())) or 0.0
    return [y - middle[group] + common for y, group in zip(ys, groups, strict=True)]


def _findings(
    chain: Sequence[Layer],
    ys: Sequence[float],
    end: float,
    gain: float,
    total: float,
    thresholds: Thresholds,
    described: str,
    beyond_gates: bool = False,
) -> list[Finding]:
    """The trend as one finding: one cause (a per-layer gain), one finding. It sits on the first layer on the
    trend's side with the fitted factor over the whole chain, even where no single layer's own value reaches a
    threshold (a trend of many small gains is what makes a deep net untrainable); the other layers whose own
    distance from the output end passes the warning threshold are named in it and covered by it (`also`)."""
    trend = abs(math.log10(total))
    severity = level(10**trend, thresholds.signal_warning, thresholds.signal_error)
    kind = "vanishing" if total < 1 else "exploding"
    side = [(layer, y - end) for layer, y in zip(chain, ys, strict=True) if (y - end < 0) == (total < 1)]
    if severity is None or not side:
        return []
    first = side[0][0]
    also = [
        (layer, 10**deviation) for layer, deviation in side[1:] if 10 ** abs(deviation) >= thresholds.signal_warning
    ]
    span = described + (" beyond the LSTM/GRU gates at their neutral point" if beyond_gates else "")
    direction = "smaller" if kind == "vanishing" else "larger"
    factor = 10 ** math.copysign(trend, -1.0 if kind == "vanishing" else 1.0)
    message = (
        f"x{gain:.3g} per layer over {span}: dL/dz here is {times(factor)} {direction} than at the output end "
        "along the fitted trend" + _also(also, direction)
    )
    fix = _signal_fix(kind, first, chain)
    return [Finding(first.name, kind, severity, "signal", message, fix, factor, tuple(layer.name for layer, _ in also))]


# The covered layers a trend's message names one by one; the rest are counted.
NAMED = 4


def _also(also: Sequence[tuple[Layer, float]], direction: str) -> str:
    if not also:
        return ""
    named = ", ".join(f"{layer.name} {times(factor)}" for layer, factor in also[:NAMED])
    rest = f" and {len(also) - NAMED} more" if len(also) > NAMED else ""
    return f"; also {direction} past the warning threshold: {named}{rest}"


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
    if 2 * sum(c.feeds_norm for c in chain) > len(chain):
        # most layers feed a normalisation layer: the weights' scale is not the cause (BN divides it out)
        return (
            "batch normalisation without skip connections makes gradients grow with depth at initialisation "
            "whatever the weights' scale (Yang et al. 2019): residual connections remove it; warm the learning "
            "rate up and clip with torch.nn.utils.clip_grad_norm_ while training"
        )
    return (
        "weights too large for gain 1: re-initialise with nn.init.xavier_normal_ / kaiming_normal_ / "
        "orthogonal_, add normalization layers; clip with torch.nn.utils.clip_grad_norm_ while training"
    )
