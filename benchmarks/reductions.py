"""The exact per-gradient statistics alone, on the gradients of the overhead benchmark's workloads.

    python benchmarks/reductions.py [--rounds 30] [--only mlp-10M]

For each workload: build the model, run one forward/backward (cross-entropy), keep the gradients that
gradcheck reduces one by one (more than reduce.SMALL_TENSOR values), then time, in alternating rounds in one
process (machine drift hits all alike; medians over rounds), the passes over those gradients per step:
- `norm only`: torch.linalg.vector_norm of each gradient, what Lightning's grad_norm computes;
- `row norms`: gradcheck's norm pass (norms per unit: the rows that got a gradient);
- `extrema`: torch.aminmax (max |g|);
- `zeros`: torch.count_nonzero (the exact count of zeros);
- `zeros as int`: count_nonzero on the same bits read as integers, faster on a CPU, but -0.0 is a nonzero
  integer: exact only with one more pass that rules -0.0 out (the integers' minimum);
- `whole passes`: reduce_gradient as it was before the CPU path by bits and blocks (reduce.BLOCK): the
  three passes over each whole gradient, count_nonzero on floats;
- `reduce_gradient`: all of gradcheck's per-gradient statistics (the three passes, the |g| histogram's sample).
`sparse-input` is the 10M MLP fed inputs whose features are 80% exact zeros (MNIST's pixels are 82%): its
first layer's gradient has zero columns, which is where a float count_nonzero slows down on a CPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import CNN, MLP, TRANSFORMER  # the benchmark's workloads, one copy


def workloads() -> Iterator[tuple[str, str, bool]]:
    """(name, source, inputs 80% exact zeros) of the overhead benchmark's workloads with large gradients."""
    yield "mlp-10M", MLP.format(width=2048, batch=256), False
    yield "sparse-input", MLP.format(width=2048, batch=256), True
    yield "cnn-resnet18", CNN, False
    yield "transformer", TRANSFORMER, False
    yield "mlp-100M", MLP.format(width=6912, batch=256), False


def timed(passes: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median ms per call of each pass, the passes interleaved within each round."""
    times: dict[str, list[float]] = {name: [] for name in passes}
    for _ in range(rounds + 1):  # the first round warms up
        for name, run in passes.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values[1:]) * 1e3 for name, values in times.items()}


def gradients(source: str, sparse_input: bool) -> list[torch.Tensor]:
    namespace: dict[str, object] = {}
    exec(compile(source, "<workload>", "exec"), namespace)
    torch.manual_seed(0)
    model = namespace["build_model"]()  # type: ignore[operator]
    inputs, targets = namespace["get_batch"]()  # type: ignore[operator]
    if sparse_input:
        inputs = inputs * (torch.rand(inputs.shape[1:], generator=torch.Generator().manual_seed(1)) > 0.8)
    F.cross_entropy(model(inputs), targets).backward()
    from gradcheck_cli.reduce import SMALL_TENSOR

    return [p.grad for p in model.parameters() if p.grad is not None and p.grad.numel() > SMALL_TENSOR]


def passes_over(grads: list[torch.Tensor]) -> dict[str, Callable[[], object]]:
    from gradcheck_cli import reduce
    from gradcheck_cli.reduce import reduce_gradient

    def whole_passes() -> object:
        threshold, reduce.BY_BITS = reduce.BY_BITS, sys.maxsize
        try:
            return [reduce_gradient(g, g.dim() >= 2) for g in grads]
        finally:
            reduce.BY_BITS = threshold

    flats = [g.reshape(-1) for g in grads]
    bits = [flat.view(torch.int32) for flat in flats]
    return {
        "norm only": lambda: [torch.linalg.vector_norm(g) for g in grads],
        "row norms": lambda: [torch.linalg.vector_norm(g.reshape(g.shape[0], -1), dim=1) for g in grads],
        "extrema": lambda: [torch.aminmax(flat) for flat in flats],
        "zeros": lambda: [torch.count_nonzero(flat) for flat in flats],
        "zeros as int": lambda: [torch.count_nonzero(b) for b in bits],
        "whole passes": whole_passes,
        "reduce_gradient": lambda: [reduce_gradient(g, g.dim() >= 2) for g in grads],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--only", action="append", help="run only this workload (repeatable)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ms per step, median of {args.rounds} rounds")
    header = ("norm only", "row norms", "extrema", "zeros", "zeros as int", "whole passes", "reduce_gradient")
    print(f"{'workload':14s} {'grads':>5s} {'values':>7s} " + " ".join(f"{h:>15s}" for h in header))
    for name, source, sparse_input in workloads():
        if args.only and name not in args.only:
            continue
        grads = gradients(source, sparse_input)
        result = timed(passes_over(grads), args.rounds)
        values = sum(g.numel() for g in grads)
        print(f"{name:14s} {len(grads):5d} {values / 1e6:6.1f}M " + " ".join(f"{result[h]:15.2f}" for h in header))


if __name__ == "__main__":
    main()
