"""Records: what the collector measured over the steps -> the report's Layer and ParameterRecord.

Host-side arithmetic only (norms of several tensors combined, medians, ratios); the device work and its one
final transfer happen in collect.Collector.finish.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from gradcheck_cli.layers import LayerSpec, is_matrix, layout, type_name
from gradcheck_cli.report import Layer, ParameterRecord, ValueHistogram
from gradcheck_cli.series import StepSeries, mean, safe_ratio
from gradcheck_cli.steps import LayerSeries, ParamInfo, ParamSeries


@dataclass(frozen=True)
class Measured:
    """The per-step series over the whole run."""

    layers: list[LayerSpec]
    params: list[ParamInfo]
    param_series: list[ParamSeries]
    layer_series: list[LayerSeries]
    weight_norm: list[float]
    steps: int


@dataclass(frozen=True)
class Finished:
    """What the final transfer brought back, by parameter or layer index."""

    zero_rows: dict[int, float]  # fraction of rows (units) that never got a gradient
    dead: dict[int, float]  # fraction of ReLU units fed by the layer that never activated
    histograms: dict[int, list[int]]  # |g| counts in the fixed bins
    position: dict[int, int]  # order of first forward call
    feeds_norm: set[int]  # layers whose output goes straight into a normalisation layer
    value_histograms: dict[int, tuple[ValueHistogram, ...]]
    units: dict[int, int] = dataclasses.field(default_factory=dict)  # layer: ReLU units behind `dead`
    rows: dict[int, int] = dataclasses.field(default_factory=dict)  # parameter: rows behind `zero_rows`
    used_as: dict[int, str] = dataclasses.field(default_factory=dict)  # functional.py: what a matrix was applied as


def _applied_as(spec: LayerSpec, finished: Finished, layer: Layer) -> Layer:
    """A matrix no module applies (LayerSpec.functional) is the layer it was applied as (linear or conv), and so
    is a module of a kind no rule knows that applied its own matrix as a matmul's weight (functional.owned); one
    never seen in a matmul-like call (a positional embedding added to the input) stays `other`."""
    category = finished.used_as.get(spec.index, spec.category)
    if spec.functional:
        return dataclasses.replace(layer, type="Parameter", category=category)
    return layer if category == spec.category else dataclasses.replace(layer, category=category)


def build_records(measured: Measured, finished: Finished) -> tuple[list[Layer], list[ParameterRecord]]:
    params = [_param_record(measured, info) for info in measured.params]
    owning: dict[int, list[ParamInfo]] = {}  # layer index -> its tensors, in parameter order (one pass, not n x m)
    for info in measured.params:
        for index in dict.fromkeys(info.layers):
            owning.setdefault(index, []).append(info)
    layers = [
        _applied_as(
            spec,
            finished,
            dataclasses.replace(
                _layer_record(measured, finished, spec, params, owning.get(spec.index, [])),
                feeds_norm=spec.index in finished.feeds_norm,
                value_histograms=finished.value_histograms.get(spec.index),
            ),
        )
        for spec in measured.layers
    ]
    return layers, params


def _param_record(measured: Measured, info: ParamInfo) -> ParameterRecord:
    series = measured.param_series[info.index]
    tensor = info.tensor
    numel = tensor.numel()
    weight_norm = measured.weight_norm[info.index]
    grad_norm = series.norm.mean()
    zeros = series.zeros.mean()
    return ParameterRecord(
        name=info.name,
        shape=tuple(tensor.shape),
        requires_grad=bool(tensor.requires_grad),
        numel=numel,
        layers=tuple(measured.layers[i].name for i in info.layers),
        grad_norm=grad_norm,
        grad_norm_steps=series.norm.as_tuple(),
        weight_norm=weight_norm,
        grad_to_weight=safe_ratio(grad_norm, weight_norm),
        rms=grad_norm / math.sqrt(numel) if grad_norm is not None and numel else None,
        max_abs=series.max_abs.max(),
        zero_fraction=zeros / numel if zeros is not None and numel else None,
        nonfinite=int(sum(series.nonfinite.present())),
    )


def _layer_record(
    measured: Measured, finished: Finished, spec: LayerSpec, params: list[ParameterRecord], mine: list[ParamInfo]
) -> Layer:
    """One layer's record: its trainable tensors' numbers combined, and what its hooks measured."""
    owned = [info for info in mine if info.layers[0] == spec.index]  # a tied tensor counts under its first owner
    alias_of = measured.layers[mine[0].layers[0]].name if mine and not owned else None
    trainable = [info for info in mine if info.tensor.requires_grad]
    matrices = [info for info in trainable if is_matrix(info.tensor)]
    weights = matrices or trainable
    grad_steps: list[float | None] = []
    ratio_steps: list[float | None] = []
    for step in range(measured.steps):
        norms = [measured.param_series[i.index].norm.values[step] for i in trainable]
        got = [n for n in norms if n is not None]
        grad_steps.append(math.sqrt(sum(n * n for n in got)) if got else None)
        ratio_steps.append(_ratio(measured, weights, step, spec.category == "embedding"))
    grad = StepSeries(grad_steps)
    ratio = StepSeries(ratio_steps)
    layer_series = measured.layer_series[spec.index]
    output = StepSeries([math.sqrt(v) if v is not None else None for v in layer_series.output_sq.values])
    numel = sum(info.tensor.numel() for info in trainable)
    grad_norm = grad.mean()
    zeros = [params[i.index].zero_fraction for i in trainable]
    zero_counts = [z * i.tensor.numel() for z, i in zip(zeros, trainable, strict=True) if z is not None]
    maxes = [m for m in (params[i.index].max_abs for i in trainable) if m is not None]
    unit_source = next((i for i in trainable if i.rows and not i.embedding), None)
    histogram = None
    for info in trainable:
        counts = finished.histograms.get(info.index)
        if counts is not None:
            histogram = counts if histogram is None else [a + b for a, b in zip(histogram, counts, strict=True)]
    return Layer(
        name=spec.name,
        type=type_name(spec.module),
        layout=layout(spec.module),
        category=spec.category,
        params=sum(info.tensor.numel() for info in owned),
        trainable_params=numel,
        parameters=tuple(info.name for info in mine),
        calls=layer_series.calls.median() or 0.0,
        forward_index=finished.position.get(spec.index),
        grad_norm=grad_norm,
        grad_norm_median=grad.median(),
        grad_norm_steps=grad.as_tuple(),
        weight_norm=math.sqrt(sum(measured.weight_norm[i.index] ** 2 for i in mine)),
        grad_to_weight=ratio.median(),
        grad_to_weight_steps=ratio.as_tuple(),
        output_grad_norm=output.mean(),
        output_grad_norm_median=output.median(),
        output_grad_norm_steps=output.as_tuple(),
        output_grad_per_position=layer_series.output_per_position.median(),
        output_grad_per_position_steps=layer_series.output_per_position.as_tuple(),
        grad_norm_spread=grad.spread(),
        output_grad_spread=output.spread(),
        rms=grad_norm / math.sqrt(numel) if grad_norm is not None and numel else None,
        max_abs=max(maxes) if maxes else None,
        zero_fraction=sum(zero_counts) / numel if zero_counts and numel else None,
        nonfinite=sum(params[i.index].nonfinite for i in trainable),
        input_rms=layer_series.input_rms.median(),
        input_zero_fraction=layer_series.input_zero.median(),
        dead_fraction=finished.dead.get(spec.index),
        saturated_fraction=layer_series.saturated.median(),
        zero_grad_unit_fraction=finished.zero_rows.get(unit_source.index) if unit_source is not None else None,
        units=finished.units.get(spec.index, finished.rows.get(unit_source.index) if unit_source is not None else None),
        histogram=tuple(histogram) if histogram is not None else None,
        underflow_fraction=mean(measured.param_series[i.index].underflow.median() for i in trainable),
        output_grad_underflow_fraction=layer_series.output_underflow.median(),
        # its own parameters only: a tied matrix is its first owner's one verdict (Funnel's head adds its own
        # bias to the word embeddings' table, which is judged as the embedding it first is)
        scale_only=bool(trainable) and not {info.index for info in matrices} & {info.index for info in owned},
        alias_of=alias_of,
        output_positions=layer_series.output_positions.median(),
    )


def _ratio(measured: Measured, weights: list[ParamInfo], step: int, embedding: bool) -> float | None:
    """||g|| / ||W|| over the layer's weight tensors in one step; embeddings over the rows looked up."""
    grad_sq = 0.0
    weight_sq = 0.0
    seen = False
    for info in weights:
        series = measured.param_series[info.index]
        norm = series.norm.values[step]
        if norm is None:
            continue
        seen = True
        grad_sq += norm * norm
        touched = series.touched_weight_sq.values[step] if embedding and info.embedding else None
        weight_sq += touched if touched is not None else measured.weight_norm[info.index] ** 2
    if not seen or weight_sq <= 0:
        return None
    return math.sqrt(grad_sq) / math.sqrt(weight_sq)
