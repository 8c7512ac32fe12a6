"""Which rows the table shows (--layers folded|flagged|all), and names that fit without losing what tells
them apart. Pure functions over the report's layers: the Rich table reads them, and so can any renderer.

Folding: layers whose names differ only by numbers (`encoder.layer.{0..11}.attention.self.query`,
`denseblock{1..4}.denselayer{1..24}.conv1`), of one type and one status, are one row with the range of their
numbers, like torchinfo's depth setting. A layer with a finding is never folded: it always has a row of its own.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from gradcheck_cli.report import Layer

NUMBER = re.compile(r"\d+")
# Past this many layers every repeated name folds, even a chain's positions (hidden.0 .. hidden.39)
FOLD_ANY_ABOVE = 30
DOT = re.compile(r"\.(?![^{]*\})")  # a dot between name components, not one inside a folded range {0..11}


def components(name: str) -> list[str]:
    return DOT.split(name)


@dataclass(frozen=True)
class Row:
    """One table row: a layer, or several folded into one (`name` then shows their numbers as ranges)."""

    name: str
    layers: tuple[Layer, ...]

    @property
    def folded(self) -> bool:
        return len(self.layers) > 1

    @property
    def first(self) -> Layer:
        return self.layers[0]


def flagged(layer: Layer) -> bool:
    """Whether a layer has a finding (its status carries a severity)."""
    return layer.severity is not None


def in_forward_order(layers: Sequence[Layer]) -> list[Layer]:
    """Layers in the order they first ran; layers that never ran last."""
    return sorted(layers, key=lambda layer: (layer.forward_index is None, layer.forward_index or 0))


def rows(layers: Sequence[Layer], mode: str = "folded") -> list[Row]:
    """The rows for --layers `mode`, in forward order (a folded row sits where its first layer ran)."""
    ordered = in_forward_order(layers)
    if mode == "all":
        return [Row(_name(layer), (layer,)) for layer in ordered]
    if mode == "flagged":
        return [Row(_name(layer), (layer,)) for layer in ordered if flagged(layer)]
    long = len(ordered) > FOLD_ANY_ABOVE
    groups: dict[tuple[str, str, str], list[Layer]] = {}
    for layer in ordered:
        groups.setdefault(_fold_key(layer, long), []).append(layer)
    result = []
    for layer in ordered:
        key = _fold_key(layer, long)
        members = groups.get(key, [layer])
        if len(members) < 2:
            result.append(Row(_name(layer), (layer,)))
        elif members[0] is layer:
            result.append(Row(_pattern(members), tuple(members)))
    return result


def _fold_key(layer: Layer, long: bool) -> tuple[str, str, str]:
    """Layers with the same key fold: the name with its numbers taken out, the type, the status. A flagged
    layer's key is its own name, so it stays alone; so is a layer whose only number is its last component
    (`hidden.3`, a Sequential's `4`: a position in a chain, whose per-depth numbers are the point) unless the
    table is long."""
    pattern = NUMBER.sub("#", layer.name)
    chain_position = len(NUMBER.findall(layer.name)) == 1 and NUMBER.fullmatch(components(layer.name)[-1])
    if flagged(layer) or pattern == layer.name or (chain_position and not long):
        return (f"\0{layer.name}", layer.type, layer.status)
    return (pattern, layer.type, layer.status)


def _name(layer: Layer) -> str:
    return layer.name or "(model)"


def _pattern(members: Sequence[Layer]) -> str:
    """The members' common name, each number that differs written as its set: {0..11}, {1,3}, {0..4,6..11}."""
    parts = NUMBER.split(members[0].name)
    numbers = [[int(found) for found in NUMBER.findall(layer.name)] for layer in members]
    text = parts[0]
    for slot, tail in enumerate(parts[1:]):
        values = sorted({found[slot] for found in numbers})
        text += str(values[0]) if len(values) == 1 else "{" + _ranges(values) + "}"
        text += tail
    return text


def _ranges(values: Sequence[int]) -> str:
    """Sorted distinct numbers as runs: `0..4,6..11`; a run of at least STRIDED_RUN numbers a fixed step apart as
    `8..62 by 2` (a Sequential's weight layers sit at every other index, its activations between them)."""
    runs: list[tuple[int, int, int]] = []  # first, last, step
    start = 0
    while start < len(values):
        if start + 1 == len(values):
            runs.append((values[start], values[start], 1))
            break
        end = start + 1
        step = values[end] - values[start]
        while end + 1 < len(values) and values[end + 1] - values[end] == step:
            end += 1
        if step == 1 or end - start + 1 >= STRIDED_RUN:
            runs.append((values[start], values[end], step))
            start = end + 1
        else:
            runs.append((values[start], values[start], 1))
            start += 1
    return ",".join(_run(*run) for run in runs)


# Fewest numbers a fixed step (above 1) apart that are written as one run: three (8,10,12) are as short listed.
STRIDED_RUN = 4


def _run(first: int, last: int, step: int) -> str:
    if first == last:
        return str(first)
    if step == 1:
        return f"{first},{last}" if last == first + 1 else f"{first}..{last}"
    return f"{first}..{last} by {step}"


def common_prefix(names: Sequence[str]) -> str:
    """The leading dotted components every name shares (`bert.encoder.`), to be shown once; "" if none, or if
    stripping it would leave a name empty."""
    if len(names) < 2:
        return ""
    split = [components(name) for name in names]
    shared = 0
    while all(len(parts) > shared + 1 for parts in split) and len({parts[shared] for parts in split}) == 1:
        shared += 1
    # a name should not start with a bare index or a folded range (`3.a`, `{0..3}.a`): keep what they index
    while shared and any("{" in parts[shared - 1] or parts[shared][:1] in "{0123456789" for parts in split):
        shared -= 1
    return ".".join(split[0][:shared]) + "." if shared else ""


def shorten(name: str, width: int) -> str:
    """A name in at most `width` characters that still tells rows apart: the components before the last are
    abbreviated to their first letter from the left (`bert.encoder.layer.{0..11}.attention.query` ->
    `b.e.l.{0..11}.a.query`), keeping every index and range; if that is not enough, the leading components
    give way to an ellipsis (`….{0..4,6..11}.intermediate`); only then is the head cut (`…6..11}.intermediate`)."""
    if len(name) <= width:
        return name
    parts = components(name)
    for index in range(len(parts) - 1):
        if not (NUMBER.search(parts[index]) or "{" in parts[index]):
            parts[index] = parts[index][0]
            if len(".".join(parts)) <= width:
                return ".".join(parts)
    for start in range(1, len(parts) - 1):
        shortened = "….".join(["", ".".join(parts[start:])])
        if len(shortened) <= width:
            return shortened
    return "…" + ".".join(parts)[-(width - 1) :]
