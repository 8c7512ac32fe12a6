"""Per-step numbers in typed records: what one step measured, first as device tensors, then as host floats
after the step's one transfer, and the series they add up to over the steps.

Each per-step field declares how it combines across processes under torchrun (distributed.py's policies),
so the transfer needs no list of keys: it reads the fields.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch

from gradcheck_cli.distributed import GRADIENT_MAX, GRADIENT_SUM, HOST_COUNT, LOCAL_SUM, Combiner
from gradcheck_cli.layers import LayerSpec, has_units
from gradcheck_cli.series import StepSeries

V = TypeVar("V")  # torch.Tensor on the device, float on the host


def combined(policy: str) -> Any:
    """A per-step field (None when the step did not measure it) and how it combines across processes."""
    return field(default=None, metadata={"combine": policy})


@dataclass
class ParamStep(Generic[V]):
    """One parameter's gradient in one step."""

    norm_sq: V | None = combined(GRADIENT_SUM)  # squared L2 norm: squares add up across shards and calls
    zeros: V | None = combined(GRADIENT_SUM)  # exact zeros
    max_abs: V | None = combined(GRADIENT_MAX)
    touched_weight_sq: V | None = combined(GRADIENT_SUM)  # embeddings: ||W||^2 over the rows looked up
    underflow: V | None = combined(GRADIENT_SUM)  # --amp: sampled nonzero values below the dtype's smallest normal
    sampled: V | None = combined(GRADIENT_SUM)  # how many values that count is over


@dataclass
class LayerStep(Generic[V]):
    """What the hooks measured at one layer in one step (sums over its calls)."""

    output_sq: V | None = combined(LOCAL_SUM)  # ||dL/dz||^2
    output_underflow: V | None = combined(LOCAL_SUM)  # --amp: sampled dL/dz values below the smallest normal
    input_sq: V | None = combined(LOCAL_SUM)  # sum of squares of the sampled input
    input_zero: V | None = combined(LOCAL_SUM)  # exact zeros in the sampled input
    saturated: V | None = combined(LOCAL_SUM)  # sampled sigmoid/tanh inputs beyond the saturation limit
    bounded_numel: V | None = combined(LOCAL_SUM)  # sampled inputs of functional tanh/sigmoid seen (probe)
    output_positions: float | None = combined(HOST_COUNT)  # elements per unit of dL/dz (batch x positions)
    output_sampled: float | None = combined(HOST_COUNT)
    input_numel: float | None = combined(HOST_COUNT)
    saturated_numel: float | None = combined(HOST_COUNT)


@dataclass
class Block:
    """Many records' values of one field kind, reduced together into one device vector (groups.py's small
    tensors, the tape's samples): the host step gets them as a list in columns[column], or with `keys` (whose
    each value is) as keyed[column][key]. Saves stacking thousands of 0-d tensors."""

    policy: str
    vector: torch.Tensor
    column: str
    keys: list[int] | None = None


@dataclass
class Step(Generic[V]):
    """Everything one step measured: the loss, per parameter (by ParamInfo.index), per layer (by index)."""

    loss: V = combined(LOCAL_SUM)
    params: dict[int, Any] = field(default_factory=dict)  # ParamStep[V] (watched training: TrainParamStep[V])
    layers: dict[int, LayerStep[V]] = field(default_factory=dict)
    blocks: list[Block] = field(default_factory=list)  # device side only: values given as whole vectors
    columns: dict[str, list[float]] = field(default_factory=dict)  # host side: the column blocks' values
    keyed: dict[str, dict[int, float]] = field(default_factory=dict)  # host side: keyed column blocks' values


_POLICIES = (GRADIENT_SUM, GRADIENT_MAX, LOCAL_SUM)


def transfer(step: Step[torch.Tensor], combiner: Combiner, device: torch.device) -> Step[float]:
    """The step's numbers on the host: one stacked vector per combining policy, combined across processes,
    copied with one transfer (the step's single host synchronisation)."""
    host: Step[float] = Step(
        loss=0.0,
        params={i: _blank(type(record)) for i, record in step.params.items()},  # ParamStep, watch.TrainParamStep
        layers={i: _blank(LayerStep) for i in step.layers},
    )
    pairs: list[tuple[Any, Any]] = [(step, host)]
    pairs += [(record, host.params[i]) for i, record in step.params.items()]
    pairs += [(record, host.layers[i]) for i, record in step.layers.items()]
    slots: dict[str, list[tuple[Any, str, torch.Tensor]]] = {policy: [] for policy in _POLICIES}
    for record, target in pairs:
        kind: type = type(record)
        for name, policy in _combined_fields(kind):
            value = getattr(record, name)
            if value is None:
                continue
            if policy == HOST_COUNT:
                if not combiner.active:
                    setattr(target, name, float(value))
                    continue
                # Counts kept on the host differ per rank too: sum them with the rest.
                policy, value = LOCAL_SUM, torch.tensor(float(value), device=device)
            slots[policy].append((target, name, value.detach()))
    vectors: list[torch.Tensor] = []
    places: list[tuple[tuple[Any, str], int]] = []  # (record, field) and where its value is
    columns: list[tuple[str, int, int, list[int] | None]] = []  # (name, first value, count, keys)
    at = 0
    for policy in _POLICIES:
        vector, placed = _stacked(slots[policy], device)
        places += [(place, at + i) for i, place in enumerate(placed)]
        at += len(placed)
        blocks = [block for block in step.blocks if block.policy == policy]
        vectors.append(torch.cat([vector, *(b.vector.detach().to(torch.float64) for b in blocks)]))
        for block in blocks:
            columns.append((block.column, at, block.vector.numel(), block.keys))
            at += block.vector.numel()
    combiner(*vectors)
    values = torch.cat(vectors).tolist()
    for (target, name), index in places:
        setattr(target, name, values[index])
    for name, start, count, keys in columns:
        if keys is None:
            host.columns[name] = values[start : start + count]
        else:
            host.keyed[name] = dict(zip(keys, values[start : start + count], strict=True))
    return host


@functools.cache
def _combined_fields(cls: type) -> tuple[tuple[str, str], ...]:
    """A record type's per-step fields and their policies (read once per type: a step has thousands of records)."""
    found = ((item.name, item.metadata.get("combine")) for item in dataclasses.fields(cls))
    return tuple((name, policy) for name, policy in found if policy is not None)


@functools.cache
def _defaults(cls: type) -> dict[str, Any] | None:
    """The field defaults of a record type whose fields all have plain defaults, else None."""
    items = dataclasses.fields(cls)
    if any(item.default is dataclasses.MISSING for item in items):
        return None
    return {item.name: item.default for item in items}


def _blank(cls: type) -> Any:
    """A record with every field at its default, built without running __init__ (thousands per step)."""
    defaults = _defaults(cls)
    if defaults is None:
        return cls()
    record: Any = object.__new__(cls)
    record.__dict__.update(defaults)
    return record


def _stacked(
    slots: list[tuple[Any, str, torch.Tensor]], device: torch.device
) -> tuple[torch.Tensor, list[tuple[Any, str]]]:
    """One float64 vector of 0-d values, stacked a dtype at a time (a per-value cast costs more in dispatch
    than the whole stack), and where each value goes, in the vector's order. float64: a squared norm of
    1e19-sized gradients (a diverging run) overflows float32."""
    groups: dict[torch.dtype, list[tuple[Any, str, torch.Tensor]]] = {}
    for slot in slots:
        groups.setdefault(slot[2].dtype, []).append(slot)
    parts = [
        torch.stack([v if v.dim() == 0 else v.reshape(()) for _, _, v in group]).to(torch.float64)
        for group in groups.values()
    ]
    places = [(target, name) for group in groups.values() for target, name, _ in group]
    return (torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64, device=device)), places


# -- over the steps -----------------------------------------------------------------------------------------


@dataclass
class ParamInfo:
    """A unique tensor of the model and what the statistics need to know about it."""

    index: int
    name: str
    tensor: torch.Tensor
    layers: tuple[int, ...]  # indices of the layers owning it
    rows: bool  # track which rows (dim 0) ever get a gradient
    embedding: bool  # owned by an Embedding: compare gradients with the rows looked up only


@dataclass
class ParamSeries:
    norm: StepSeries = field(default_factory=StepSeries)
    max_abs: StepSeries = field(default_factory=StepSeries)
    zeros: StepSeries = field(default_factory=StepSeries)
    nonfinite: StepSeries = field(default_factory=StepSeries)
    touched_weight_sq: StepSeries = field(default_factory=StepSeries)
    underflow: StepSeries = field(default_factory=StepSeries)


@dataclass
class LayerSeries:
    output_sq: StepSeries = field(default_factory=StepSeries)
    output_per_position: StepSeries = field(default_factory=StepSeries)
    output_underflow: StepSeries = field(default_factory=StepSeries)
    output_positions: StepSeries = field(default_factory=StepSeries)
    calls: StepSeries = field(default_factory=StepSeries)
    input_rms: StepSeries = field(default_factory=StepSeries)
    input_zero: StepSeries = field(default_factory=StepSeries)
    saturated: StepSeries = field(default_factory=StepSeries)


def unique_params(layers: list[LayerSpec]) -> list[ParamInfo]:
    """Every tensor the layers own, once (tied weights are one tensor owned by several layers)."""
    owners: dict[int, list[int]] = {}
    tensors: dict[int, tuple[str, torch.Tensor]] = {}  # id -> (qualified name, tensor)
    for spec in layers:
        for name, param in spec.params:
            owners.setdefault(id(param), []).append(spec.index)
            tensors.setdefault(id(param), (name, param))
    params: list[ParamInfo] = []
    for key, (name, tensor) in tensors.items():
        owning = tuple(owners[key])
        embedding = any(layers[i].category == "embedding" for i in owning)
        rows = tensor.dim() >= 2 and any(has_units(layers[i]) for i in owning)
        params.append(ParamInfo(len(params), name, tensor, owning, rows or embedding, embedding))
    return params
