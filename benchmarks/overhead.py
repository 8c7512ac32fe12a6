"""What gradcheck costs next to the bare passes it needs, and next to what users would run instead.

    python benchmarks/overhead.py [--device cpu|cuda] [--repeats 3] [--steps 5] [--quick] [--no-scale]

Every configuration runs in its own process (benchmarks/runner.py, or the `gradcheck` CLI itself), the
configurations interleaved within each repeat so machine noise hits them alike; the table reports medians
over the repeats:
- end to end: `gradcheck analyze MODEL.py --steps N` against a plain script doing the same N forward/backward
  passes, process start included: wall time and peak RSS (os.wait4); and against the same script started up
  as the CLI starts (`runner.py --tuned-start`: the garbage collector off while torch imports, and glibc's
  heap thresholds fixed, gradcheck_cli/heap.py), which the CLI gains on and a plain script does not: that
  ratio is gradcheck's own cost only;
- per step: the median step time in process (the first step is warm-up), bare vs with each tool attached:
  gradcheck (its analyze(), hooks and statistics), Lightning's grad_norm, TensorBoard add_histogram of every
  gradient, wandb.watch(log="gradients", log_freq=1) offline, every one of them on a steady heap
  (`runner.py --steady-heap`: otherwise whether a step re-faults its freed gradients depends on the heap's
  history, +-10% on the 10M MLP whatever tool runs). A tool that is not installed is skipped and named;
- the ratio from 1M to 100M parameters (MLP widths), end to end and per step;
- 10,000 small layers side by side (Linear(4, 1) each): per step and peak memory, the cost that grows with the
  number of layers rather than with their size;
- the fixed cost per hooked module: (gradcheck step - bare step) / modules with hooks, in microseconds;
- `gradcheck --help` and `--version` against `python -c "import torch"`.
Targets (issue 6): end to end <= 1.10x wall and <= 1.15x peak memory; --help/--version < 0.5x of import torch.
Targets (issue 18): per step <= 1.05x the bare passes on the 10M MLP, the CNN, the transformer and the 100M
MLP, and no more than Lightning's grad_norm on any workload; 10,000 layers <= 2x in step time and memory.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNNER = HERE / "runner.py"

MLP = """
import torch
from torch import nn

WIDTH, BATCH, INPUTS = {width}, {batch}, 1024

def build_model():
    layers = [nn.Linear(INPUTS, WIDTH), nn.ReLU()]
    for _ in range(2):
        layers += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(WIDTH, 10))

def get_batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(BATCH, INPUTS, generator=g), torch.randint(0, 10, (BATCH,), generator=g)
"""

CNN = """
import torch
from torch import nn

class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.short = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x if self.short is None else self.short(x)
        return self.relu(out)

class ResNet18(nn.Module):
    def __init__(self, width=32):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
        blocks, cin = [], width
        for stage in range(4):
            cout = width * 2 ** stage
            blocks += [Block(cin, cout, 1 if stage == 0 else 2), Block(cout, cout, 1)]
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, 10)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean(dim=(2, 3)))

def build_model():
    return ResNet18()

def get_batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(64, 3, 32, 32, generator=g), torch.randint(0, 10, (64,), generator=g)
"""

TRANSFORMER = """
import torch
from torch import nn

VOCAB, D, LENGTH, BATCH = 8192, 256, 128, 16

class LM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.position = nn.Parameter(torch.randn(1, LENGTH, D) * 0.02)
        layer = nn.TransformerEncoderLayer(D, 4, 4 * D, dropout=0.1, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, VOCAB)

    def forward(self, ids):
        mask = nn.Transformer.generate_square_subsequent_mask(ids.shape[1], device=ids.device)
        x = self.embed(ids) + self.position[:, : ids.shape[1]]
        return self.head(self.norm(self.encoder(x, mask=mask, is_causal=True))).transpose(1, 2)

def build_model():
    return LM()

def get_batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (BATCH, LENGTH + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]
"""


MANY_LAYERS = """
import torch
from torch import nn

LAYERS, BATCH = 10000, 64

class SideBySide(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(4, 1) for _ in range(LAYERS))

    def forward(self, x):
        return torch.cat([layer(x) for layer in self.layers], dim=1).reshape(x.shape[0], -1, 10).sum(1)

def build_model():
    return SideBySide()

def get_batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(BATCH, 4, generator=g), torch.randint(0, 10, (BATCH,), generator=g)
"""

# Issue 6's targets: end to end on these workloads, and the 1M -> 100M MLPs may not grow the ratio.
TARGET_WORKLOADS = ("mlp-10M", "cnn-resnet18", "transformer")
WALL_TARGET = 1.10
MEMORY_TARGET = 1.15
# Issue 18's: per step on these, against the bare passes and against Lightning's grad_norm; many layers.
STEP_WORKLOADS = ("mlp-10M", "cnn-resnet18", "transformer", "mlp-100M")
STEP_TARGET = 1.05
MANY_WORKLOAD = "layers-10k"
MANY_TARGET = 2.0


@dataclass
class Workload:
    name: str
    source: str
    tools: bool = True  # also run TensorBoard and wandb on it (Lightning's grad_norm runs on every workload)
    end_to_end: bool = True  # also time the CLI against a plain script, process start included


@dataclass
class Row:
    workload: str
    params: int = 0
    wall: dict[str, list[float]] = field(default_factory=dict)
    rss: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)
    step: dict[str, list[float]] = field(default_factory=dict)
    hooked: int = 0  # modules gradcheck hooks (weight layers and activations)


def run_child(command: list[str], env: dict[str, str]) -> tuple[float, float, str, float]:
    """Run one measured child in a fresh interpreter that reports its own peak RSS (exact per process):
    (wall s, peak RSS MiB, stdout, CPU s). CPU time (user + system) does not count the time a shared
    machine's hypervisor gives the CPU to someone else, which wall time does."""
    wrapper = [
        sys.executable,
        "-c",
        "import os, resource, subprocess, sys, time, json\n"
        "start = time.perf_counter()\n"
        "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "wall = time.perf_counter() - start\n"
        "usage = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
        "rss, cpu = usage.ru_maxrss, usage.ru_utime + usage.ru_stime\n"
        "sys.stderr.write(p.stderr)\n"
        "print(json.dumps({'wall': wall, 'rss_kb': rss, 'cpu': cpu, 'code': p.returncode, 'out': p.stdout}))\n",
        *command,
    ]
    result = subprocess.run(wrapper, capture_output=True, text=True, env=env, check=False)
    try:
        data = json.loads(result.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError) as exc:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}") from exc
    if data["code"] not in (0, 1):
        raise RuntimeError(f"{' '.join(command)} exited {data['code']}:\n{result.stderr[-2000:]}")
    return data["wall"], data["rss_kb"] / 1024, data["out"], data["cpu"]


def available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="one repeat, 3 steps, no 100M model")
    parser.add_argument("--no-scale", action="store_true", help="skip the 1M/100M MLPs")
    parser.add_argument("--json", type=Path, help="also write all measurements here")
    parser.add_argument("--only", action="append", help="run only this workload (repeatable), e.g. layers-10k")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.steps = 1, 3
    beside = Path(sys.executable).parent / "gradcheck"  # the venv this script runs in, activated or not
    gradcheck = str(beside) if beside.exists() else shutil.which("gradcheck")
    if gradcheck is None:
        sys.exit("gradcheck is not installed in this environment (pip install -e .)")

    workloads = [
        Workload("mlp-10M", MLP.format(width=2048, batch=256)),
        Workload("cnn-resnet18", CNN),
        Workload("transformer", TRANSFORMER),
    ]
    if not args.no_scale:
        workloads.insert(0, Workload("mlp-1M", MLP.format(width=512, batch=256), tools=False))
        if not args.quick:
            workloads.append(Workload("mlp-100M", MLP.format(width=6912, batch=256), tools=False))
    workloads.append(Workload(MANY_WORKLOAD, MANY_LAYERS, tools=False, end_to_end=False))
    if args.only:
        workloads = [w for w in workloads if w.name in args.only]

    # Lightning's grad_norm is written out in runner.py when lightning is not installed (the same computation)
    tools = ["tensorboard", "wandb"]
    skipped = [t for t in tools if not available(t)]
    tools = [t for t in tools if available(t)]

    env = dict(os.environ, PYTHONWARNINGS="ignore", WANDB_SILENT="true", WANDB_MODE="offline")
    # Bytecode as an installed package has it (pip compiles it at install): with an editable install and
    # PYTHONDONTWRITEBYTECODE=1 (set on some CI machines), gradcheck's own modules would be compiled from
    # source on every run, ~75 ms that no installed copy pays. torch's bytecode is compiled either way.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    folder = Path(tempfile.mkdtemp(prefix="gradcheck-bench-"))
    rows: list[Row] = []
    for index, workload in enumerate(workloads):
        path = folder / f"{workload.name.replace('-', '_')}.py"
        path.write_text(textwrap.dedent(workload.source))
        if index == 0:  # unmeasured: writes the bytecode caches the measured runs then read
            run_child(runner_command("bare", path, 1, args.device), env)
            run_child(gradcheck_command(gradcheck, path, 1, args.device), env)
        row = Row(workload.name)
        modes = ["bare", "gradcheck", "lightning", *(tools if workload.tools else [])]
        for repeat in range(args.repeats):
            # end to end: a plain script vs the CLI, process start included
            bare = runner_command("bare", path, args.steps, args.device)
            ends = (
                ("bare", bare),
                ("bare, tuned start", [*bare, "--tuned-start"]),
                ("gradcheck", gradcheck_command(gradcheck, path, args.steps, args.device)),
            )
            for label, command in ends if workload.end_to_end else ():
                wall, rss, _, cpu = run_child(command, env)
                row.wall.setdefault(label, []).append(wall)
                row.rss.setdefault(label, []).append(rss)
                row.cpu.setdefault(label, []).append(cpu)
            # per step, in process
            for mode in modes:
                out_dir = folder / f"out-{workload.name}-{mode}-{repeat}"
                # every tool on the same steady heap (runner.py says why)
                command = [*runner_command(mode, path, args.steps, args.device), "--out", str(out_dir)]
                command.append("--steady-heap")
                wall, rss, out, _ = run_child(command, env)
                data = json.loads(out.strip().splitlines()[-1])
                row.params = data["params"]
                row.hooked = max(row.hooked, data["hooked"])
                row.step.setdefault(mode, []).append(data["median_step_ms"])
                row.wall.setdefault(f"{mode} (script)", []).append(wall)
                row.rss.setdefault(f"{mode} (script)", []).append(rss)
            print(f"  {workload.name}: repeat {repeat + 1}/{args.repeats} done", file=sys.stderr)
        rows.append(row)

    startup = measure_startup(gradcheck, env, args.repeats * 2 + 1)
    print_report(rows, startup, skipped, args)
    if args.json:
        args.json.write_text(json.dumps({"rows": [row.__dict__ for row in rows], "startup": startup}, indent=1))
    shutil.rmtree(folder, ignore_errors=True)


def runner_command(mode: str, path: Path, steps: int, device: str) -> list[str]:
    return [sys.executable, str(RUNNER), mode, str(path), "--steps", str(steps), "--device", device]


def gradcheck_command(gradcheck: str, path: Path, steps: int, device: str) -> list[str]:
    return [gradcheck, "analyze", str(path), "--steps", str(steps), "--device", device, "--format", "json", "--quiet"]


def _paired(values: list[float], bare: list[float]) -> float:
    """Median over repeats of value / bare within the repeat: slow spells of a shared machine hit both
    runs of a pair alike, so pairs cancel drift that a ratio of medians keeps."""
    return statistics.median(v / b for v, b in zip(values, bare, strict=True))


def measure_startup(gradcheck: str, env: dict[str, str], repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {}
    for _ in range(repeats):
        for label, command in (
            ("import torch", [sys.executable, "-c", "import torch"]),
            ("gradcheck --help", [gradcheck, "--help"]),
            ("gradcheck --version", [gradcheck, "--version"]),
        ):
            start = time.perf_counter()
            subprocess.run(command, capture_output=True, env=env, check=True)
            times.setdefault(label, []).append(time.perf_counter() - start)
    return {label: statistics.median(values) for label, values in times.items()}


def print_report(rows: list[Row], startup: dict[str, float], skipped: list[str], args: argparse.Namespace) -> None:
    median = statistics.median
    print()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.python_implementation()} "
        f"{platform.python_version()}, torch {_torch_version()}, device {args.device}; "
        f"{args.steps} steps, median of {args.repeats} repeat(s)"
    )
    print()
    print("End to end (process start included): gradcheck analyze vs a plain script with the same passes;")
    print("ratios are medians of the ratios within each repeat (the two runs back to back)")
    print("(tuned: the plain script starting up as the CLI does, the garbage collector off while torch imports,")
    print(" a steady heap)")
    header = (
        f"{'workload':14} {'params':>8} {'bare s':>8} {'gradcheck s':>12} {'wall x':>7} {'tuned x':>8} "
        f"{'cpu x':>7} {'bare MiB':>9} {'gradcheck MiB':>14} {'memory x':>9}"
    )
    print(header)
    print("-" * len(header))
    for row in (r for r in rows if "bare" in r.wall):
        wall_b, wall_g = median(row.wall["bare"]), median(row.wall["gradcheck"])
        rss_b, rss_g = median(row.rss["bare"]), median(row.rss["gradcheck"])
        print(
            f"{row.workload:14} {_count(row.params):>8} {wall_b:8.2f} {wall_g:12.2f} "
            f"{_paired(row.wall['gradcheck'], row.wall['bare']):7.3f} "
            f"{_paired(row.wall['gradcheck'], row.wall['bare, tuned start']):8.3f} "
            f"{_paired(row.cpu['gradcheck'], row.cpu['bare']):7.3f} "
            f"{rss_b:9.0f} {rss_g:14.0f} {_paired(row.rss['gradcheck'], row.rss['bare']):9.3f}"
        )
    print()
    print("Per step (in process, median step time) and peak memory of the process, relative to bare passes")
    print("(vs lightning: the step time relative to Lightning's grad_norm in the same repeat; us/module: the")
    print(" step time over bare divided by the modules gradcheck hooks, its fixed cost per module)")
    header = (
        f"{'workload':14} {'tool':12} {'step ms':>9} {'step x':>7} {'vs lightning':>13} {'us/module':>10} "
        f"{'peak MiB':>9} {'memory x':>9}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        for mode, values in row.step.items():
            rss = row.rss[f"{mode} (script)"]
            versus = f"{_paired(values, row.step['lightning']):13.3f}" if "lightning" in row.step else f"{'':13}"
            per_module = f"{'':10}"
            if mode == "gradcheck" and row.hooked:
                extra = [(v - b) * 1e3 / row.hooked for v, b in zip(values, row.step["bare"], strict=True)]
                per_module = f"{median(extra):10.1f}"
            print(
                f"{row.workload:14} {mode:12} {median(values):9.1f} {_paired(values, row.step['bare']):7.3f} "
                f"{versus} {per_module} {median(rss):9.0f} {_paired(rss, row.rss['bare (script)']):9.3f}"
            )
    if skipped:
        print(f"\nnot installed, skipped: {', '.join(skipped)}")
    print()
    torch_import = startup["import torch"]
    for label in ("gradcheck --help", "gradcheck --version"):
        print(
            f"{label:20} {startup[label]:6.3f} s = {startup[label] / torch_import:.2f}x of "
            f"`python -c 'import torch'` ({torch_import:.3f} s)"
        )
    print()
    for line in verdicts(rows, startup):
        print(line)


def verdicts(rows: list[Row], startup: dict[str, float]) -> list[str]:
    """Each target of issue 6, met or not, from the numbers above."""
    lines = []
    for row in rows:
        if row.workload in TARGET_WORKLOADS and "bare" in row.wall:
            wall = _paired(row.wall["gradcheck"], row.wall["bare"])
            tuned = _paired(row.wall["gradcheck"], row.wall["bare, tuned start"])
            memory = _paired(row.rss["gradcheck"], row.rss["bare"])
            lines.append(
                f"{row.workload}: wall {wall:.3f}x {_met(wall <= WALL_TARGET)} (<= {WALL_TARGET}x; against the tuned "
                f"start {tuned:.3f}x {_met(tuned <= WALL_TARGET)}), "
                f"memory {memory:.3f}x {_met(memory <= MEMORY_TARGET)} (<= {MEMORY_TARGET}x)"
            )
    by_name = {row.workload: row for row in rows}
    if "mlp-1M" in by_name and "mlp-100M" in by_name:
        # Per step: the statistics' own cost, which is what could grow with size. End to end: process start
        # weighs most at 1M, so there the bound is the larger of the 1M ratio and the target.
        small, large = (by_name[n] for n in ("mlp-1M", "mlp-100M"))
        step_small, step_large = (_paired(r.step["gradcheck"], r.step["bare"]) for r in (small, large))
        wall_small, wall_large = (_paired(r.wall["gradcheck"], r.wall["bare"]) for r in (small, large))
        lines.append(
            f"1M -> 100M parameters: per step {step_small:.3f}x -> {step_large:.3f}x "
            f"{_met(step_large <= step_small)}; end to end {wall_small:.3f}x -> {wall_large:.3f}x "
            f"{_met(wall_large <= max(wall_small, WALL_TARGET))} (<= max(1M, {WALL_TARGET}x))"
        )
    lines += step_verdicts(rows)
    for label in ("gradcheck --help", "gradcheck --version"):
        share = startup[label] / startup["import torch"]
        lines.append(f"{label}: {share:.2f}x of import torch {_met(share < 0.5)} (< 0.5x)")
    return lines


def step_verdicts(rows: list[Row]) -> list[str]:
    """Each target of issue 18, met or not: per step against the bare passes and against Lightning."""
    lines = []
    for row in rows:
        if "gradcheck" not in row.step:
            continue
        step = _paired(row.step["gradcheck"], row.step["bare"])
        lightning = _paired(row.step["lightning"], row.step["bare"]) if "lightning" in row.step else None
        parts = []
        if row.workload in STEP_WORKLOADS:
            parts.append(f"per step {step:.3f}x {_met(step <= STEP_TARGET)} (<= {STEP_TARGET}x)")
        if row.workload == MANY_WORKLOAD:
            memory = _paired(row.rss["gradcheck (script)"], row.rss["bare (script)"])
            parts.append(f"per step {step:.3f}x {_met(step <= MANY_TARGET)} (<= {MANY_TARGET}x)")
            parts.append(f"memory {memory:.3f}x {_met(memory <= MANY_TARGET)} (<= {MANY_TARGET}x)")
        if lightning is not None:
            versus = _paired(row.step["gradcheck"], row.step["lightning"])
            parts.append(
                f"Lightning's grad_norm {lightning:.3f}x: gradcheck {versus:.3f}x of it {_met(versus <= 1.0)} (<= 1x)"
            )
        if parts:
            lines.append(f"{row.workload}: " + "; ".join(parts))
    return lines


def _met(ok: bool) -> str:
    return "met" if ok else "NOT MET"


def _count(value: int) -> str:
    return f"{value / 1e6:.1f}M"


def _torch_version() -> str:
    try:
        import torch

        return torch.__version__
    except ImportError:
        return "?"


if __name__ == "__main__":
    main()
