"""The per-layer table's columns, defined once for every renderer that draws the table (Rich and Markdown).

A column is a header, an alignment and a function from a layer (and the table's shared context) to the text
of its cell. A renderer may style a cell by the column's `role` (the name, the sparkline, the status).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from gradcheck_cli.render.common import (
    count,
    display_name,
    number,
    spark_axis,
    spark_window,
    sparkline,
    spread,
    status_text,
)
from gradcheck_cli.report import Finding, Layer, Report


@dataclass(frozen=True)
class TableContext:
    """What cells need beyond their own layer: the shared histogram window, every finding."""

    window: tuple[int, int] | None
    findings: Sequence[Finding]

    @classmethod
    def of(cls, report: Report) -> TableContext:
        return cls(spark_window(report.layers), report.findings)


@dataclass(frozen=True)
class Column:
    header: Callable[[TableContext], str]
    cell: Callable[[Layer, TableContext], str]
    justify: Literal["left", "right"] = "left"
    role: Literal["name", "value", "spark", "status"] = "value"


COLUMNS = (
    Column(lambda c: "layer", lambda layer, c: display_name(layer), role="name"),
    Column(lambda c: "type", lambda layer, c: layer.type),
    Column(lambda c: "params", lambda layer, c: "tied" if layer.alias_of else count(layer.params), "right"),
    Column(lambda c: "‖g‖", lambda layer, c: number(layer.grad_norm_median), "right"),
    Column(lambda c: "spread", lambda layer, c: spread(layer.grad_norm_spread), "right"),
    Column(lambda c: "‖g‖/‖W‖", lambda layer, c: number(layer.grad_to_weight), "right"),
    Column(lambda c: "‖dL/dz‖", lambda layer, c: number(layer.output_grad_norm_median), "right"),
    Column(
        lambda c: spark_axis(c.window) or "|g| histogram",
        lambda layer, c: sparkline(layer.histogram, c.window),
        role="spark",
    ),
    Column(lambda c: "status", lambda layer, c: status_text(layer, c.findings), role="status"),
)


def in_forward_order(layers: Sequence[Layer]) -> list[Layer]:
    """Rows in the order the layers first ran; layers that never ran last."""
    return sorted(layers, key=lambda layer: (layer.forward_index is None, layer.forward_index or 0))
