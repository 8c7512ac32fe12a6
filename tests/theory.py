"""Mean-field theory of signal propagation, computed independently of gradcheck (Gauss-Hermite quadrature).

Poole et al. 2016; Schoenholz et al. 2017 ("Deep Information Propagation"): for W_ij ~ N(0, sw2/fan_in) and
b ~ N(0, sb2), the pre-activation variance follows q_l = sw2 * E[phi(sqrt(q_{l-1}) z)^2] + sb2 with fixed point
q*, and chi1 = sw2 * E[phi'(sqrt(q*) z)^2]. Backpropagated gradients scale by sqrt(chi1) per layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

Tensor = torch.Tensor


def hermite_nodes(n: int = 101) -> tuple[Tensor, Tensor]:
    """Nodes and weights for E[f(z)], z ~ N(0, 1) (Golub-Welsch on the probabilists' Hermite recurrence)."""
    k = torch.arange(1, n, dtype=torch.float64)
    jacobi = torch.diag(k.sqrt(), 1) + torch.diag(k.sqrt(), -1)
    nodes, vectors = torch.linalg.eigh(jacobi)
    weights = vectors[0] ** 2
    return nodes, weights


def gaussian_mean(f: Callable[[Tensor], Tensor], n: int = 101) -> float:
    nodes, weights = hermite_nodes(n)
    return float((weights * f(nodes)).sum())


def fixed_point(phi: Callable[[Tensor], Tensor], sw2: float, sb2: float, q0: float = 1.0, iters: int = 500) -> float:
    q = q0
    for _ in range(iters):
        q = sw2 * gaussian_mean(lambda z, q=q: phi(math.sqrt(q) * z) ** 2) + sb2
    return q


def chi1(phi: Callable[[Tensor], Tensor], dphi: Callable[[Tensor], Tensor], sw2: float, sb2: float) -> float:
    q = fixed_point(phi, sw2, sb2)
    return sw2 * gaussian_mean(lambda z: dphi(math.sqrt(q) * z) ** 2)


def tanh_chi1(sw2: float, sb2: float) -> float:
    return chi1(torch.tanh, lambda x: 1 - torch.tanh(x) ** 2, sw2, sb2)


def sigmoid_chi1(sw2: float, sb2: float) -> float:
    return chi1(torch.sigmoid, lambda x: torch.sigmoid(x) * (1 - torch.sigmoid(x)), sw2, sb2)


def relu_chi1(sw2: float) -> float:
    """ReLU: E[relu'(z)^2] = 1/2 at any q, so chi1 = sw2 / 2 (He et al. 2015)."""
    return sw2 / 2
