"""Per-step cost in one process: bare passes and gradcheck's measured passes in alternating rounds.

    python benchmarks/step_ab.py MODEL_FILE [--rounds 4] [--steps 5] [--default-heap]

MODEL_FILE defines build_model() and get_batch() -> (inputs, targets), like the workloads overhead.py writes.
Each round runs `--steps` bare steps (zero grads, forward, cross-entropy, backward), then analyze() over as
many steps; the first step of each is warm-up. Alternating rounds in one process let machine drift hit both
alike: a quick check while optimising; overhead.py (a process per configuration, repeats) is the benchmark.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import statistics
import time

import torch
import torch.nn.functional as F


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_file")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--default-heap", action="store_true", help="leave glibc's heap thresholds adaptive")
    args = parser.parse_args()
    spec = importlib.util.spec_from_file_location("bench_model", args.model_file)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from gradcheck_cli.heap import steady_heap

    if not args.default_heap:
        steady_heap()  # bare and measured steps alike (runner.py --steady-heap says why)
    torch.manual_seed(0)
    model = module.build_model()
    inputs, targets = module.get_batch()

    import gradcheck_cli

    def bare() -> list[float]:
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            for param in model.parameters():
                param.grad = None
            F.cross_entropy(model(inputs), targets).backward()
            times.append(time.perf_counter() - start)
        return times[1:]

    def measured() -> list[float]:
        stamps: list[float] = []
        start = time.perf_counter()
        gradcheck_cli.analyze(
            model, (inputs, targets), steps=args.steps, progress=lambda *_: stamps.append(time.perf_counter())
        )
        return [b - a for a, b in itertools.pairwise([start, *stamps])][1:]

    bare_times: list[float] = []
    measured_times: list[float] = []
    measured(), bare()  # warm-up
    for _ in range(args.rounds):
        bare_times += bare()
        measured_times += measured()
    b, g = statistics.median(bare_times) * 1e3, statistics.median(measured_times) * 1e3
    print(f"{args.model_file}: bare {b:.1f} ms, gradcheck {g:.1f} ms per step: {g / b:.3f}x")


if __name__ == "__main__":
    main()
