"""Small per-channel scales (LayerScale, CaiT's, RDNet's dense blocks): one replay with them set to 1.

A per-channel scale initialised at 1e-6 multiplies everything on its branch by 1e-6 by design, and it learns
fast (its own gradient is not small), so what it slows at initialisation is not a lasting fault. Two records
can be read as one when it is not known: a weight layer whose ||g||/||W|| sits orders of magnitude below the
network's (the branch behind the scale), and a layer whose units get no usable gradient because what they read
is such a branch's output (a depthwise conv reads each channel alone: RDNet's dense blocks append features
scaled by 1e-6, and every unit reading one of them is starved). Setting the scales to 1 in one replay of the
first batch tells whether they explain it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gradcheck_cli.distributed import local
from gradcheck_cli.layers import LayerSpec, is_matrix
from gradcheck_cli.passes import Passes, Setup, clear_grads
from gradcheck_cli.reduce import STARVED_UNIT
from gradcheck_cli.report import Layer
from gradcheck_cli.restore import Restorer

# A per-channel scale this small gates its branch (LayerScale's 1e-6 to 1e-4, CaiT's 1e-5): far below a
# norm's gamma (1), so what flows through it is attenuated by its size and the layers behind it learn that
# much slower at init, by design; opened, it reads 1, a branch without LayerScale.
SMALL_SCALE = 1e-3


def open_scales(setup: Setup, layers: Sequence[Layer], role_error: float, dead_warning: float) -> set[str]:
    """Weight layers that read slow or starved only because small per-channel scales (SMALL_SCALE) gate their
    path, checked in one replay of the first batch with every such scale set to 1:
    - slow: ||g||/||W|| more than role_error below the network median (EdgeNeXt's attention branch sits behind
      two LayerScales, 1e-12 at init); opened, within role_error of the (then) median;
    - starved: at least dead_warning of its units below STARVED_UNIT of its typical unit (records'
      zero_grad_unit_fraction, the dead-unit rule where no ReLU module says); opened, fewer than that."""
    from gradcheck_cli.diagnose.update import comparison_sets
    from gradcheck_cli.series import median

    compared, dense = comparison_sets(layers, measured=False)  # the update view's: ||g||/||W||, its median
    members = {layer.name: layer for layer in compared}
    reference = median([layer.grad_to_weight for layer in dense]) or 0.0
    slow = [name for name, layer in members.items() if (layer.grad_to_weight or 0.0) * role_error < reference]
    starved = {
        layer.name
        for layer in layers
        if layer.dead_fraction is None and (layer.zero_grad_unit_fraction or 0.0) >= dead_warning
    }
    scales = _small_scales(setup) if slow or starved else []
    if not scales:
        return set()
    specs = {spec.name: spec for spec in setup.layers if spec.name in members or spec.name in starved}
    ratios, fractions = _replay_opened(setup, scales, specs, starved)
    opened = median([ratios[layer.name] for layer in dense if layer.name in ratios]) or 0.0
    behind = {name for name in slow if ratios.get(name, 0.0) * role_error >= opened > 0}
    return behind | {name for name in starved if fractions.get(name, 1.0) < dead_warning}


def _small_scales(setup: Setup) -> list[torch.Tensor]:
    candidates = [p for p in setup.model.parameters() if p.requires_grad and not is_matrix(p) and p.numel()]
    if not candidates:
        return []
    largest = torch.stack([p.detach().abs().max().float() for p in candidates]).tolist()  # one host read
    return [p for p, value in zip(candidates, largest, strict=True) if 0 < value <= SMALL_SCALE]


def _replay_opened(
    setup: Setup, scales: Sequence[torch.Tensor], specs: dict[str, LayerSpec], starved: set[str]
) -> tuple[dict[str, float], dict[str, float]]:
    """With `scales` set to 1, one forward and backward of the first batch: each layer's ||g||/||W|| over its
    matrices, and for the `starved` ones the fraction of units (rows of the first matrix) still starved."""
    passes = Passes(setup.runner, setup.loss, setup.device, setup.amp_dtype)
    with Restorer(setup.model, save_parameters=True):
        with torch.no_grad():
            for scale in scales:
                scale.fill_(1.0)
        clear_grads(setup.model)
        passes.forward_backward(setup.batches[0].to(setup.device))
        zero = torch.zeros((), device=setup.device)
        values = []  # per layer: its weights' ||g||^2 and ||W||^2, and a starved layer's fraction, read at once
        for name, spec in specs.items():
            weights = [p for _, p in spec.params if p.requires_grad and is_matrix(p)]
            values.append(sum((local(p.grad).float().square().sum() for p in weights if p.grad is not None), zero))
            values.append(sum((local(p.detach()).float().square().sum() for p in weights), zero))
            grad = weights[0].grad if weights else None
            values.append(_starved_rows(local(grad)) if name in starved and grad is not None else zero + 1.0)
        read = torch.stack(values).tolist() if values else []
        clear_grads(setup.model)
    ratios = {
        name: (grad / norm) ** 0.5 / passes.scale if norm else 0.0
        for name, grad, norm in zip(specs, read[::3], read[1::3], strict=True)
    }
    return ratios, dict(zip(specs, read[2::3], strict=True))


def _starved_rows(grad: torch.Tensor) -> torch.Tensor:
    """The fraction of rows at most STARVED_UNIT x the RMS row (reduce.reduce_gradient's rule)."""
    rows = torch.linalg.vector_norm(grad.reshape(grad.shape[0], -1).float(), dim=1)
    floor = rows.square().mean().sqrt() * STARVED_UNIT
    fraction: torch.Tensor = (rows <= floor).float().mean()
    return fraction
