"""Activation rules: ReLU units that never activate, layers that read almost only exact zeros (a nearly dead
activation before them), sigmoid/tanh inputs that sit in saturation; and usage: trainable parameters that got
no gradient."""

from __future__ import annotations

import dataclasses
import math

from gradcheck_cli.diagnose.common import Context, all_zero, got_no_gradient, level
from gradcheck_cli.diagnose.peers import peer_group
from gradcheck_cli.diagnose.thresholds import Thresholds
from gradcheck_cli.diagnose.update import expects_comparison
from gradcheck_cli.report import Finding, Layer

# Dead units, and chance. At a random symmetric initialisation a unit's pre-activation w.x + b is below 0 for
# any one input with probability 1/2. When the inputs vary little around a nonzero mean (a squeeze-excitation
# block's fc1 reads globally pooled post-ReLU features: all positive, nearly alike across images), the sign
# is the same for every input, so up to half the units never activate by chance alone, each independently.
# A dead fraction is a finding only when its count is improbable under that worst case: a binomial upper
# tail below CHANCE_DEAD (one healthy layer in a thousand flagged at worst). A small layer all of whose units
# are dead still gets no gradient at all, which the numeric rule reports (a warning while the chance of all of
# them dying is at least CHANCE_DEAD: numeric._dead_by_chance).
CHANCE_DEAD = 1e-3


def chance_of_dead(dead: int, units: int) -> float:
    """P(X >= dead) for X ~ Binomial(units, 1/2): how often init alone leaves that many units dead."""
    if dead <= 0:
        return 1.0
    if units <= 1000:
        return float(sum(math.comb(units, i) for i in range(dead, units + 1)) / 2**units)
    z = (dead - 0.5 - units / 2) / (math.sqrt(units) / 2)  # normal approximation, continuity-corrected
    return 0.5 * math.erfc(z / math.sqrt(2))


def activations(context: Context) -> list[Finding]:
    layers, thresholds = context.layers, context.thresholds
    findings = []
    sparse: list[Finding] = []  # nearly dead, grouped at the end
    for layer in layers:
        if layer.alias_of is not None:
            continue  # a tied tensor: its owner carries the verdict
        dead = layer.dead_fraction
        source = "ReLU units never activate over all batches"
        fix = (
            "dead ReLUs: initialise with nn.init.kaiming_normal_ and zero biases, lower the learning rate, or use "
            "nn.LeakyReLU / nn.GELU"
        )
        # Rows of dL/dW = dL/dz x input^T that get no usable gradient (reduce.STARVED_UNIT): units the activation
        # after them never passes a gradient through, whatever form it takes (nn.ReLU, F.relu, a clamp, GELU or
        # SiLU deep in their negative tails) - unless the layer's input is all zeros itself, which zeroes every
        # row and is the layer before it's finding.
        if layer.flat_activation is not None:
            source = (
                f"units never leave {layer.flat_activation}'s flat region (its derivative under 5% of its peak "
                "for every input of the first measured batch)"
            )
            fix = (
                f"pre-activations sit deep in {layer.flat_activation}'s negative tail: check the biases and the "
                "initialisation of this layer (nn.init.kaiming_normal_ / xavier_normal_, zero biases), or "
                "normalise its input (nn.LayerNorm)"
            )
        reads_something = (layer.input_zero_fraction or 0.0) < 1.0
        if not reads_something:
            # every input exactly 0: each unit outputs its bias, so a ReLU after it is 0 for all inputs whatever
            # the weights (a squeeze-excitation reading a block whose last norm scale starts at 0, timm's
            # zero_init_last); the layer that makes the zeros carries the finding, if any
            dead = None
        # A gated layer (its matrices get 0 until a zero-initialised gate moves: confirm.open_gates) is not judged,
        # nor one whose units starve only behind small per-channel scales (scales.open_scales).
        judged = not all_zero(layer) and not layer.gated and not layer.behind_scales and reads_something
        # One weight per unit whose output is normalised (a 1x1 depthwise conv before BatchNorm: MobileOne's scale
        # branch): BN(w x) = BN(x) for any w > 0, so dL/dw is 0 but for rounding by design, not a starved unit.
        judged = judged and not (layer.feeds_norm and layer.units and layer.params <= 2 * layer.units)
        if dead is None and layer.zero_grad_unit_fraction is not None and judged:
            dead = layer.zero_grad_unit_fraction
            source = "output units got no usable gradient in any step (below 1e-5 of the layer's typical unit)"
            fix = (
                "the activation after these units passes no gradient for any input they get (pre-activations far "
                "in its flat region): check biases and initialisation (nn.init.kaiming_normal_, zero biases), "
                "lower the learning rate, or normalise the pre-activations (nn.LayerNorm)"
            )
        severity = level(dead or 0.0, thresholds.dead_warning, thresholds.dead_error)
        if dead is not None and layer.units and chance_of_dead(round(dead * layer.units), layer.units) >= CHANCE_DEAD:
            severity = None  # as many dead units as a random init leaves by chance (CHANCE_DEAD)
        if severity is not None and dead is not None:
            findings.append(Finding(layer.name, "dead", severity, "activation", f"{dead:.0%} of {source}", fix, dead))
        elif (found := nearly_dead(layer, thresholds)) is not None:
            sparse.append(found)
        saturated = layer.saturated_fraction
        severity = level(saturated or 0.0, thresholds.saturation_warning, thresholds.saturation_error)
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
    return findings + _grouped(sparse)


def _grouped(found: list[Finding]) -> list[Finding]:
    """Nearly dead layers of one severity are one finding (one cause, one fix, usually every block of a
    network): on the sparsest of them, the others in `also`, with the range of their zero fractions."""
    grouped = []
    for severity in ("error", "warning"):
        members = [f for f in found if f.severity == severity]
        if not members:
            continue
        first = max(members, key=lambda f: f.factor or 0.0)
        rest = [f for f in members if f is not first]
        message = first.message
        if rest:
            low = min(f.factor or 0.0 for f in rest)
            high = max(f.factor or 0.0 for f in rest)
            roles = tuple(dict.fromkeys(peer_group(f.layer) for f in rest))
            message += (
                f"; the same for {len(rest)} more layers ({_share(low)}-{_share(high)} zeros), in {_named(roles)}"
                if len(rest) > 1
                else f"; the same for {rest[0].layer} ({_share(high)} zeros)"
            )
        also = tuple(f.layer for f in rest)
        grouped.append(dataclasses.replace(first, message=message, also=also))
    return grouped


def nearly_dead(layer: Layer, thresholds: Thresholds) -> Finding | None:
    """A hidden weight layer that reads almost nothing but exact zeros: the activation before it (a ReLU
    family unit, in whatever form: module, F.relu, a clamp) is active for a sliver of its inputs, so it passes
    a gradient, and feeds this layer's weight gradient, for that sliver only. No unit need be dead for it:
    BatchNorm shifted far below 0 leaves every channel active at a few positions of thousands (MobileNetV2
    with its BN biases at -3: 0.2% active, none never), which the count of units that never activate misses.

    Not judged: a layer that reads the model's input (depth 1: sparse features are data, not activations), an
    embedding (it reads ids), a tied alias, a gated layer, and a layer whose input is exactly 0 everywhere
    (each of its units outputs its bias: the layer before it carries that finding)."""
    zeros = layer.input_zero_fraction
    reads_hidden = layer.depth is not None and layer.depth > 1
    weight_layer = expects_comparison(layer) and layer.category != "embedding"
    if zeros is None or zeros >= 1.0 or not reads_hidden or not weight_layer or layer.gated:
        return None
    severity = level(zeros, thresholds.nearly_dead_warning, thresholds.nearly_dead_error)
    if severity is None:
        return None
    message = (
        f"{_share(zeros)} of its input values are exact zeros: the activation before it is nearly dead, active for "
        f"{_share(1 - zeros)} of inputs (a healthy ReLU: about half), and gradients pass through that sliver only"
    )
    fix = (
        "pre-activations sit below 0 for almost every input: check the bias or normalisation shift before the "
        "activation (a BatchNorm/LayerNorm bias far below 0), initialise with nn.init.kaiming_normal_ and zero "
        "biases, or use nn.LeakyReLU / nn.GELU; if the zeros come from dropout, lower its rate"
    )
    return Finding(layer.name, "dead", severity, "activation", message, fix, zeros)


def _share(fraction: float) -> str:
    """A fraction as a percentage, to two decimals near the thresholds (99.04% is an error, 98.96% is not)."""
    return f"{fraction:.2%}" if fraction >= 0.985 or fraction <= 0.015 else f"{fraction:.1%}"


def usage(context: Context) -> list[Finding]:
    """Trainable layers no gradient reached. One cause is one finding: the unused layers of one part of the
    model (the same maximal unused module in every block: a causal-LM decoder's cross-attention, built in each
    layer and never called without an encoder) are one finding on the first of them, the rest in `also`."""
    layers = [layer for layer in context.layers if not layer.side_output]  # side outputs: not measured
    unused = [layer for layer in layers if got_no_gradient(layer)]
    never = [layer for layer in unused if layer.forward_index is None]
    cut = [layer for layer in unused if layer.forward_index is not None]
    causes = (
        (
            never,
            "trainable, but never called in a measured forward, so it got no gradient",
            "remove it, freeze it (requires_grad_(False)), or check the forward calls it",
        ),
        (  # called, yet nothing it returned reached the loss with a gradient
            cut,
            "trainable and called in the forward, but no gradient reached it in any step: its output is unused, "
            "detached (.detach(), torch.no_grad()) or read only through non-differentiable ops (argmax, >)",
            "to train it, keep its output in the graph to the loss; if not, freeze it: requires_grad_(False)",
        ),
    )
    findings = []
    all_names = [layer.name for layer in context.layers]
    for members, message, fix in causes:
        for part, grouped in _parts(members, all_names).items():
            first, rest = grouped[0], grouped[1:]
            alike = f"; the same for {len(rest)} more layers, in {_named(part)}" if rest else ""
            also = tuple(layer.name for layer in rest)
            findings.append(Finding(first.name, "unused", "warning", "usage", message + alike, fix, None, also))
    return findings


def _parts(members: list[Layer], names: list[str]) -> dict[tuple[str, ...], list[Layer]]:
    """Unused layers grouped by where their cause lies: each layer's largest enclosing module whose layers are
    all in `members` (the module never called), keyed by that module's parent with block indices wildcarded,
    so that the same part of every block is one group; the key holds the wildcarded modules, in order."""
    inside = {layer.name for layer in members}
    groups: dict[str, list[Layer]] = {}
    modules: dict[str, list[str]] = {}
    for layer in members:
        top = layer.name
        parts = layer.name.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:cut])
            if all(name in inside for name in names if name == prefix or name.startswith(prefix + ".")):
                top = prefix
            else:
                break
        parent = peer_group(top.rpartition(".")[0])
        groups.setdefault(parent, []).append(layer)
        module = peer_group(top)
        if module not in modules.setdefault(parent, []):
            modules[parent].append(module)
    return {tuple(modules[parent]): grouped for parent, grouped in groups.items()}


def _named(modules: tuple[str, ...]) -> str:
    shown = ", ".join(modules[:NAMED_PARTS])
    return shown + (f" and {len(modules) - NAMED_PARTS} more" if len(modules) > NAMED_PARTS else "")


NAMED_PARTS = 4  # modules a grouped unused finding names (the rest are counted)
