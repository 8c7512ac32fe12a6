"""Multi-process runs under torchrun: the process group, wrapping, batch slicing and reducing statistics.

    torchrun --nproc-per-node=N -m gradcheck_cli analyze model.py --parallel ddp|fsdp

Every rank builds the same model (same seed) and the same global batches, keeps its slice of each batch, and
runs the passes through DistributedDataParallel or FSDP2 (fully_shard). Statistics are then combined so that
with equal slices the report equals a single-process run on the whole batch:
- parameter gradients are already global under DDP (averaged in backward); under FSDP each rank holds a
  shard, so squared norms, zero counts and histograms are summed and maxima taken across ranks;
- per-rank quantities (loss, dL/dz, layer inputs, activation counts) are summed across ranks; since the global
  loss is the mean of the ranks' losses, dL/dz of the global loss is dL_r/dz_r / world, so squared norms are
  divided by world^2.
Rank 0 alone prints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gradcheck_cli.data import Batch
from gradcheck_cli.errors import UserError

MODES = ("ddp", "fsdp")
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Parallel:
    """This process's place in a multi-process run."""

    mode: str  # "ddp" | "fsdp"
    rank: int
    world_size: int
    device: torch.device

    @property
    def sharded(self) -> bool:
        return self.mode == "fsdp"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def main_process() -> bool:
    """Whether this process should print: always outside torchrun, rank 0 under it."""
    return os.environ.get("RANK", "0") == "0"


def setup(mode: str, device: str | torch.device | None) -> Parallel:
    """Join the process group that torchrun describes in the environment (gloo on CPU, nccl on CUDA)."""
    import torch.distributed as dist

    if mode not in MODES:
        raise UserError(f"unknown --parallel mode '{mode}'", "use ddp or fsdp")
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if missing and not dist.is_initialized():
        raise UserError(
            f"--parallel {mode} needs one process per device, started by torchrun (no {missing[0]} set)",
            f"run: torchrun --nproc-per-node=2 -m gradcheck_cli analyze ... --parallel {mode}",
        )
    wanted = str(device) if device is not None else "auto"
    use_cuda = torch.cuda.is_available() if wanted == "auto" else wanted.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is available", "use --device cpu or auto")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        run_device = torch.device("cuda", local_rank)
    else:
        run_device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Parallel(mode, dist.get_rank(), dist.get_world_size(), run_device)


def teardown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, parallel: Parallel) -> nn.Module:
    """DistributedDataParallel around the model, or FSDP2's fully_shard on it (in place); returns what to call."""
    model.to(parallel.device)
    if parallel.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [parallel.device.index] if parallel.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.fsdp import fully_shard

    # One group at the root: always valid (tied weights must share a group), every parameter sharded on dim 0.
    fully_shard(model)
    return model


def shard(batch: Batch, parallel: Parallel) -> Batch:
    """This rank's equal slice of a global batch, along the first dimension of every tensor."""
    size = batch.size
    if size is None:
        raise UserError("--parallel needs batches whose tensors have a batch dimension", "give batched inputs")
    if size % parallel.world_size:
        raise UserError(
            f"a batch of {size} cannot be split evenly over {parallel.world_size} processes",
            f"use a batch size divisible by {parallel.world_size}",
        )
    part = size // parallel.world_size
    start = parallel.rank * part

    def cut(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == size:
            return value[start : start + part]
        if isinstance(value, dict):
            return {k: cut(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(cut(v) for v in value)
        return value

    return Batch(cut(batch.args), cut(batch.kwargs), cut(batch.targets))


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The part of a (possibly DTensor) parameter or gradient that lives in this process."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def all_reduce(tensor: torch.Tensor, op: str) -> torch.Tensor:
    """In-place sum or max over all processes (gloo has no MAX for bool: use numbers)."""
    import torch.distributed as dist

    dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor


def broadcast_flag(value: bool, device: torch.device) -> bool:
    """Rank 0's decision, everywhere (so every rank exits the same way)."""
    import torch.distributed as dist

    flag = torch.tensor([1 if value else 0], device=device)
    dist.broadcast(flag, src=0)
    return bool(flag.item())
