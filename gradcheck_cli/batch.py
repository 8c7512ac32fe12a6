"""A batch as gradcheck runs it, and the walks over the nested values (tuples, lists, dicts) that models take
and return: one place for them all."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, overload

if TYPE_CHECKING:
    import torch


def tensors_in(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a nested value, depth first: the tensor itself, the items of a tuple or list (a
    PackedSequence is a tuple), the values of a mapping (a model-hub ModelOutput is one), the fields of a
    dataclass instance in their declared order (an output class of one's own)."""
    import dataclasses

    import torch

    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from tensors_in(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from tensors_in(item)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for item in dataclasses.fields(value):
            yield from tensors_in(getattr(value, item.name))


def first_tensor(value: Any) -> torch.Tensor | None:
    """The primary tensor of a module's output or input: the first tensor found, depth first."""
    import torch

    if isinstance(value, torch.Tensor):  # the usual cases first: every hook of every step asks
        return value
    if type(value) is tuple and value and isinstance(value[0], torch.Tensor):
        return value[0]
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


class Batches(Sequence[Batch]):
    """`count` batches made as the steps ask for them, in order, so memory does not grow with --steps (a list
    of 10^9 batches, even of one shared batch, is 8 GB of pointers). The first is kept: the replays and the
    batch size read it again; the others are dropped once used."""

    def __init__(self, count: int, source: Iterable[Batch]) -> None:
        self._count = count
        self._source = iter(source)
        self._first: Batch | None = None
        self._next = 0  # the index the source gives next

    def __len__(self) -> int:
        return self._count

    @overload
    def __getitem__(self, index: int) -> Batch: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[Batch]: ...
    def __getitem__(self, index: int | slice) -> Batch | Sequence[Batch]:
        if isinstance(index, slice):
            raise TypeError("Batches are made in order, one at a time: index them one by one")
        if not 0 <= index < self._count:
            raise IndexError(index)
        if self._first is None:
            self._first = self._pull()
        if index == 0:
            return self._first
        if index < self._next - 1 or (index == self._next - 1 and index):
            raise IndexError(f"batch {index} was already made and dropped (Batches are read in order)")
        while self._next < index:
            self._pull()  # a skipped batch: made, so that the ones after it are the same, and dropped
        return self._pull()

    def _pull(self) -> Batch:
        self._next += 1
        return next(self._source)

    def map(self, function: Callable[[int, Batch], Batch]) -> Batches:
        """The same batches with function(index, batch) applied to each as it is made."""
        return Batches(self._count, (function(i, self[i]) for i in range(self._count)))
