"""Which scalar to differentiate: --loss auto|cross-entropy|mse|FILE.py:FN, or a callable from the API.

auto, in order: the output's own `.loss` / `["loss"]` (model-hub models compute it when given labels); the model
file's `loss_fn(output, targets)`; cross-entropy for integer targets, mean squared error for float targets; and,
with no targets at all, a fixed random projection of the output.

Why a random projection: with no targets there is no loss, but the backward pass needs some scalar. Summing the
output would send the same all-ones gradient down every example, a direction that normalisation layers and
softmax remove exactly (their Jacobians annihilate constants), so layers behind them would look dead. A
Gaussian direction R, fixed by the seed, has no such blind spot: dL/dy = R / batch, so the backward pass
measures the network's Jacobian itself, at the same 1/batch scale as a mean-reduced loss.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from gradcheck_cli.batch import Batch, first_tensor
from gradcheck_cli.errors import UserError

LossFunction = Callable[[Any, Any], torch.Tensor]


def model_output_loss(output: Any) -> torch.Tensor | None:
    """The loss a model returned itself: `output.loss`, `output["loss"]`, or the one scalar tensor that
    requires grad in a returned tuple (nanoGPT-style `return logits, loss`)."""
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, Mapping):
        loss = output.get("loss")
    if loss is None and isinstance(output, tuple | list):
        scalars = [v for v in output if isinstance(v, torch.Tensor) and v.dim() == 0 and v.requires_grad]
        loss = scalars[0] if len(scalars) == 1 else None
    return loss if isinstance(loss, torch.Tensor) else None


def prediction(output: Any) -> torch.Tensor:
    """The tensor a loss compares with targets: `logits` of a model-hub output, else the first tensor."""
    if isinstance(output, Mapping):
        logits_entry = output.get("logits")
        if isinstance(logits_entry, torch.Tensor):
            return logits_entry
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    found = first_tensor(output)
    if found is None:
        raise UserError(
            f"the model's forward returned a {type(output).__name__} with no tensor in it",
            "return the output tensor (or a tuple/dict holding it)",
        )
    if not found.dtype.is_floating_point and not found.dtype.is_complex:
        raise UserError(
            f"the model's output is a {found.dtype} tensor, which has no gradient",
            "return float outputs (logits, not argmax ids)",
        )
    return found


def cross_entropy(output: Any, targets: torch.Tensor) -> torch.Tensor:
    """F.cross_entropy, with sequence outputs (B, T, C) against (B, T) ids flattened as language models do."""
    logits = prediction(output)
    if targets.dtype.is_floating_point and targets.shape == logits.shape:
        return F.cross_entropy(logits.float(), targets.float())  # class probabilities
    if targets.dtype.is_floating_point:
        raise UserError(
            f"cross-entropy needs integer class ids, but targets are {targets.dtype} {tuple(targets.shape)}",
            "use --loss mse for float targets, or give class ids",
        )
    if logits.dim() == targets.dim() + 1 and logits.shape[:-1] == targets.shape and logits.dim() > 2:
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1).long())
    if (
        logits.dim() == targets.dim() + 1
        and logits.shape[0] == targets.shape[0]
        and (logits.shape[2:] == targets.shape[1:])
    ):
        return F.cross_entropy(logits.float(), targets.long())
    raise UserError(
        f"cross-entropy cannot match output {tuple(logits.shape)} with targets {tuple(targets.shape)}",
        "targets must be class ids shaped like the output without its class dimension",
    )


def mse(output: Any, targets: torch.Tensor) -> torch.Tensor:
    """Mean squared error; targets with the same number of elements are reshaped to the output's shape."""
    values = prediction(output)
    if targets.shape != values.shape:
        if targets.numel() != values.numel():
            raise UserError(
                f"mse cannot compare output {tuple(values.shape)} with targets {tuple(targets.shape)}",
                "targets must have the output's shape",
            )
        targets = targets.reshape(values.shape)
    return F.mse_loss(values.float(), targets.to(values.device).float())


@dataclass
class RandomProjection:
    """L = sum(R * y) / batch with R ~ N(0, 1/n), n = values per example; R fixed per output shape by the seed.

    Under torchrun each rank holds a slice of the global batch: R is drawn for the global batch and sliced, so
    the ranks together project exactly as one process would.
    """

    seed: int
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        self._directions: dict[tuple[tuple[int, ...], torch.device], torch.Tensor] = {}

    def __call__(self, output: Any, targets: Any) -> torch.Tensor:
        values = prediction(output)
        key = (tuple(values.shape), values.device)
        direction = self._directions.get(key)
        if direction is None:
            direction = _global_slice(
                lambda shape, g: torch.randn(shape, generator=g),
                tuple(values.shape),
                self.seed,
                self.rank,
                self.world_size,
            )
            per_example = max(1, values[0].numel() if values.dim() else 1)
            direction = (direction / per_example**0.5).to(values.device)  # cached on the device: no copy per step
            self._directions[key] = direction
        batch = values.shape[0] if values.dim() else 1
        return (values.float() * direction).sum() / batch


def _global_slice(
    draw: Callable[[tuple[int, ...], torch.Generator], torch.Tensor],
    shape: tuple[int, ...],
    seed: int,
    rank: int,
    world_size: int,
) -> torch.Tensor:
    """Draw for the global batch (world_size slices of shape[0]) and keep this rank's slice."""
    generator = torch.Generator().manual_seed(seed)
    if world_size == 1 or not shape:
        return draw(shape, generator)
    whole = draw((shape[0] * world_size, *shape[1:]), generator)
    return whole[rank * shape[0] : (rank + 1) * shape[0]]


@dataclass
class LossChoice:
    """The loss in use and how to compute it from (output, batch)."""

    name: str
    function: Callable[[Any, Batch], torch.Tensor]


class LossSelector:
    """Resolves --loss once, on the first output, and then applies the same choice every step."""

    def __init__(
        self,
        spec: str | LossFunction = "auto",
        file_loss: LossFunction | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.spec = spec
        self.file_loss = file_loss
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.choice: LossChoice | None = None

    def __call__(self, output: Any, batch: Batch) -> torch.Tensor:
        if self.choice is None:
            self.choice = self._choose(output, batch)
        loss = self.choice.function(output, batch)
        return check_scalar(loss, self.choice.name)

    def _choose(self, output: Any, batch: Batch) -> LossChoice:
        spec = self.spec
        if callable(spec):
            function = spec
            return LossChoice(getattr(spec, "__name__", "custom"), lambda o, b: function(o, b.targets))
        if spec == "cross-entropy":
            return LossChoice("cross-entropy", self._with_targets(cross_entropy, synthetic_class_ids))
        if spec == "mse":
            return LossChoice("mse", self._with_targets(mse, synthetic_regression_targets))
        if spec != "auto":
            raise UserError(f"unknown loss '{spec}'", "use auto, cross-entropy, mse or FILE.py:FN")
        if model_output_loss(output) is not None:
            return LossChoice("output.loss", lambda o, b: _required_output_loss(o))
        if self.file_loss is not None:
            file_loss = self.file_loss
            return LossChoice("loss_fn (model file)", lambda o, b: file_loss(o, b.targets))
        targets = batch.targets
        if isinstance(targets, torch.Tensor) and not targets.dtype.is_floating_point:
            return LossChoice("cross-entropy", lambda o, b: cross_entropy(o, b.targets))
        if isinstance(targets, torch.Tensor):
            return LossChoice("mse", lambda o, b: mse(o, b.targets))
        projection = RandomProjection(self.seed, self.rank, self.world_size)
        return LossChoice("random-projection", lambda o, b: projection(o, None))

    def _with_targets(
        self,
        loss: Callable[[Any, torch.Tensor], torch.Tensor],
        synthesize: Callable[[torch.Tensor, int, int, int], torch.Tensor],
    ) -> Callable[[Any, Batch], torch.Tensor]:
        """A named loss on batches without targets gets seeded synthetic targets shaped to the output."""

        def compute(output: Any, batch: Batch) -> torch.Tensor:
            targets = batch.targets
            if not isinstance(targets, torch.Tensor):
                targets = synthesize(prediction(output).detach(), self.seed, self.rank, self.world_size)
            return loss(output, targets)

        return compute


def _required_output_loss(output: Any) -> torch.Tensor:
    loss = model_output_loss(output)
    if loss is None:
        raise UserError(
            "the model returned a loss on the first batch but not on a later one",
            "give every batch its labels, or choose --loss",
        )
    return loss


def synthetic_class_ids(logits: torch.Tensor, seed: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """Uniform class ids shaped like the output without its class dimension (last for 3-D, else dim 1)."""
    if logits.dim() == 3:
        shape, classes = tuple(logits.shape[:-1]), logits.shape[-1]
    else:
        shape, classes = (logits.shape[0], *logits.shape[2:]), logits.shape[1]
    ids = _global_slice(lambda s, g: torch.randint(0, classes, s, generator=g), shape, seed, rank, world_size)
    return ids.to(logits.device)


def synthetic_regression_targets(values: torch.Tensor, seed: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    drawn = _global_slice(lambda s, g: torch.randn(s, generator=g), tuple(values.shape), seed, rank, world_size)
    return drawn.to(values.device)


def check_scalar(loss: Any, name: str) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor):
        raise UserError(
            f"the loss ({name}) returned a {type(loss).__name__}, not a tensor",
            "return a scalar torch tensor that depends on the model output",
        )
    if loss.numel() != 1:
        raise UserError(
            f"the loss ({name}) returned shape {tuple(loss.shape)}, not a scalar",
            "reduce it, e.g. with .mean()",
        )
    if not loss.requires_grad:
        raise UserError(
            f"the loss ({name}) does not depend on any trainable parameter",
            "check that the model has trainable parameters and the loss uses the model output",
        )
    return loss.reshape(())
