"""Numeric rules: NaN/Inf, gradients that are exactly zero (unless a zero-initialised layer after them gates
them: Layer.gated, measured by passes.open_gates), and gradient values that underflow the AMP dtype."""

from __future__ import annotations

import math
from collections.abc import Sequence

from gradcheck_cli.diagnose.activation import CHANCE_DEAD, chance_of_dead
from gradcheck_cli.diagnose.common import LOSS_LAYER, Context, all_zero, level
from gradcheck_cli.diagnose.update import attention_logits
from gradcheck_cli.report import Finding, Layer, NanOrigin


def numeric(context: Context) -> list[Finding]:
    """NaN/Inf in the loss or a layer's gradients; layers whose every gradient is exactly 0."""
    layers, origin = context.layers, context.nan_origin
    findings = []
    loss = context.loss
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
        if layer.alias_of is not None:
            continue  # a tied tensor: its owner carries the verdict
        if layer.trainable_params and layer.nonfinite:
            started_here = origin is not None and origin.module == layer.name
            message = (
                f"{layer.nonfinite} NaN/Inf gradient values; non-finite values start here ({origin.phase})"
                if started_here and origin is not None
                else f"{layer.nonfinite} NaN/Inf gradient values{where}"
            )
            findings.append(Finding(layer.name, "nan", "error", "numeric", message, _nan_fix(origin)))
        elif layer.trainable_params and all_zero(layer) and layer.type == "Embedding" and layer.output_grad_norm:
            findings.append(_padding_only(layer))
        elif layer.trainable_params and all_zero(layer) and layer.unread and _learning_sibling(layer, layers) is None:
            findings.append(_unread(layer))
        elif layer.trainable_params and all_zero(layer) and not layer.gated:
            steps = f"every gradient value is exactly 0 in all {len(layer.grad_norm_steps)} steps"
            learning = _learning_sibling(layer, layers)
            severity = "error"
            if learning is not None:  # a softmax over one position: no logit matters either, but by a known cause
                message, fix = _one_position(steps, learning)
            elif layer.input_zero_fraction == 1.0:
                message, fix = _zero_input(steps)
            elif layer.dead_fraction == 1.0 and layer.units and chance_of_dead(layer.units, layer.units) >= CHANCE_DEAD:
                severity = "warning"  # the activation rule's chance, for a layer left with no gradient by it
                message, fix = _dead_by_chance(steps, layer.units)
            else:
                message, fix = (
                    f"{steps}: this layer cannot learn",
                    "check what zeroes its signal: dead ReLUs after it (kaiming_normal_ init, LeakyReLU), a "
                    "zero-initialised layer downstream, or a detach()/no_grad in the forward",
                )
            findings.append(Finding(layer.name, "dead", severity, "numeric", message, fix))
    return findings


def _learning_sibling(layer: Layer, layers: Sequence[Layer]) -> str | None:
    """For a query/key projection (update.attention_logits), a layer of the same attention module that gets a
    gradient (its value or output projection), if any: its name within that module."""
    if not attention_logits(layer.name) or "." not in layer.name:
        return None
    parent = layer.name.rsplit(".", 1)[0] + "."
    return next(
        (
            other.name[len(parent) :]
            for other in layers
            if other.name.startswith(parent)
            and not attention_logits(other.name)
            and any(v for v in other.grad_norm_steps if v is not None)
        ),
        None,
    )


def _one_position(steps: str, learning: str) -> tuple[str, str]:
    """A query/key projection without gradient beside a value projection with one. Its only path to the loss
    is the attention logits, through softmax: d softmax_i / d s_j = p_i (delta_ij - p_j), which is exactly 0
    when a softmax spans one position (p = 1 whatever the logit), or only one key is left unmasked."""
    return (
        f"{steps}, while {learning} beside it learns: a query/key projection only moves the "
        "attention logits, and their gradient is exactly 0 when each softmax spans a single position (a "
        "softmax of one logit is 1 whatever the logit)",
        "give this attention more than one position to attend over: a longer sequence, a larger input (more "
        "patches after the downsampling before it), or an attention mask that leaves more than one key",
    )


def _padding_only(layer: Layer) -> Finding:
    """An nn.Embedding whose output gets a gradient while its table gets exactly 0: its backward scatters dL/dz
    into the rows looked up, leaving out only padding_idx, so every index it read is padding_idx. Not a table
    that cannot learn: one that these inputs never exercise (RoCBert's shape and pronunciation ids default to
    all zeros, its padding_idx)."""
    return Finding(
        layer.name,
        "unused",
        "warning",
        "usage",
        f"every gradient value is exactly 0 in all {len(layer.grad_norm_steps)} steps while its output gets one "
        f"(||dL/dz|| = {layer.output_grad_norm:.2g}): an embedding's backward leaves out only its padding_idx row, "
        "so every index these batches look up is padding_idx, and the inputs never exercise this table",
        "feed it the ids it embeds (an optional input left out defaults to padding: Hugging Face RoCBert's "
        "input_shape_ids and input_pronunciation_ids), or freeze it: requires_grad_(False)",
    )


def _unread(layer: Layer) -> Finding:
    """A layer whose gradient is exactly 0 because the loss reads nothing it computes (unread.unread_parameters):
    its parameters redrawn, the loss stays bit for bit the same. It cannot learn under this loss, but nothing is
    dead: the model reads only part of what it computes (one class token), by design or by mistake."""
    return Finding(
        layer.name,
        "unused",
        "warning",
        "usage",
        f"every gradient value is exactly 0 in all {len(layer.grad_norm_steps)} steps, and the loss stays bit for "
        "bit the same with its parameters redrawn: nothing they change reaches the loss (it reads only outputs "
        "they do not affect, such as the class token of a last block whose other tokens they transform)",
        "to train it, make the loss read what it computes; otherwise freeze it (requires_grad_(False)) or remove it",
    )


def _dead_by_chance(steps: str, units: int) -> tuple[str, str]:
    """A small layer all of whose ReLU units never activate: at init each does with probability up to 1/2 (the
    activation rule's worst case), so all `units` with at least 2^-units, a chance that random init alone
    gives (CHANCE_DEAD): a warning, where fewer than that many units all dead would be an error."""
    return (
        f"{steps}: all {units} ReLU units after it never activate on these batches, which a random init "
        f"leaves up to 1 time in {2**units:,} for {units} units; it cannot learn until what it reads moves",
        "another seed revives it; for a layer this narrow (a squeeze-excitation's reduction), LeakyReLU, a "
        "small positive bias, or more units keep it from dying",
    )


def _zero_input(steps: str) -> tuple[str, str]:
    """A layer whose input reads exactly 0: dL/dW = dL/dz x input is 0 whatever reaches its output."""
    return (
        f"{steps}, and so is its input (every value read, every step): dL/dW = dL/dz x input, so this layer "
        "cannot learn from what it reads",
        "look at what makes its input 0: a LayerNorm over a single feature ((x - mean) / std is 0 for every x), "
        "a ReLU before it that never activates, a zero-initialised or masked layer before it",
    )


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


def underflow(context: Context) -> list[Finding]:
    """Gradient values below the AMP dtype's normal range lose precision or vanish: vanishing by precision."""
    layers, thresholds, amp = context.layers, context.thresholds, context.amp
    if amp is None:
        return []
    dtype = {"bf16": "bfloat16", "fp16": "float16"}.get(amp, amp)
    findings = []
    for layer in layers:
        fraction = max(
            (f for f in (layer.underflow_fraction, layer.output_grad_underflow_fraction) if f is not None),
            default=None,
        )
        severity = level(fraction or 0.0, thresholds.underflow_warning, thresholds.underflow_error)
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
