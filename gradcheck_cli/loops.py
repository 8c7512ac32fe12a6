"""Hand-written recurrent cells: which layers looped in Python form a gated recurrence.

An LSTM or GRU written from nn.Linear layers (gates = W x + U h; i, f, g, o = gates.chunk(4); c = f * c + i * g)
decays through time by design at initialisation, as nn.LSTMCell does (diagnose/time.py): its gates sit at
sigmoid(0) = 1/2. What makes a recurrence gated is visible in its forward: a sigmoid of something the looped
layers computed multiplies another tensor elementwise, and that product is what a later call of a looped layer
reads (the state carried to the next step). A plain tanh or sigmoid RNN has no such product; a sigmoid whose
product only leaves the loop (a gated read-out) does not feed the recurrence. GateWatch follows which looped
layers each tensor of one replayed forward derives from (a TorchFunctionMode: every torch call, however the
model spells it), so the rule holds whatever the cell's names or its chunking.
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

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        inputs = [tags for tags in map(self._of, tensors_in((args, kwargs))) if tags[0] or tags[1]]
        if not inputs:
            return result  # nothing a looped layer computed: the common case, kept cheap
        sources = frozenset().union(*(tags for tags, _, _ in inputs))
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

    def input(self, tensor: torch.Tensor) -> None:
        """A looped layer's call reads `tensor`: the gates behind it are a gated recurrence."""
        self.gated |= self._of(tensor)[1]

    def _of(self, tensor: torch.Tensor) -> tuple[Tags, Tags, bool]:
        entry = self._tags.get(id(tensor))
        if entry is None or entry[0]() is not tensor:
            return NONE, NONE, False
        return entry[1], entry[2], entry[3]

    def _tag(self, tensor: torch.Tensor, sources: Tags, behind: Tags, gate: bool) -> None:
        if sources or behind:
            self._tags[id(tensor)] = (weakref.ref(tensor), sources, behind, gate)
