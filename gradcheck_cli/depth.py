"""Each layer's depth in the graph: how many layers the gradient passes through between it and the input.

The signal view fits how ||dL/dz|| changes per layer of depth. The order of forward calls is that depth only in
a chain: the experts of a mixture of experts, Inception's branches, two towers or an ensemble's members run
one after another but side by side in the graph, so counting them in call order makes a 4-layer-deep MoE with
8 two-layer experts look 19 layers deep, and compounds a per-layer gain over 18 steps that no gradient takes.
GraphDepth reads the depth off the autograd graph of the first measured forward (no extra forward): a layer's
depth is one more than that of the deepest counted layer whose output its inputs derive from, over any path of
autograd nodes. A layer called several times (a shared encoder, a cell looped in Python) keeps the depth of its
first call, as its forward_index does.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from gradcheck_cli.batch import tensors_in

Node = Any  # torch.autograd.graph.Node: grad_fn objects, hashable by identity


class GraphDepth:
    """Depths of the layers called while it watches (called() from each layer's forward hook)."""

    def __init__(self, counted: Iterable[str]) -> None:
        self.counted = set(counted)  # layers that are one step of depth (the signal view's categories)
        self.depth: dict[str, int] = {}
        self._tagged: dict[Node, int] = {}  # a layer's output node -> that layer's depth
        self._behind: dict[Node, int] = {}  # node -> depth of the deepest tagged node behind it (memo)

    def called(self, name: str, args: object, output: object) -> None:
        """The layer `name` read `args` and returned `output`."""
        try:
            depth = self.depth.get(name)
            if depth is None:
                below = max((self._deepest(t.grad_fn) for t in tensors_in(args) if t.grad_fn is not None), default=0)
                depth = below + (name in self.counted)
                self.depth[name] = depth
            for tensor in tensors_in(output):
                node = tensor.grad_fn
                if node is not None:
                    self._tagged[node] = max(depth, self._tagged.get(node, 0))
        except (RuntimeError, TypeError, AttributeError):  # a node type that cannot be walked: no depth for it,
            pass  # and the signal view falls back to the call order; the watch never breaks the model's forward

    def release(self) -> None:
        """Drop the references to the graph's nodes (the depths stay)."""
        self._tagged.clear()
        self._behind.clear()

    def _deepest(self, root: Node) -> int:
        """The deepest tagged node at or behind `root`: an iterative post-order walk (graphs of thousands of
        layers or time steps are deeper than Python's recursion limit), each node visited once per run."""
        stack: list[tuple[Node, bool]] = [(root, False)]
        while stack:
            node, expanded = stack.pop()
            if node in self._tagged or node in self._behind:
                continue
            parents = [parent for parent, _ in node.next_functions if parent is not None]
            if expanded:
                self._behind[node] = max((self._value(parent) for parent in parents), default=0)
                continue
            stack.append((node, True))
            stack.extend((parent, False) for parent in parents if parent not in self._behind)
        return self._value(root)

    def _value(self, node: Node) -> int:
        tagged = self._tagged.get(node)
        return tagged if tagged is not None else self._behind.get(node, 0)
