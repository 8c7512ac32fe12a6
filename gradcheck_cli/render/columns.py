"""The per-layer table's columns, defined once for every renderer that draws the table (Rich and Markdown).

A column is a header, an alignment and a function from a layer (and the table's shared context) to the text
of its cell. A renderer may style a cell by the column's `role` (the name, the sparkline, the status).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from gradcheck_cli.render.common import (
    count,
    fraction_sparkline,
    number,
    spark_axis,
    spark_window,
    sparkline,
    spread,
    status_text,
    trend_sparkline,
)
from gradcheck_cli.render.rows import Row
from gradcheck_cli.report import Finding, Layer, Report, Training, TrainingLayer
from gradcheck_cli.series import median


@dataclass(frozen=True)
class TableContext:
    """What cells need beyond their own layer: the shared histogram window, every finding."""

    window: tuple[int, int] | None
    findings: Sequence[Finding]
    training: Training | None = None  # --train-steps: the watched run, for its columns

    @classmethod
    def of(cls, report: Report) -> TableContext:
        return cls(spark_window(report.layers), report.findings, report.training)


@dataclass(frozen=True)
class Column:
    key: str  # how --layers and narrow terminals refer to it
    header: Callable[[TableContext], str]
    cell: Callable[[Row, TableContext], str]
    justify: Literal["left", "right"] = "left"
    role: Literal["name", "value", "spark", "status"] = "value"
    # lowest first: the order in which a narrow terminal leaves columns out; None: never left out
    drop: int | None = None
    training: bool = False  # shown only after a watched training run (--train-steps)


def numeric(read: Callable[[Layer], float | None]) -> Callable[[Row, TableContext], str]:
    """One layer's number; for a folded row the range of its layers' numbers, never cut."""

    def cell(row: Row, context: TableContext) -> str:
        if not row.folded:
            return number(read(row.first))
        return number_range([read(layer) for layer in row.layers])

    return cell


def number_range(values: Sequence[float | None]) -> str:
    """'1.2e-03' when the values agree to two digits, '1.2–4.5e-3' within one decade, else '6.9e-2–1.8e-1'."""
    known = [v for v in values if v is not None and math.isfinite(v)]
    if not known:  # nan or inf as number() writes them; "-" when there is no value at all
        return number(next((v for v in values if v is not None), None))
    low, high = number(min(known)), number(max(known))
    if low == high:
        return low
    low, high = _short_exponent(low), _short_exponent(high)  # 1.2e-03 -> 1.2e-3: a range is two numbers wide
    if "e" in low and "e" in high and low.split("e")[1] == high.split("e")[1]:
        return f"{low.split('e')[0]}–{high}"
    return f"{low}–{high}"


def _short_exponent(text: str) -> str:
    if "e" not in text:
        return text
    mantissa, exponent = text.split("e")
    return f"{mantissa}e{int(exponent)}"


def _params(row: Row, context: TableContext) -> str:
    if row.first.alias_of:
        return "tied"
    return count(sum(layer.params for layer in row.layers))


def _spread(row: Row, context: TableContext) -> str:
    values = [layer.grad_norm_spread for layer in row.layers if layer.grad_norm_spread is not None]
    return spread(max(values) if values else None)


def _spark(row: Row, context: TableContext) -> str:
    histograms = [layer.histogram for layer in row.layers if layer.histogram]
    merged = [sum(counts) for counts in zip(*histograms, strict=True)] if histograms else None
    return sparkline(merged, context.window)


def _per_step(
    row: Row, context: TableContext, pick: Callable[[TrainingLayer], tuple[float | None, ...]]
) -> list[float | None]:
    """One series over the watched steps for the row: its layer's, or a folded row's median layer's."""
    if context.training is None:
        return []
    series = [pick(found) for layer in row.layers if (found := context.training.layer(layer.name)) is not None]
    return [median(values) for values in zip(*series, strict=True)] if series else []


def _over_steps(row: Row, context: TableContext) -> str:
    """The layer's ||g|| over the watched steps (the tutorial's picture over time), on its own log scale."""
    per_step = _per_step(row, context, lambda layer: layer.grad_norm)
    return trend_sparkline(per_step) if per_step else ""


def _dead_over_steps(row: Row, context: TableContext) -> str:
    """The share of the layer's units with no gradient in each watched step, 0 to 100% (linear)."""
    per_step = _per_step(row, context, lambda layer: layer.dead_fraction)
    return fraction_sparkline(per_step) if per_step else ""


def _update(row: Row, context: TableContext) -> str:
    if row.folded:
        return number_range([layer.update_ratio for layer in row.layers])
    return number(row.first.update_ratio)


def _status(row: Row, context: TableContext) -> str:
    text = status_text(row.first, context.findings)
    return f"{text} ×{len(row.layers)}" if row.folded else text


COLUMNS = (
    Column("layer", lambda c: "layer", lambda row, c: row.name, role="name"),
    Column("type", lambda c: "type", lambda row, c: row.first.type, drop=3),
    Column("params", lambda c: "params", _params, "right", drop=4),
    Column("grad", lambda c: "‖g‖", numeric(lambda layer: layer.grad_norm_median), "right"),
    Column("spread", lambda c: "spread", _spread, "right", drop=2),
    Column("ratio", lambda c: "‖g‖/‖W‖", numeric(lambda layer: layer.grad_to_weight), "right"),
    Column("update", lambda c: "‖ΔW‖/‖W‖", _update, "right", drop=5, training=True),
    Column("dz", lambda c: "‖dL/dz‖", numeric(lambda layer: layer.output_grad_norm_median), "right"),
    Column(
        "steps",
        lambda c: f"‖g‖ over {c.training.steps if c.training else 0} steps",
        _over_steps,
        role="spark",
        drop=1,
        training=True,
    ),
    Column("dying", lambda c: "dead units, 0-100%", _dead_over_steps, role="spark", drop=1, training=True),
    Column("histogram", lambda c: spark_axis(c.window) or "|g| histogram", _spark, role="spark", drop=0),
    Column("status", lambda c: "status", _status, role="status"),
)
# what a note names when columns are left out
COLUMN_LABELS = {
    "type": "type",
    "params": "params",
    "spread": "spread",
    "histogram": "|g| histogram",
    "steps": "‖g‖ over the watched steps",
    "update": "‖ΔW‖/‖W‖",
    "dying": "dead units over the watched steps",
}
# the dead-units sparkline is shown when some layer's units died during the watched run (its dead fraction
# rose by at least this much): otherwise it is a row of flat lines
DYING_SHOWN = 0.05


def columns(context: TableContext) -> list[Column]:
    """The columns this report has: the training ones only after a watched run."""
    shown = [column for column in COLUMNS if not column.training or context.training is not None]
    return [column for column in shown if column.key != "dying" or _units_died(context.training)]


def _units_died(training: Training | None) -> bool:
    if training is None:
        return False
    for layer in training.layers:
        dead = [d for d in layer.dead_fraction if d is not None]
        if dead and max(dead) - dead[0] >= DYING_SHOWN:
            return True
    return False
