"""Matrices that no module applies (layers.LayerSpec.functional), watched through the functions they are passed to.

A network written as `h = torch.sigmoid(h @ self.W1 + self.b1)` (the 2017 tutorial's, ported from numpy), or with
its weights in an nn.ParameterList applied by F.linear, has no module per layer: forward hooks see the model's
input and output only, so no layer would have a dL/dz or a peer to compare with. While a measured forward runs,
a TorchFunctionMode sees every torch function called; when one of the matmul-like functions below gets such a
matrix (or a view of it: `W.t()`, `W.T`, `W[e]`), its call is that matrix's layer call: the other operand is the
layer's input and the result its output, measured as a module's would be (probe.Probe._forward_hook).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

if TYPE_CHECKING:
    from gradcheck_cli.layers import LayerSpec

# functions that apply a weight to an input: the kind of layer that makes, and where among the call's tensor
# arguments (in order, one level into lists; None: anywhere) the weight can be and the input is. F.linear(x, W, b)
# and F.conv2d(x, W, b) take the weight second, so a learned tensor passed as their input (Perceiver's latents)
# is not a weight; torch.addmm(b, x, W) takes a bias first; a matmul or an einsum takes the weight on either side.
_CONVS = (F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d)
_MATMULS = (
    torch.matmul,
    torch.Tensor.matmul,
    torch.Tensor.__matmul__,
    torch.Tensor.__rmatmul__,
    torch.mm,
    torch.Tensor.mm,
    torch.bmm,
    torch.Tensor.bmm,
    torch.tensordot,
)
Places = tuple[int, ...] | None
MATMULS: dict[Any, tuple[str, Places, Places]] = {
    F.linear: ("linear", (1,), (0,)),
    **dict.fromkeys(_CONVS, ("conv", (1,), (0,))),
    F.bilinear: ("linear", (2,), (0,)),
    **dict.fromkeys((torch.addmm, torch.baddbmm), ("linear", (1, 2), (1, 2))),
    **dict.fromkeys(_MATMULS, ("linear", (0, 1), (0, 1))),
    torch.einsum: ("linear", None, None),
    # grouped matmuls, one weight slice per group of rows (Hugging Face's MoE experts, `experts_implementation`
    # grouped_mm): the weight is the second argument
    **{
        function: ("linear", (1,), (0,))
        for function in (getattr(torch, "_grouped_mm", None), getattr(F, "grouped_mm", None))
        if function is not None
    },
}
# functions whose result is the same matrix seen another way (transposed, reshaped, an expert's slice)
VIEWS = frozenset(
    (
        torch.t,
        torch.Tensor.t,
        torch.transpose,
        torch.Tensor.transpose,
        torch.permute,
        torch.Tensor.permute,
        torch.Tensor.view,
        torch.reshape,
        torch.Tensor.reshape,
        torch.Tensor.contiguous,
        torch.Tensor.__getitem__,
        torch.Tensor.unsqueeze,
        torch.Tensor.squeeze,
        torch.Tensor.expand,
        torch.Tensor.to,
        torch.Tensor.T.__get__,  # type: ignore[attr-defined]
        torch.Tensor.mT.__get__,  # type: ignore[attr-defined]
    )
)

Call = Callable[[int, str, "torch.Tensor | None", torch.Tensor], None]


def watched(specs: Iterable[LayerSpec]) -> dict[int, tuple[int, torch.Tensor]]:
    """What MatmulWatch looks for: id(matrix) -> (its layer index, the matrix), for the bare-matrix layers."""
    return {id(param): (spec.index, param) for spec in specs if spec.functional for _, param in spec.params}


def owned(specs: Iterable[LayerSpec]) -> dict[int, tuple[int, torch.Tensor]]:
    """The matrices of modules of a kind no rule knows (category `other`: a hand-written `Dense` holding `self.W`,
    Mixtral's experts as one 3-D tensor), for MatmulWatch: a module that applies one as a matmul's weight is a
    weight layer (layers.category_of names kinds by class, which cannot know such a module); its own hooks
    measure it, so the watch only tells what it was applied as."""
    from gradcheck_cli.layers import is_matrix

    return {
        id(param): (spec.index, param)
        for spec in specs
        if spec.category == "other" and not spec.functional
        for _, param in spec.params
        if param.dim() >= 2 and is_matrix(param)
    }


class MatmulWatch(TorchFunctionMode):
    """Calls `on_call(layer, kind, input, output)` for every matmul-like call on a watched matrix (one watch per
    step: the views it tracks go with it)."""

    def __init__(self, weights: Mapping[int, tuple[int, torch.Tensor]], on_call: Call) -> None:
        super().__init__()
        self.weights = weights  # id(matrix) -> (its layer index, the matrix)
        self.on_call = on_call
        self._views: dict[int, tuple[weakref.ref[torch.Tensor], int]] = {}

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not isinstance(out, torch.Tensor):
            return out
        applies = MATMULS.get(func)
        if applies is None:
            # only views: rows gathered by a tensor index (`E[ids]`, an embedding lookup) are activations
            if func in VIEWS and args and isinstance(args[0], torch.Tensor) and (out is args[0] or out._is_view()):
                layer = self._layer(args[0])
                if layer is not None:
                    self._views[id(out)] = (weakref.ref(out), layer)
            return out
        kind, weights, inputs = applies
        tensors = list(_tensors(args, kwargs))
        for weight in _at(tensors, weights):
            layer = self._layer(weight)
            if layer is not None:
                given = next((t for t in _at(tensors, inputs) if t is not weight and t.dtype.is_floating_point), None)
                self.on_call(layer, kind, given, out)
                break
        return out

    def _layer(self, tensor: torch.Tensor) -> int | None:
        found = self.weights.get(id(tensor))
        if found is not None and found[1] is tensor:
            return found[0]
        seen = self._views.get(id(tensor))
        if seen is not None and seen[0]() is tensor:
            return seen[1]
        return None


def _tensors(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Iterator[torch.Tensor]:
    """The tensor arguments in order, one level into lists (einsum's operands may come as one)."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, list | tuple):
            yield from (item for item in value if isinstance(item, torch.Tensor))


def _at(tensors: list[torch.Tensor], places: Places) -> list[torch.Tensor]:
    return tensors if places is None else [tensors[i] for i in places if i < len(tensors)]
