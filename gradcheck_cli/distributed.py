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

import torch
from torch import nn

from gradcheck_cli.batch import Batch
from gradcheck_cli.devices import wants_cuda
from gradcheck_cli.errors import UserError

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


def main_process() -> bool:
    """Whether this process should print: always outside torchrun, rank 0 under it."""
    return os.environ.get("RANK", "0") == "0"


def setup(mode: str, device: str | torch.device | None) -> Parallel:
    """Join the process group that torchrun describes in the environment (gloo on CPU, nccl on CUDA)."""
    import torch.distributed as dist

    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if missing and not dist.is_initialized():
        raise UserError(
            f"--parallel {mode} needs one process per device, started by torchrun (no {missing[0]} set)",
            f"run: torchrun --nproc-per-node=2 -m gradcheck_cli analyze ... --parallel {mode}",
        )
    use_cuda = wants_cuda(device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        run_device = torch.device("cuda", local_rank)
    else:
        run_device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Parallel(mode, dist.get_rank(), dist.get_world_size(), run_device)


# Whether this process left a process group: it then ends with os._exit (cli.main, exit_after_group).
LEFT_GROUP = False


def teardown() -> None:
    global LEFT_GROUP
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
        LEFT_GROUP = True


def exit_after_group(code: object) -> None:
    """End a process that was in a process group without running C++ static destructors: on a loaded machine
    a backend thread still joinable when they run aborts the process ("terminate called without an active
    exception", SIGABRT, after the report was printed), which torchrun reports as a failure. Everything is
    written by then; the streams are flushed first. Does nothing in a process that never joined a group."""
    if not LEFT_GROUP:
        return
    import sys

    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code or 0)


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

    return batch.map(
        lambda tensor: tensor[start : start + part] if tensor.dim() and tensor.shape[0] == size else tensor
    )


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The part of a (possibly DTensor) parameter or gradient that lives in this process."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def all_reduce(tensor: torch.Tensor, op: str) -> torch.Tensor:
    """In-place sum or max over all processes (gloo has no MAX for bool: use numbers)."""
    import torch.distributed as dist

    dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor


# -- combining per-step numbers across processes -----------------------------------------------------------
# Each per-step number declares how it combines (steps.py: a field's `combine`):
GRADIENT_SUM = "gradient_sum"  # sums over a gradient (squared norms, zero counts): summed over shards (FSDP)
GRADIENT_MAX = "gradient_max"  # maxima over a gradient: max over shards (FSDP)
LOCAL_SUM = "local_sum"  # per-rank sums (loss, dL/dz, layer inputs, activation counts): summed over ranks
HOST_COUNT = "host_count"  # element counts kept on the host by the hooks: summed over ranks like LOCAL_SUM


class Combiner:
    """How one process's per-step numbers combine with the other processes' (nothing to do in one process).

    grad_sum: gradient sums (squared norms, zero counts, histograms): summed across ranks only when parameters
    are sharded (FSDP), since under DDP every rank already holds the whole averaged gradient.
    grad_max: maxima of gradients: max across ranks when sharded.
    local_sum: per-rank sums (loss, dL/dz, inputs, activation counts): always summed across ranks.
    """

    def __init__(self, world_size: int = 1, sharded: bool = False) -> None:
        self.world_size = world_size
        self.sharded = sharded

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def __call__(self, grad_sum: torch.Tensor, grad_max: torch.Tensor, local_sum: torch.Tensor) -> None:
        if not self.active:
            return
        if self.sharded:
            all_reduce(grad_sum, "sum")
            all_reduce(grad_max, "max")
        all_reduce(local_sum, "sum")

    def grads(self, values: torch.Tensor, op: str = "sum") -> None:
        """Combine gradient-derived numbers outside a step (finish, weight norms)."""
        if self.active and self.sharded:
            all_reduce(values, op)

    def locals(self, values: torch.Tensor, op: str = "sum") -> None:
        if self.active:
            all_reduce(values, op)
