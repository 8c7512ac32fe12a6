"""Per-step numbers in typed records: what one step measured, first as device tensors, then as host floats
after the step's one transfer, and the series they add up to over the steps.

Each per-step field declares how it combines across processes under torchrun (distributed.py's policies),
so the transfer needs no list of keys: it reads the fields.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch

from gradcheck_cli.distributed import GRADIENT_MAX, GRADIENT_SUM, HOST_COUNT, LOCAL_SUM, Combiner
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
class Step(Generic[V]):
    """Everything one step measured: the loss, per parameter (by ParamInfo.index), per layer (by index)."""

    loss: V = combined(LOCAL_SUM)
    params: dict[int, Any] = field(default_factory=dict)  # ParamStep[V] (watched training: TrainParamStep[V])
    layers: dict[int, LayerStep[V]] = field(default_factory=dict)


_POLICIES = (GRADIENT_SUM, GRADIENT_MAX, LOCAL_SUM)


def transfer(step: Step[torch.Tensor], combiner: Combiner, device: torch.device) -> Step[float]:
    """The step's numbers on the host: one stacked vector per combining policy, combined across processes,
    copied with one transfer (the step's single host synchronisation)."""
    host: Step[float] = Step(
        loss=0.0,
        params={i: type(record)() for i, record in step.params.items()},  # ParamStep, or watch.TrainParamStep
        layers={i: LayerStep() for i in step.layers},
    )
    pairs: list[tuple[Any, Any]] = [(step, host)]
    pairs += [(record, host.params[i]) for i, record in step.params.items()]
    pairs += [(record, host.layers[i]) for i, record in step.layers.items()]
    slots: dict[str, list[tuple[Any, str, torch.Tensor]]] = {policy: [] for policy in _POLICIES}
    for record, target in pairs:
        for item in dataclasses.fields(record):
            policy, value = item.metadata.get("combine"), getattr(record, item.name)
            if policy is None or value is None:
                continue
            if policy == HOST_COUNT:
                if not combiner.active:
                    setattr(target, item.name, float(value))
                    continue
                # Counts kept on the host differ per rank too: sum them with the rest.
                policy, value = LOCAL_SUM, torch.tensor(float(value), device=device)
            # float64: a squared norm of 1e19-sized gradients (a diverging run) overflows float32
            slots[policy].append((target, item.name, value.detach().to(torch.float64).reshape(())))
    vectors = [
        torch.stack([v for _, _, v in slots[p]]) if slots[p] else torch.zeros(0, device=device) for p in _POLICIES
    ]
    combiner(*vectors)
    values = torch.cat(vectors).tolist()
    places = [(target, name) for p in _POLICIES for target, name, _ in slots[p]]
    for (target, name), value in zip(places, values, strict=True):
        setattr(target, name, value)
    return host


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
