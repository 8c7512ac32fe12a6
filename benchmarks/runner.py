"""One measured process: a model file's forward/backward passes, bare or with one gradient tool attached.

    python benchmarks/runner.py MODE MODEL_FILE --steps N [--device cpu|cuda] [--out DIR] [--tuned-start]
                                [--steady-heap]

MODE:
  bare         the passes alone: zero grads, forward, loss, backward (what every tool below adds to)
  gradcheck    the same passes through gradcheck_cli.analyze (hooks, statistics, diagnosis), in process
  lightning    bare + per-parameter gradient norms as Lightning's grad_norm computes them, read as floats
               (as self.log_dict does)
  tensorboard  bare + SummaryWriter.add_histogram of every gradient, every step
  wandb        bare + wandb.watch(model, log="gradients", log_freq=1), offline, wandb.log every step

--steady-heap fixes glibc's heap thresholds as the CLI does (gradcheck_cli/heap.py): whether a step re-faults
its freed gradients depends otherwise on the heap's history, a +-10% effect unrelated to any tool, which the
per-step comparison would read as a tool's cost. --tuned-start implies it.

Prints one JSON line: per-step wall times (ms) and, on CUDA, peak allocated memory. The parent
(overhead.py) measures the whole process's wall time and peak RSS.
"""

from __future__ import annotations

import gc
import sys

# --tuned-start: start the way the gradcheck CLI does (cli.main): the garbage collector off while torch imports,
# then everything imported frozen out of its reach. Lets the benchmark compare end to end against a plain
# script with the same start-up, so the ratio shows gradcheck's own cost only.
TUNED_START = "--tuned-start" in sys.argv
if TUNED_START:
    gc.disable()

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

if TUNED_START:
    gc.freeze()
    gc.enable()


def load(path: str) -> Any:
    spec = importlib.util.spec_from_file_location("bench_model", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["bare", "gradcheck", "lightning", "tensorboard", "wandb"])
    parser.add_argument("model_file")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None)
    parser.add_argument("--tuned-start", action="store_true", help="start up as the gradcheck CLI does (above)")
    parser.add_argument("--steady-heap", action="store_true", help="fix glibc's heap thresholds (heap.py), any mode")
    args = parser.parse_args()
    if args.tuned_start or args.steady_heap:  # the CLI fixes them too (cli._tune_process)
        from gradcheck_cli.heap import steady_heap

        steady_heap()
    device = torch.device(args.device)
    module = load(args.model_file)
    torch.manual_seed(0)
    model = module.build_model().to(device)
    inputs, targets = (t.to(device) for t in module.get_batch())
    out = Path(args.out or tempfile.mkdtemp(prefix="gradcheck-bench-"))
    times: list[float] = []

    if args.mode == "gradcheck":
        import gradcheck_cli

        stamps: list[float] = []

        def progress(phase: str, done: int, total: int) -> None:
            sync(device)
            stamps.append(time.perf_counter())

        sync(device)
        start = time.perf_counter()
        gradcheck_cli.analyze(model, (inputs, targets), steps=args.steps, device=device, progress=progress)
        edges = [start, *stamps]
        times = [(b - a) * 1e3 for a, b in itertools.pairwise(edges)]
    else:
        after_backward = attach(args.mode, model, out)
        for step in range(args.steps):
            sync(device)
            start = time.perf_counter()
            for param in model.parameters():
                param.grad = None
            loss = F.cross_entropy(model(inputs), targets)
            loss.backward()
            after_backward(step, loss)
            sync(device)
            times.append((time.perf_counter() - start) * 1e3)

    result = {
        "mode": args.mode,
        "step_ms": times,
        "median_step_ms": statistics.median(times[1:] if len(times) > 1 else times),
        "params": sum(p.numel() for p in model.parameters()),
        "hooked": hooked(model) if args.mode == "gradcheck" else 0,
    }
    if device.type == "cuda":
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(result))
    sys.stdout.flush()


def hooked(model: torch.nn.Module) -> int:
    """Modules gradcheck hooks: those owning parameters directly, and the activations it watches."""
    from gradcheck_cli.layers import DEAD_TYPES, SATURATION_LIMITS

    activations = (*DEAD_TYPES, *SATURATION_LIMITS)
    return sum(
        1
        for module in model.modules()
        if any(True for _ in module.parameters(recurse=False)) or isinstance(module, activations)
    )


def attach(mode: str, model: torch.nn.Module, out: Path) -> Any:
    """The per-step work a user would add with each tool; returns a callback run after backward."""
    if mode == "bare":
        return lambda step, loss: None
    if mode == "lightning":
        try:
            from lightning.pytorch.utilities import grad_norm
        except ImportError:  # the same computation, written out (Lightning's utilities/grads.py)

            def grad_norm(module: torch.nn.Module, norm_type: float) -> dict[str, torch.Tensor]:
                norms = {
                    f"grad_{norm_type}_norm/{name}": torch.linalg.vector_norm(p.grad.detach(), ord=norm_type)
                    for name, p in module.named_parameters()
                    if p.grad is not None
                }
                if norms:
                    total = torch.linalg.vector_norm(torch.stack(list(norms.values())), ord=norm_type)
                    norms[f"grad_{norm_type}_norm_total"] = total
                return norms

        def log_norms(step: int, loss: torch.Tensor) -> None:
            values = {k: float(v) for k, v in grad_norm(model, norm_type=2).items()}  # what logging does
            assert values

        return log_norms
    if mode == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tb"))

        def histograms(step: int, loss: torch.Tensor) -> None:
            for name, param in model.named_parameters():
                if param.grad is not None:
                    writer.add_histogram(f"grad/{name}", param.grad, step)
            writer.flush()

        return histograms
    if mode == "wandb":
        import os

        import wandb

        os.environ["WANDB_SILENT"] = "true"
        wandb.init(mode="offline", dir=str(out), project="gradcheck-bench")
        wandb.watch(model, log="gradients", log_freq=1)

        def commit(step: int, loss: torch.Tensor) -> None:
            wandb.log({"loss": float(loss)}, step=step)

        return commit
    raise ValueError(mode)


if __name__ == "__main__":
    main()
