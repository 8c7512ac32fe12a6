"""Who a weight layer is compared with in the update view: its peers (the same role in the other blocks),
their median or their trend over sizes, the repeats of its own stage, and what gates put between them by
design."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from gradcheck_cli.report import Layer
from gradcheck_cli.series import median, theil_sen_slope


def relative(layer: Layer, measured: bool) -> float | None:
    """What the view compares: the update the watched optimizer steps made (||dW||/||W||, --train-steps), or
    without them ||g||/||W||, the update one SGD step would make per unit of learning rate."""
    return layer.update_ratio if measured else layer.grad_to_weight


# "3", "encoder_layer_3", "block3-4" (torchvision RegNet): a block's position, not its role
_BLOCK_INDEX = re.compile(r"^(?:\d+|.*[_-]\d+)$")


def peer_group(name: str) -> str:
    """A layer's role: its name with block indices wildcarded (encoder.layers.3.linear1 -> encoder.layers.#.linear1,
    encoder.layers.encoder_layer_3.mlp.0 -> encoder.layers.encoder_layer_#.mlp.#,
    block3.block3-4.f -> block3.block3-#.f)."""
    return ".".join(re.sub(r"\d+$", "#", part) if _BLOCK_INDEX.match(part) else part for part in name.split("."))


# Fewest layers in a role for a peer median: with two, the same role in another block is already a better
# reference than the whole network, whose roles differ by design (see peer_medians). But the median of two is
# their midpoint, which moves with either: a pair 40x apart says one of them is off, not which (XCiT's two
# class-attention blocks: the first one's value projection learns 220x faster than the network median, behind a
# LayerNorm of the small class token, and the second, 5x above that median, read 22x below the pair). From
# ROBUST_PEERS on, one odd layer cannot move the median past the others; a pair's slower member is flagged only
# when the network median says so too (the milder of the two verdicts).
PEER_GROUP_MIN = 2
ROBUST_PEERS = 3


def peer_medians(
    members: Sequence[Layer], roles: dict[str, list[Layer]], measured: bool
) -> dict[str, tuple[str, float, bool]]:
    """{layer: (group, median ||g||/||W|| of its group, whether the group is a mere pair: fewer than
    ROBUST_PEERS)} for groups of at least PEER_GROUP_MIN layers.

    Layers in different roles learn at different speeds by design: GPT-2's scaled initialisation makes the
    residual projections' weights sqrt(2 * blocks) smaller, uniform attention at initialisation gives query and
    key projections gradients ~30x smaller than value projections. The same role in another block should learn
    at a similar speed, so a layer is compared with its peers when it has enough of them.
    """
    result = {}
    for key, group in roles.items():
        if len(group) >= PEER_GROUP_MIN:
            value = median([relative(layer, measured) or 0.0 for layer in group])
            if value:
                for layer in group:
                    result[layer.name] = (key.split(":")[0], value, len(group) < ROBUST_PEERS)
    # A layer left without peers (its role has one block: a stem's copy of a stage's block, the third of three
    # blocks where the other stages have two) is compared with the same sublayer of every block: the layers of
    # its type whose names end in the same two parts but for their numbers (stem.down.conv_block.se.fc1 with
    # stages.#.downsample.conv_block.se.fc1 and stages.#.global_block.blocks.conv#.se.fc1: *.se.fc#; the third
    # block's blocks.conv3.conv_dw with the others': *.conv#.conv_dw), when there are at least ROBUST_PEERS of
    # them. Nearer than the network median, which it replaces, and never in place of a role's own peers.
    twins: dict[str, list[Layer]] = {}
    for layer in members:
        parts = layer.name.split(".")
        if len(parts) >= 3:
            tail = ".".join(re.sub(r"\d+$", "#", part) for part in parts[-2:])
            twins.setdefault(f"*.{tail}:{layer.type}:{layer.layout}", []).append(layer)
    for key, group in twins.items():
        twin = median([relative(layer, measured) or 0.0 for layer in group]) if len(group) >= ROBUST_PEERS else None
        if twin:
            for layer in group:
                result.setdefault(layer.name, (key.split(":")[0], twin, False))
    return result


def _roles(members: Sequence[Layer]) -> dict[str, list[Layer]]:
    """{"role:type:layout": its layers}: the layers whose names differ only in block indices (peer_group), by
    type and by layout (a depthwise and a pointwise convolution under one name are two roles)."""
    roles: dict[str, list[Layer]] = {}
    for layer in members:
        if "#" in peer_group(layer.name):
            roles.setdefault(f"{peer_group(layer.name)}:{layer.type}:{layer.layout}", []).append(layer)
    return roles


# A role spanning the stages of a hierarchical net has a layer per stage, each of its stage's width and
# resolution: timm's SwiftFormer-XS attention projection, 48 to 220 wide, reads ||g||/||W|| 3.1e-8, 9.9e-9,
# 2e-9, 5.1e-10 from stage to stage, so the role's median falls between stages and the last stage sits 12x below
# it by design; MaxxViT's stages hold 1, 2, 3 and 1 blocks, and the gradient in its residual stream shrinks
# 6-11x per stage toward the input (each stage's shortcut pools 2x2 and projects), so its first stage's layers
# sit 20-48x below their role's median and ~3x below the other stages' trend. In a role with more than
# SIZE_TREND_MIN sizes, a layer is also compared with the trend over size of the other sizes (a Theil-Sen line in
# log ||g||/||W|| against log parameters, through one point per size: the median of the layers of that size, so
# that a stage of many blocks weighs as one) at its own size. The line is fitted without the layer's own size,
# so that layers off the trend cannot tilt it toward themselves, and the milder verdict holds (_balance): a trend
# read far from the sizes it was fitted on can say anything, so it only ever clears what the median says.
SIZE_TREND_MIN = 3
LEAVE_ONE_OUT = 16


def size_trends(roles: dict[str, list[Layer]], measured: bool) -> dict[str, float]:
    """{layer: the other sizes' fitted ||g||/||W|| at its size}, in roles of more than SIZE_TREND_MIN sizes."""
    result: dict[str, float] = {}
    for role in roles.values():
        by_size: dict[int, list[float]] = {}
        for layer in role:  # members' values are finite and > 0
            by_size.setdefault(layer.params, []).append(relative(layer, measured) or 1.0)
        if len(by_size) <= SIZE_TREND_MIN:
            continue
        points = {
            size: (math.log10(max(size, 1)), math.log10(median(values) or 1.0)) for size, values in by_size.items()
        }
        # beyond a few points one size cannot tilt the line: one fit for them all
        shared = _line(list(points.values())) if len(points) > LEAVE_ONE_OUT else None
        lines = {size: shared or _line([point for other, point in points.items() if other != size]) for size in points}
        for layer in role:
            line = lines[layer.params]
            if line is not None:
                result[layer.name] = 10 ** (line[1] + line[0] * points[layer.params][0])
    return result


def _line(points: Sequence[tuple[float, float]]) -> tuple[float, float] | None:
    """(slope, intercept) of a Theil-Sen line through the points, None without two distinct x."""
    slope = theil_sen_slope([x for x, _ in points], [y for _, y in points])
    intercept = None if slope is None else median(y - slope * x for x, y in points)
    return None if slope is None or intercept is None else (slope, intercept)


def neutral_gate_lags(roles: dict[str, list[Layer]]) -> dict[str, float]:
    """{layer: the factor by which gates at their neutral point put it below its peers' median}, for a role
    made of gated recurrent layers stacked one on another (separate nn.LSTM/nn.GRU modules). Every gated layer
    scales the gradient reaching its input by neutral_gate_gain at PyTorch's default init (LSTM 1/4, GRU 1/2;
    the signal view takes the same factor out: signal._beyond_gates), so a layer's dL/dz, and with it dL/dW,
    carries the factors of the gated layers after it: the bottom of six default LSTMs sits 0.25^2.5 ~ 1/32
    below the median by design, and the gates learn to open from the first steps (Gers et al. 2000)."""
    result: dict[str, float] = {}
    for role in roles.values():
        if len(role) < PEER_GROUP_MIN or not all(
            layer.neutral_gate_gain and layer.forward_index is not None for layer in role
        ):
            continue
        lags, after = {}, 1.0
        for layer in sorted(role, key=lambda layer: layer.forward_index or 0, reverse=True):
            lags[layer.name] = after
            after *= layer.neutral_gate_gain or 1.0
        reference = median(list(lags.values())) or 1.0
        result.update((name, lag / reference) for name, lag in lags.items())
    return result


def repeat_medians(roles: dict[str, list[Layer]], measured: bool) -> dict[str, float]:
    """{layer: median ||g||/||W|| of its exact repeats}: peers (peer_medians) with as many parameters, for layers
    whose peer group holds others too. A role's name can span layers that differ by design: the stages of a
    hierarchical net (widths and resolutions change from one to the next: FocalNet's ||g||/||W|| grows ~4x per
    stage), or a ModuleList indexed by something else than the block (FocalNet's focal levels, 3x3 and 5x5
    kernels, the second ~30x below the first in every stage). A layer is flagged against its peers only if its
    repeats, the same layer in the blocks of its own stage, find it slow too (the milder verdict of the two)."""
    result: dict[str, float] = {}
    for role in roles.values():
        sizes: dict[int, list[Layer]] = {}
        for layer in role:
            sizes.setdefault(layer.params, []).append(layer)
        for same in sizes.values():
            value = median([relative(layer, measured) or 0.0 for layer in same])
            if PEER_GROUP_MIN <= len(same) < len(role) and value:
                result.update((layer.name, value) for layer in same)
    return result


@dataclass(frozen=True)
class References:
    """What the update view compares the layers of a network with, each {layer: value}: their peers' median
    (group, median, whether a mere pair), the factor gates put between them and their peers by design, the
    trend of their role over sizes, and the median of their repeats."""

    medians: dict[str, tuple[str, float, bool]]
    gates: dict[str, float]
    trends: dict[str, float]
    repeats: dict[str, float]

    @classmethod
    def of(cls, members: Sequence[Layer], measured: bool) -> References:
        roles = _roles(members)
        return cls(
            peer_medians(members, roles, measured),
            neutral_gate_lags(roles),
            size_trends(roles, measured),
            repeat_medians(roles, measured),
        )
