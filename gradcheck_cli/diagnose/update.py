"""The update view: each weight layer's ||g|| / ||W||, the relative change one SGD step makes.

Against the network's median (and its peers in the other blocks) it tells which layers learn orders of
magnitude slower; times the learning rate it tells whether steps are absurdly large. Glorot & Bengio (2010)
show the two views can disagree, so both are needed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from gradcheck_cli.diagnose.common import level, times
from gradcheck_cli.diagnose.peers import References, relative
from gradcheck_cli.diagnose.thresholds import Thresholds
from gradcheck_cli.kinds import SEVERITIES
from gradcheck_cli.report import Finding, Layer, SignalSummary, UpdateSummary
from gradcheck_cli.series import median

BALANCE_CATEGORIES = ("linear", "conv", "recurrent", "attention", "embedding")


def expects_comparison(layer: Layer) -> bool:
    """A weight layer (not only per-channel scales and shifts, which follow the layer they scale) that the
    views are made to compare: when none could, its status says so (unjudged) rather than ok."""
    return layer.category in BALANCE_CATEGORIES and not layer.scale_only and layer.alias_of is None


def update_view(
    layers: Sequence[Layer], thresholds: Thresholds, lr: float, signal: SignalSummary
) -> tuple[UpdateSummary, list[Finding]]:
    """The update view's summary, and its findings: layers that learn far slower than their peers or the
    network (balance), and steps that change a layer's weights by more than their norm (size)."""
    measured = any(layer.update_ratio is not None for layer in layers)
    members, dense = comparison_sets(layers, measured)
    reference = median([relative(layer, measured) or 0.0 for layer in dense])
    quantity = "update_ratio" if measured else "grad_to_weight"
    summary = UpdateSummary(tuple(layer.name for layer in members), reference, quantity)
    findings = []
    if reference and len(members) >= thresholds.min_chain:
        findings += _balance(layers, members, reference, thresholds, signal, measured)
    return summary, findings + _step_size(layers, thresholds, lr, measured)


def comparison_sets(layers: Sequence[Layer], measured: bool) -> tuple[list[Layer], list[Layer]]:
    """The layers the update view compares, and those whose median is the network's reference (also what
    scales.open_scales measures against, so that the layers it explains are those this view would flag)."""
    members = [
        layer
        for layer in layers
        if layer.category in BALANCE_CATEGORIES
        and _judged(layer)
        and (value := relative(layer, measured)) is not None
        and math.isfinite(value)
        and value > 0
    ]
    # The network median is the dense layers': an embedding table's ||g||/||W|| (rows looked up, a scale of its
    # own: _balance) is not comparable with theirs, and in a shallow model three tables (BERT's word, position
    # and token type) can be a third of the members (a one-block ELECTRA's set the median 16x above its block).
    # Nor do layers whose output is normalised (feeds_norm): their ||g||/||W|| follows their own weight scale, which
    # the loss does not see (BN(W x) = BN(a W x)), so it says how fast nothing else learns (a BatchNorm net's head
    # read 14x below the median its convs set, MNASNet-0.5 at 32 px; ConvMixer's 20x).
    dense = [layer for layer in members if layer.category != "embedding"] or members
    dense = [layer for layer in dense if not layer.feeds_norm] or dense
    return members, dense


def _balance(
    layers: Sequence[Layer],
    members: Sequence[Layer],
    reference: float,
    thresholds: Thresholds,
    signal: SignalSummary,
    measured: bool,
) -> list[Finding]:
    findings = []
    first = _input_layer(layers)
    refs = References.of(members, measured)
    scans = selective_scans([layer.name for layer in members])
    for layer in members:
        if layer.feeds_norm:
            # Scale-invariant (its output is normalised): SGD tunes its effective learning rate by itself
            # (Arora et al. 2019), so a slow start is not a lasting imbalance.
            continue
        ratio = relative(layer, measured) or 0.0
        peer_reference = refs.medians.get(layer.name, (None, None, False))[1]
        # Against its peers (the same role in the other blocks) when it has them: roles differ by design (see
        # peer_medians; CaiT's talking-heads projections learn 1000x slower than its MLPs in every block), so
        # a whole role that is slow is the architecture, not a fault, short of thresholds.role_error. Without
        # peers, against the network.
        # An embedding table has neither: it is read a few rows at a time and initialised on its own scale
        # (N(0, 1) in torch, 0.02 in GPT-2, T5's factor), so its ||g||/||W|| is not comparable to dense layers'.
        severity = None
        if attention_logits(layer.name) or layer.name in scans:
            severity, factor, against = _slow_by_design(layer, ratio, reference, thresholds)
        elif peer_reference:
            severity, factor, against = _against_peers(layer, ratio, refs, reference, thresholds)
        else:
            factor, against = ratio / reference, f"the network median {reference:.2g}"
            if layer.category != "embedding" and not layer.behind_scales:
                severity = level(1 / factor, thresholds.balance_warning, thresholds.balance_error)
        message = (
            f"||dW||/||W|| per step = {ratio:.2g} is {times(factor)} below {against}: "
            "this layer learns that much slower under the watched optimizer"
            if measured
            else f"||g||/||W|| = {ratio:.2g} is {times(factor)} below {against}: "
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
    return findings


def _against_peers(
    layer: Layer, ratio: float, refs: References, reference: float, thresholds: Thresholds
) -> tuple[str | None, float, str]:
    """(severity, factor, what it is below) of a layer against its peers: their median net of what gates put
    between them by design, the milder verdict where its role's trend over sizes, its repeats or the network
    (for a pair) disagree, and the network median past role_error when the whole role is slow."""
    group, peer_reference, pair = refs.medians[layer.name]
    against = f"the median of its {layer.type} peers ({group}) {peer_reference:.2g}"
    by_design = min(refs.gates.get(layer.name, 1.0), 1.0)
    if by_design < 1:
        against += f" (x{by_design:.2g} of that by design: its peers' gates at sigmoid(0) after it)"
    factor = ratio / peer_reference
    severity = level(by_design / factor, thresholds.balance_warning, thresholds.balance_error)
    trend = refs.trends.get(layer.name)
    if severity and trend:  # the milder verdict, as for a pair: a trend only clears what a median says
        along = level(trend / ratio, thresholds.balance_warning, thresholds.balance_error)
        if along is not None and SEVERITIES.index(along) < SEVERITIES.index(severity):
            factor, against = (
                ratio / trend,
                f"its {layer.type} peers' trend over their sizes ({group}) {trend:.2g}",
            )
        severity = min(severity, along, key=SEVERITIES.index) if along else None
    if severity and layer.name in refs.repeats:  # the milder verdict, as for a pair (repeat_medians)
        again = level(
            by_design * refs.repeats[layer.name] / ratio, thresholds.balance_warning, thresholds.balance_error
        )
        severity = min(severity, again, key=SEVERITIES.index) if again else None
    if pair:  # two peers cannot say which is off: the slower one is flagged only if slow overall too
        overall = level(reference / ratio, thresholds.balance_warning, thresholds.balance_error)
        severity = min(severity, overall, key=SEVERITIES.index) if severity and overall else None
    if (
        severity is None
        and not layer.behind_scales
        and level(reference / ratio, thresholds.role_error, thresholds.role_error)
    ):
        factor, against = ratio / reference, f"the network median {reference:.2g}, as all its peers are"
        severity = "error"
    return severity, factor, against


def _slow_by_design(
    layer: Layer, ratio: float, reference: float, thresholds: Thresholds
) -> tuple[str | None, float, str]:
    """At (near-)uniform attention a query/key projection's gradient is second order (LOGIT_WORDS): slow by
    design, at a rate that follows how alike the tokens it reads are, so it differs from block to block too; a
    selective scan's step and state projections are scaled by its step size (SELECTIVE_SCAN). Only a factor no
    design explains (role_error) is judged, beyond what a small input explains (_logit_scale)."""
    expected = _logit_scale(layer) if attention_logits(layer.name) else 1.0
    slow = level(reference * expected / ratio, thresholds.role_error, thresholds.role_error)
    severity = "error" if slow and not layer.behind_scales else None
    return severity, ratio / reference, f"the network median {reference:.2g}"


def _step_size(layers: Sequence[Layer], thresholds: Thresholds, lr: float, measured: bool) -> list[Finding]:
    findings = []
    for layer in layers:
        value = relative(layer, measured)
        if not _judged(layer) or value is None or not math.isfinite(value):
            continue
        if layer.feeds_norm:
            # Its output is normalised, so the loss does not depend on its weights' scale: a large step grows
            # ||W|| (the gradient is orthogonal to W), which shrinks the next steps by itself (van Laarhoven
            # 2017; Hoffer et al. 2018). Step size relative to ||W|| is not a hazard here.
            continue
        size = value if measured else lr * value
        norm = _step_reference(layer)
        size *= layer.weight_norm / norm if norm > layer.weight_norm > 0 else 1.0
        severity = level(size, thresholds.update_warning, thresholds.update_error)
        if severity is None:
            continue
        their = "their norm" if norm <= layer.weight_norm else f"the norm {norm:.2g} a default init gives this shape"
        message = (
            f"the watched optimizer steps changed the weights by {size:.3g}x {their} per step (median ||dW||/||W||)"
            if measured
            else f"one SGD step at lr {lr:g} changes the weights by {size:.3g}x {their} (||g||/||W|| = {value:.3g})"
        )
        findings.append(
            Finding(
                layer.name,
                "exploding",
                severity,
                "update",
                message,
                "gradients are huge for these weights: lower the learning rate, clip with "
                "torch.nn.utils.clip_grad_norm_, and check the weight and input scale (nn.init.kaiming_normal_, "
                "standardised inputs)",
                size,
            )
        )
    return findings


# A weight initialised near zero on purpose (timm's head_init_scale of 1e-3 on EVA and ConvNeXt heads, LoRA's B,
# any output layer scaled down so that the net starts near the identity or a constant) has no structure for a step
# to destroy: it is meant to grow to the scale of its shape. Its step is compared with the smallest norm a default
# initialisation gives that shape (PyTorch's, Var 1/(3 fan_in): ||W|| = sqrt(units / 3)), times NEAR_ZERO, rather
# than with its own norm, once it sits below that: an order of magnitude under every standard init (trunc_normal
# 0.02 at width 64 is ~0.3 of the default; He 2.4x above it). Weights of ordinary scale are judged as measured.
NEAR_ZERO = 0.1


def _step_reference(layer: Layer) -> float:
    """The norm a step of `layer` is compared with: its weights' own, or the floor for near-zero inits."""
    floor = NEAR_ZERO * math.sqrt(layer.units / 3) if layer.units else 0.0
    return max(layer.weight_norm, floor)


def _judged(layer: Layer) -> bool:
    """Whether the update view judges a layer: it has a trainable feature-mixing weight of its own. Not a
    per-channel scale (LayerScale 1e-6, ReZero 0, a norm's gamma: they are meant to move by many times their
    size), and not a module that only reuses a tied tensor (its owner carries the tensor's one verdict)."""
    return bool(layer.trainable_params) and not layer.scale_only and layer.alias_of is None


# Query and key projections, by the names the common implementations give them (Hugging Face BERT/ALBERT/
# ELECTRA/Swin: query, key; Llama, Mistral, OPT, GPT-Neo, ViT/DeiT: q_proj, k_proj; DeBERTa: query_proj,
# key_proj; T5: q, k; DistilBERT: q_lin, k_lin; Meta's Llama: wq, wk; x-transformers and diffusers: to_q, to_k;
# ESPnet/WeNet conformers: linear_q, linear_k; DeepSeek: q_a_proj, q_b_proj): a name made of a query or key word
# and projection words only, split at "_". They only shape the attention logits s_ij = q_i.k_j / sqrt(d):
# dL/ds_ij = P_ij (dL/do_i).(v_j - sum_l P_il v_l), which at the uniform attention of initialisation is a
# covariance across tokens between values and keys, small by design and dependent on how alike the tokens are
# (the first block reads embeddings, later ones the residual stream). Fused projections (GPT-2's c_attn, timm's
# qkv, GPT-NeoX's query_key_value, DeepSeek's kv_b_proj, nn.MultiheadAttention) carry the values' gradient too.
LOGIT_WORDS = frozenset({"q", "k", "query", "key", "queries", "keys", "qk", "wq", "wk"})
PROJECTION_WORDS = frozenset({"proj", "projection", "lin", "linear", "layer", "dense", "fc", "w", "to", "a", "b"})


def _logit_scale(layer: Layer) -> float:
    """How much smaller than at a unit-scale input a query/key projection's ||g||/||W|| is expected to be, from the
    RMS of what it reads. At near-uniform attention dL/ds_ij = p_ij dL/dout_i . (v_j - mean v), and
    dL/dW_q = sum_ij dL/ds_ij k_j x_i^T / sqrt(d): three factors of the input (the value spread, the key, x
    itself) against one in dL/dW_v, so relative to the rest of the network it shrinks as RMS^2. MobileViT's first
    attention stage reads RMS 0.001 (1.8e7x below the median: 18x at unit scale), MobileBERT's, behind NoNorm,
    0.013. Only a small input is so credited: a large one no longer leaves attention uniform."""
    rms = layer.input_rms
    return min(1.0, rms) ** 2 if rms is not None and rms > 0 else 1.0


# A selective scan's projections (Mamba, Gu & Dao 2023: h_t = exp(dt A) h_{t-1} + dt B x_t, y_t = C h_t): x_proj
# makes dt (low rank), B and C from the input, dt_proj lifts dt through a softplus. dt is initialised in
# [0.001, 0.1] (log-uniform) and multiplies every path from x_proj and dt_proj to the output, the softplus'
# derivative at dt's bias being about dt itself: their gradients are 10-1000x below the network's by design (a
# one-block Mamba: x_proj 23x, dt_proj 906x). Deeper stacks compare them with their peers in the other blocks.
# Both are told by their names in one module: an `x_proj` elsewhere, without a `dt_proj` beside it, is not one.
SELECTIVE_SCAN = frozenset({"x_proj", "dt_proj"})


def selective_scans(names: Sequence[str]) -> set[str]:
    """The layers that are a selective scan's step or state projections (SELECTIVE_SCAN): those in a module
    that holds a `dt_proj`."""
    scans = {name.rpartition(".")[0] for name in names if name.rpartition(".")[2].lower() == "dt_proj"}
    return {
        name for name in names if name.rpartition(".")[2].lower() in SELECTIVE_SCAN and name.rpartition(".")[0] in scans
    }


def attention_logits(name: str) -> bool:
    """Whether a layer is a query or key projection (LOGIT_WORDS), by the last part of its name."""
    words = name.rsplit(".", 1)[-1].lower().split("_")
    return any(word in LOGIT_WORDS for word in words) and all(
        word in LOGIT_WORDS or word in PROJECTION_WORDS for word in words
    )


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
