"""Put the model back as it was found: modes, .grad references, buffers and, after training steps, weights."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Restorer:
    """Snapshot of what running passes changes in a model, to put it back afterwards.

    Mode flags per module, parameter .grad references (no copies), buffer values (BatchNorm running stats
    move in train mode) and, when training steps will change them, parameter values.
    """

    model: nn.Module
    save_parameters: bool = False
    _modes: list[tuple[nn.Module, bool]] = field(default_factory=list)
    _grads: list[tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=list)
    _buffers: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    _values: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def __enter__(self) -> Restorer:
        self._modes = [(m, m.training) for m in self.model.modules()]
        params = list(_unique(self.model.parameters()))
        self._grads = [(p, p.grad) for p in params]
        self._buffers = [(b, b.detach().clone()) for b in _unique(self.model.buffers())]
        if self.save_parameters:
            self._values = [(p, p.detach().clone()) for p in params]
        return self

    def __exit__(self, *exc: object) -> None:
        with torch.no_grad():
            for param, value in self._values:
                param.copy_(value)
            for buffer, value in self._buffers:
                if buffer.shape == value.shape:
                    buffer.copy_(value)
        for param, grad in self._grads:
            param.grad = grad
        for module, training in self._modes:
            module.training = training


def _unique(tensors: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
    seen: set[int] = set()
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            yield t
