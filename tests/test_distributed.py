"""torchrun with 2 gloo processes on CPU: DDP and FSDP2 reproduce the single-process numbers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

MODEL = """
import torch
from torch import nn

def build_model():
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5))

def batches():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 16, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(2)]
"""


def _run(args: list[str], cwd: Path, launcher: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run in a session of its own, so that a hang kills torchrun's workers too, not only torchrun."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    command = [*(launcher or [sys.executable]), "-m", "gradcheck_cli", *args]
    process = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = process.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(f"{' '.join(command)} hung:\n{err[-2000:]}")
    return subprocess.CompletedProcess(command, process.returncode, out, err)


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("dist")
    (folder / "model.py").write_text(textwrap.dedent(MODEL))
    result = _run(["analyze", "model.py", "--steps", "2", "--format", "json", "--quiet"], folder)
    assert result.returncode == 0, result.stderr
    return folder, json.loads(result.stdout)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one(single: tuple[Path, dict], mode: str) -> None:
    folder, reference = single
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    result = _run(
        ["analyze", "model.py", "--steps", "2", "--format", "json", "--quiet", "--parallel", mode],
        folder,
        launcher=torchrun,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)  # rank 0's document alone: other ranks print nothing on stdout
    assert (report["parallel"], report["world_size"], report["batch_size"]) == (mode, 2, 8)
    assert report["loss"] == pytest.approx(reference["loss"], rel=1e-6)
    for mine, theirs in zip(report["parameters"], reference["parameters"], strict=True):
        assert mine["name"] == theirs["name"]
        for key in ("grad_norm", "weight_norm", "max_abs", "zero_fraction"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-9), (mine["name"], key)
    for mine, theirs in zip(report["layers"], reference["layers"], strict=True):
        for key in (
            "grad_norm",
            "output_grad_norm",
            "output_grad_per_position",
            "input_rms",
            "dead_fraction",
            "saturated_fraction",
            "zero_grad_unit_fraction",
        ):
            if theirs[key] is None:
                assert mine[key] is None
            else:
                assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-9), (mine["name"], key)
        assert mine["histogram"] == theirs["histogram"]
        assert mine["status"] == theirs["status"]


def test_parallel_without_torchrun_is_a_clear_error(single: tuple[Path, dict]) -> None:
    folder, _ = single
    result = _run(["analyze", "model.py", "--parallel", "ddp"], folder)
    assert result.returncode == 2
    assert "torchrun --nproc-per-node" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_watched_training_steps_match_one_process(single: tuple[Path, dict], mode: str) -> None:
    """The watched run under torchrun: the same Adam steps, the same measured updates, as in one process."""
    folder, _ = single
    args = ["analyze", "model.py", "--steps", "1", "--format", "json", "--quiet"]
    args += ["--train-steps", "3", "--optimizer", "adam", "--lr", "0.01", "--clip", "0.5"]
    alone = _run(args, folder)
    assert alone.returncode in (0, 1), alone.stderr[-3000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    result = _run([*args, "--parallel", mode], folder, launcher=torchrun)
    assert result.returncode == alone.returncode, result.stderr[-3000:]
    mine, theirs = json.loads(result.stdout)["training"], json.loads(alone.stdout)["training"]
    assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-5)
    assert mine["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-5)
    assert mine["clipped"] == theirs["clipped"]
    for a, b in zip(mine["layers"], theirs["layers"], strict=True):
        assert a["name"] == b["name"]
        assert a["update_ratio"] == pytest.approx(b["update_ratio"], rel=1e-4), a["name"]
        assert a["dead_fraction"] == pytest.approx(b["dead_fraction"], abs=1e-9), a["name"]
