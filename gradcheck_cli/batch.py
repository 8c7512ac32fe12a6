"""A batch as gradcheck runs it, and the walks over the nested values (tuples, lists, dicts) that models take
and return: one place for them all."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def tensors_in(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a nested value, depth first: the tensor itself, the items of a tuple or list (a
    PackedSequence is a tuple), the values of a mapping (a model-hub ModelOutput is one)."""
    import torch

    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from tensors_in(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from tensors_in(item)


def first_tensor(value: Any) -> torch.Tensor | None:
    """The primary tensor of a module's output or input: the first tensor found, depth first."""
    return next(tensors_in(value), None)


def map_tensors(value: Any, function: Callable[[torch.Tensor], Any]) -> Any:
    """The same nesting with `function` applied to every tensor (mappings become dicts)."""
    import torch

    if isinstance(value, torch.Tensor):
        return function(value)
    if isinstance(value, Mapping):
        return {k: map_tensors(v, function) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return type(value)(map_tensors(v, function) for v in value)
    return value


@dataclass
class Batch:
    """One batch, ready to call the model with: model(*args, **kwargs); targets for the loss (or None)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    targets: Any = None

    def map(self, function: Callable[[torch.Tensor], Any]) -> Batch:
        """The batch with `function` applied to every tensor in it."""
        return Batch(
            map_tensors(self.args, function), map_tensors(self.kwargs, function), map_tensors(self.targets, function)
        )

    def to(self, device: torch.device) -> Batch:
        return self.map(lambda tensor: tensor.to(device))

    @property
    def size(self) -> int | None:
        """Examples in the batch: the first dimension of the first tensor input."""
        first = first_tensor((self.args, self.kwargs))
        return int(first.shape[0]) if first is not None and first.dim() else None
