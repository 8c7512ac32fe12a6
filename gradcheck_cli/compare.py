"""`gradcheck compare BASE.json NEW.json`: what changed per layer between two reports, as a CI regression gate.

Layers are matched by name. For each, the ratio NEW/BASE of the three numbers the table shows (medians over
the steps): ‖g‖, ‖dL/dz‖ and ‖g‖/‖W‖. A layer regressed when a ratio leaves [1/factor, factor], when a
gradient became exactly 0 or non-finite, or when its status turned from ok to a flagged one. Layers that appear
or disappear are listed, not judged. Pure functions over Report objects: no torch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradcheck_cli.errors import UserError
from gradcheck_cli.report import SCHEMA, Layer, Report, json_safe

# An order of magnitude. The same model and seed measured after a harmless change (another batch order, a
# refactor, a library update) moves these norms by well under 2x; what makes training fail moves them by
# orders of magnitude, since per-layer gains compound over depth. 10 is also the update view's balance_warning:
# a layer learning ten times slower than before is worth a look.
DEFAULT_FACTOR = 10.0

NOT_FLAGGED = ("ok", "frozen", "gated", "unjudged")

# (key, label, how to read it from a layer)
QUANTITIES: tuple[tuple[str, str, Callable[[Layer], float | None]], ...] = (
    ("grad_norm", "‖g‖", lambda layer: layer.grad_norm_median),
    ("output_grad_norm", "‖dL/dz‖", lambda layer: layer.output_grad_norm_median),
    ("grad_to_weight", "‖g‖/‖W‖", lambda layer: layer.grad_to_weight),
)

# Settings that change the numbers themselves: comparing across them is comparing apples and pears.
SETTINGS = (
    ("steps", "steps"),
    ("batch_size", "batch size"),
    ("loss_name", "loss"),
    ("seed", "seed"),
    ("train_steps", "watched training steps before measuring"),
    ("lr", "learning rate"),
    ("mode", "mode"),
)


@dataclass(frozen=True)
class Change:
    quantity: str
    base: float | None
    new: float | None
    ratio: float | None  # new / base; None when either is missing, zero or non-finite
    regressed: str | None  # why, in words; None when within the factor


@dataclass(frozen=True)
class LayerChange:
    name: str
    base_status: str
    new_status: str
    new_severity: str | None
    forward_index: int | None
    changes: tuple[Change, ...]
    reasons: tuple[str, ...]  # why this layer regressed; empty: it did not

    @property
    def regressed(self) -> bool:
        return bool(self.reasons)


@dataclass
class Comparison:
    base: str  # where each report came from (path or label)
    new: str
    factor: float
    layers: list[LayerChange]
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def regressions(self) -> list[LayerChange]:
        return [layer for layer in self.layers if layer.regressed]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": "gradcheck.compare/1",
            "base": self.base,
            "new": self.new,
            "factor": self.factor,
            "regressed": bool(self.regressions),
            "regressions": [layer.name for layer in self.regressions],
            "added": self.added,
            "removed": self.removed,
            "notes": self.notes,
            "layers": [
                {
                    "name": layer.name,
                    "base_status": layer.base_status,
                    "new_status": layer.new_status,
                    "new_severity": layer.new_severity,
                    "regressed": layer.regressed,
                    "reasons": list(layer.reasons),
                    "changes": {
                        change.quantity: {
                            "base": change.base,
                            "new": change.new,
                            "ratio": change.ratio,
                            "regressed": change.regressed is not None,
                        }
                        for change in layer.changes
                    },
                }
                for layer in self.layers
            ],
        }

    def to_json(self) -> str:
        return json.dumps(json_safe(self.to_dict()), indent=2, allow_nan=False)


def load(path: Path) -> Report:
    """A report written by `gradcheck analyze --output FILE.json` (or --format json); UserError otherwise."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: no such file", "write it with gradcheck analyze ... --output FILE.json") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: cannot read it ({error})", "give a JSON report") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(f"{path}: not JSON ({error})", "give a report from gradcheck analyze --format json") from None
    try:
        return Report.from_dict(data)
    except ValueError as error:
        raise UserError(f"{path}: {error}", f"give a {SCHEMA} report from gradcheck analyze --format json") from None


def compare(
    base: Report, new: Report, factor: float = DEFAULT_FACTOR, labels: tuple[str, str] = ("base", "new")
) -> Comparison:
    """Layer by layer, NEW against BASE."""
    if not math.isfinite(factor) or factor <= 1:
        raise UserError(f"--factor must be a number above 1, got {factor:g}", f"use e.g. --factor {DEFAULT_FACTOR:g}")
    old = {layer.name: layer for layer in base.layers}
    now = {layer.name: layer for layer in new.layers}
    layers = [_layer(old[name], layer, factor) for name, layer in now.items() if name in old]
    layers.sort(key=lambda change: (change.forward_index is None, change.forward_index or 0))
    comparison = Comparison(
        base=labels[0],
        new=labels[1],
        factor=factor,
        layers=layers,
        added=[name for name in now if name not in old],
        removed=[name for name in old if name not in now],
    )
    if base.model != new.model:
        comparison.notes.append(f"different models: {base.model} vs {new.model}")
    for key, label in SETTINGS:
        before, after = getattr(base, key), getattr(new, key)
        if before != after:
            comparison.notes.append(f"the reports differ in {label} ({before} vs {after}): the norms depend on it")
    if not layers:
        comparison.notes.append("no layer names in common: nothing to compare")
    return comparison


def _layer(base: Layer, new: Layer, factor: float) -> LayerChange:
    changes = tuple(_change(key, read(base), read(new), factor) for key, _, read in QUANTITIES)
    reasons = [
        f"{label} {change.regressed}"
        for change, (_, label, _) in zip(changes, QUANTITIES, strict=True)
        if change.regressed
    ]
    if base.status in ("ok", "unjudged") and new.status not in NOT_FLAGGED:
        reasons.append(f"{base.status} -> {new.status}" + (f" ({new.severity})" if new.severity else ""))
    return LayerChange(
        name=new.name,
        base_status=base.status,
        new_status=new.status,
        new_severity=new.severity,
        forward_index=new.forward_index,
        changes=changes,
        reasons=tuple(reasons),
    )


def _change(quantity: str, base: float | None, new: float | None, factor: float) -> Change:
    if base is None or new is None:
        return Change(quantity, base, new, None, None)
    if not math.isfinite(new) and math.isfinite(base):
        return Change(quantity, base, new, None, f"became {new}")
    if not (math.isfinite(base) and math.isfinite(new)):
        return Change(quantity, base, new, None, None)
    if base == 0:
        return Change(quantity, base, new, None, None)  # from exactly 0: it was dead, now it is not
    ratio = new / base
    if new == 0:
        return Change(quantity, base, new, ratio, "fell to exactly 0")
    if ratio > factor or ratio < 1 / factor:
        return Change(quantity, base, new, ratio, f"x{ratio:.2g}")
    return Change(quantity, base, new, ratio, None)
