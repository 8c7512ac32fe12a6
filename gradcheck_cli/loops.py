"""Hand-written recurrent cells: which layers looped in Python form a gated recurrence.

An LSTM or GRU written from nn.Linear layers (gates = W x + U h; i, f, g, o = gates.chunk(4); c = f * c + i * g)
decays through time by design at initialisation, as nn.LSTMCell does (diagnose/time.py): its gates sit at
sigmoid(0) = 1/2. What makes a recurrence gated is visible in its forward: a sigmoid of something the looped
layers computed multiplies another tensor elementwise, and that product is what a later call of a looped layer
reads (the state carried to the next step). A plain tanh or sigmoid RNN has no such product; a sigmoid whose
product only leaves the loop (a gated read-out) does not feed the recurrence. GateWatch follows which looped
layers each tensor of one replayed forward derives from (a TorchFunctionMode: every torch call, however the
model spells it), so the rule holds whatever the cell's names or its chunking.

The same watch tells a recurrence over time from weight sharing across depth. A layer called many times in one
forward is a time loop when its calls read the sequence step by step: each call, or an operation joining its
result, takes a tensor derived from the batch that no looped layer computed (x[:, t], one slice per step). A
block applied again and again to its own result (ALBERT's one shared layer, CoaT's shared position encoders,
an iterated refinement) reads the batch once, before its first call: its calls are depth, and its layers'
per-call norms are judged together as one block (diagnose/time.py), not one layer at a time through time.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from gradcheck_cli.batch import tensors_in

Tags = frozenset[str]
NONE: Tags = frozenset()
SIGMOIDS = {torch.sigmoid, torch.Tensor.sigmoid, torch.nn.functional.sigmoid, torch.special.expit}
PRODUCTS = {torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__, torch.addcmul}


class GateWatch(TorchFunctionMode):
    """Inside the mode: which looped layers feed a sigmoid whose elementwise product a looped layer reads."""

    def __init__(self) -> None:
        super().__init__()
        self.gated: set[str] = set()
        # id(tensor) -> (a weak reference to it, the looped layers it derives from, those behind a gate product)
        self._tags: dict[int, tuple[weakref.ref[torch.Tensor], Tags, Tags, bool]] = {}
        # tensors derived from the batch that no looped layer computed: id(tensor) -> a weak reference to it
        self._batch: dict[int, weakref.ref[torch.Tensor]] = {}
        # looped layer -> the distinct batch-derived tensors its calls (or operations on its results) read
        self.fresh: dict[str, set[tuple[int, tuple[int, ...], tuple[int, ...]]]] = {}

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        given = list(tensors_in((args, kwargs)))
        inputs = [tags for tags in map(self._of, given) if tags[0] or tags[1]]
        from_batch = [tensor for tensor in given if self._from_batch(tensor)]
        if not inputs:
            if from_batch:  # the batch, not yet through a looped layer: what a time loop reads step by step
                for tensor in tensors_in(result):
                    self._batch[id(tensor)] = weakref.ref(tensor)
            return result  # nothing a looped layer computed: the common case, kept cheap
        sources = frozenset().union(*(tags for tags, _, _ in inputs))
        for name in sources:
            self._read(name, from_batch)
        behind = frozenset().union(*(products for _, products, _ in inputs))
        if func in PRODUCTS:
            # an elementwise product with a gate (a sigmoid of looped layers' outputs) as one of its factors
            behind = behind.union(*(tags for tags, _, gate in inputs if gate))
        gate = func in SIGMOIDS and bool(sources)
        for tensor in tensors_in(result):
            self._tag(tensor, sources, behind, gate)
        return result

    def output(self, name: str, tensor: torch.Tensor) -> None:
        """A looped layer's call returned `tensor`."""
        tags, behind, _ = self._of(tensor)
        self._tag(tensor, tags | {name}, behind, False)

    def owns(self, name: str, tensors: Iterable[torch.Tensor]) -> None:
        """A looped layer's own parameters: what derives from them inside its call is that layer's too, so a cell
        written as one module (`gates = x @ self.W_ih + h @ self.W_hh`, the gating in its own forward, the state
        returned) is seen as one built from nn.Linear layers is."""
        for tensor in tensors:
            self._tag(tensor, frozenset((name,)), NONE, False)

    def input(self, tensor: torch.Tensor, name: str | None = None) -> None:
        """A looped layer's call reads `tensor`: the gates behind it are a gated recurrence."""
        self.gated |= self._of(tensor)[1]
        if name is not None:
            self._read(name, [tensor] if self._from_batch(tensor) else [])

    def batch(self, tensors: Iterable[torch.Tensor]) -> None:
        """The tensors of the batch the replayed forward reads."""
        for tensor in tensors:
            self._batch[id(tensor)] = weakref.ref(tensor)

    def steps_read(self, name: str) -> int:
        """How many distinct batch-derived tensors the looped layer's calls read (one per step in a time loop)."""
        return len(self.fresh.get(name, ()))

    def _read(self, name: str, tensors: Iterable[torch.Tensor]) -> None:
        keys = self.fresh.setdefault(name, set())
        for tensor in tensors:
            keys.add((tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride())))

    def _from_batch(self, tensor: torch.Tensor) -> bool:
        ref = self._batch.get(id(tensor))
        return ref is not None and ref() is tensor and not self._of(tensor)[0]

    def _of(self, tensor: torch.Tensor) -> tuple[Tags, Tags, bool]:
        entry = self._tags.get(id(tensor))
        if entry is None or entry[0]() is not tensor:
            return NONE, NONE, False
        return entry[1], entry[2], entry[3]

    def _tag(self, tensor: torch.Tensor, sources: Tags, behind: Tags, gate: bool) -> None:
        if sources or behind:
            self._tags[id(tensor)] = (weakref.ref(tensor), sources, behind, gate)
