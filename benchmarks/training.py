"""What watching a training step costs (--train-steps, gradcheck_cli/watch.py), next to the same step without it.

    python benchmarks/training.py [--device cpu|cuda] [--repeats 5] [--steps 8] [--optimizer adamw]

For each workload of benchmarks/overhead.py (MLPs of 1M and 10M parameters, the ResNet-like CNN, the
transformer) in one process: the bare step a training loop takes (zero_grad, forward, loss, backward,
optimizer step) and the watched step (the same, plus watch.Watch's norms before clipping, dead rows, the
update against the kept copy, the stall sample and one host transfer), in alternating blocks of --steps steps
so that machine noise hits both alike; the ratio is the median over the repeats of (median watched step /
median bare step) within a block pair. Memory: the watch keeps one copy of the trainable weights (reported),
and the peak allocation of a watched block with 4x the steps is the same as with 1x (it does not grow with K).
Target (issue 16): a watched step costs at most 1.10x the bare step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from overhead import CNN, MLP, TRANSFORMER  # noqa: E402

from gradcheck_cli.distributed import Combiner  # noqa: E402
from gradcheck_cli.layers import discover_layers  # noqa: E402
from gradcheck_cli.optimizers import Built  # noqa: E402
from gradcheck_cli.watch import Watch  # noqa: E402

TARGET = 1.10
WORKLOADS = {
    "mlp-1M": MLP.format(width=512, batch=64),
    "mlp-10M": MLP.format(width=2048, batch=64),
    "cnn-resnet18": CNN,
    "transformer": TRANSFORMER,
}


def load(source: str) -> tuple[nn.Module, Any]:
    namespace: dict[str, Any] = {}
    exec(compile(source, "<workload>", "exec"), namespace)
    torch.manual_seed(0)
    return namespace["build_model"](), namespace["get_batch"]()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def block(step: Any, steps: int, device: torch.device) -> list[float]:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def measure(name: str, source: str, args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    model, (inputs, targets) = load(source)
    model.to(device).train()
    inputs, targets = inputs.to(device), targets.to(device)
    optimizer = _optimizer(args.optimizer, model)
    watch = Watch(model, discover_layers(model), Built(optimizer, None, args.optimizer), None, Combiner(), None)

    def forward_backward() -> torch.Tensor:
        loss = nn.functional.cross_entropy(model(inputs), targets)
        loss.backward()
        return loss

    def bare() -> None:
        optimizer.zero_grad(set_to_none=True)
        forward_backward()
        optimizer.step()

    def watched() -> None:
        watch.step(forward_backward)

    block(bare, 2, device)  # warm-up: allocator, optimizer state
    block(watched, 2, device)
    ratios, bare_steps, watched_steps = [], [], []
    for _ in range(args.repeats):
        b = statistics.median(block(bare, args.steps, device))
        w = statistics.median(block(watched, args.steps, device))
        ratios.append(w / b)
        bare_steps.append(b)
        watched_steps.append(w)
    kept = sum(t.kept.numel() * t.kept.element_size() for t in watch.tracked)
    growth = _growth(watched, args.steps, device) if device.type == "cpu" else None
    params = sum(p.numel() for p in model.parameters())
    return {
        "name": name,
        "params": params,
        "bare_ms": 1e3 * statistics.median(bare_steps),
        "watched_ms": 1e3 * statistics.median(watched_steps),
        "ratio": statistics.median(ratios),
        "kept_mib": kept / 2**20,
        "growth_kib": growth,
    }


def _optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=1e-3)
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=1e-3)
    return torch.optim.AdamW(model.parameters(), lr=1e-3)


def _growth(watched: Any, steps: int, device: torch.device) -> float:
    """Peak Python-tracked allocation of 4x the steps minus that of 1x, KiB (host records only; tensors are
    reused in place)."""
    peaks = []
    for count in (steps, 4 * steps):
        tracemalloc.start()
        block(watched, count, device)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    return (peaks[1] - peaks[0]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--optimizer", default="adamw", choices=("sgd", "adam", "adamw"))
    parser.add_argument("--only", nargs="*", default=None, help="workload names")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = [measure(name, source, args) for name, source in WORKLOADS.items() if not args.only or name in args.only]
    print(f"watched step vs bare step, {args.optimizer}, {args.device}, median of {args.repeats} x {args.steps} steps")
    columns = ("params", "bare ms", "watched ms", "ratio", "kept MiB", "4x steps")
    widths = (8, 9, 11, 7, 9, 9)
    print(f"{'workload':14} " + " ".join(f"{c:>{w}}" for c, w in zip(columns, widths, strict=True)) + "  target")
    for row in rows:
        growth = f"{row['growth_kib']:+.0f} KiB" if row["growth_kib"] is not None else "-"
        met = "met" if row["ratio"] <= TARGET else "NOT MET"
        print(
            f"{row['name']:14} {row['params'] / 1e6:7.1f}M {row['bare_ms']:9.2f} {row['watched_ms']:11.2f} "
            f"{row['ratio']:6.3f}x {row['kept_mib']:9.1f} {growth:>9}  <= {TARGET:.2f}x {met}"
        )


if __name__ == "__main__":
    main()
