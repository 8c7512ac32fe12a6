"""Bad input: exit 2 and one line naming the cause and the fix, no traceback, and nothing of the user's lost.

Every CLI case runs in a folder holding the same catalogue of user files (models, weights, data); after each
failing run every file is byte-identical and nothing was added (no __pycache__, no temporary file).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save
from torch import nn

import gradcheck_cli
from gradcheck_cli import files as files_module
from gradcheck_cli.errors import ModelRunError

HEADER = "import sys\nimport torch\nfrom torch import nn\n"
MLP = "model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))\n"


def _module(forward: str) -> str:
    """A model file whose forward runs `forward` (one statement) before a Linear(8, 2)."""
    return HEADER + (
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.fc = nn.Linear(8, 2)\n"
        "    def forward(self, x):\n"
        f"        {forward}\n"
        "        return self.fc(x)\n"
        "model = Net()\n"
    )


def _pickle(state: dict[str, torch.Tensor]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


@functools.cache
def catalogue() -> dict[str, bytes]:
    """The user's files: name -> bytes (a name ending in / is a folder)."""
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    weights = save(mlp.state_dict())
    data = save({"inputs": torch.randn(10, 8), "targets": torch.randint(0, 4, (10,))})
    texts = {
        "mlp.py": HEADER + MLP,
        "syntax.py": "import torch\ndef broken(:\n    pass\n",
        "import_error.py": HEADER + "raise ValueError('boom at import')\n",
        "build_error.py": HEADER + "def build_model():\n    raise RuntimeError('cannot build: bad config')\n",
        "no_model.py": "x = 1\n",
        "several.py": HEADER
        + "".join(
            f"class {name}(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
            f"        self.fc = nn.Linear(8, 2)\n    def forward(self, x):\n        return self.fc(x)\n"
            for name in ("Alpha", "Beta")
        ),
        "forward_error.py": _module("raise ValueError('my forward is broken')"),
        "forward_exit.py": _module("sys.exit(3)"),
        "no_tensor.py": _module("return None"),
        "frozen.py": HEADER + "model = nn.Linear(8, 2).requires_grad_(False)\n",
        "scripted.py": HEADER + "model = torch.jit.script(nn.Sequential(nn.Linear(8, 16), nn.ReLU()))\n",
        "on_meta.py": HEADER + "with torch.device('meta'):\n    " + MLP,
        "complex.py": HEADER + "model = nn.Linear(8, 2).to(torch.complex64)\n",
        "batch_norm.py": HEADER
        + "model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))\n",
        "oom_cuda.py": _module("raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB')"),
        "oom_cpu.py": _module('raise RuntimeError("DefaultCPUAllocator: can\'t allocate memory: you tried 9 GB")'),
        "memory_error.py": _module("raise MemoryError()"),
        "interrupted.py": _module("raise KeyboardInterrupt"),
        "data_fns.py": HEADER
        + "def broken():\n    raise ValueError('no data today')\ndef number():\n    return 42\n"
        + "def exit_zero():\n    sys.exit(0)\ndef exit_message():\n    sys.exit('no more data')\n"
        + "def exit_in_generator():\n    yield torch.randn(4, 8)\n    sys.exit(0)\n",
        "batch_exit.py": HEADER + MLP + "def get_batch():\n    sys.exit('no batch for you')\n",
        "loss_fns.py": HEADER
        + "def broken(output, targets):\n    raise ValueError('loss broke')\n"
        + "def per_sample(output, targets):\n    return output.sum(1)\n"
        + "def exits(output, targets):\n    raise SystemExit(3)\n",
    }
    files = {name: text.encode() for name, text in texts.items()}
    files |= {
        "weights.safetensors": weights,
        "truncated.safetensors": weights[: len(weights) // 2],
        "empty.safetensors": b"",
        "random.bin.safetensors": bytes(range(7, 207)),
        "pickled.safetensors": _pickle(mlp.state_dict()),
        "checkpoint.pt": _pickle(mlp.state_dict()),
        "checkpoint.bin": _pickle(mlp.state_dict()),
        "checkpoint.ckpt": _pickle(mlp.state_dict()),
        "garbage.pt": b"\x80" + bytes(range(100)),
        "shape.safetensors": save({"0.weight": torch.zeros(16, 9), "0.bias": torch.zeros(16)}),
        "keys.safetensors": save({"0.weight": torch.zeros(16, 8), "extra": torch.zeros(1)}),
        "data.safetensors": data,
        "data_truncated.safetensors": data[:-7],
        "no_inputs.safetensors": save({"x": torch.randn(10, 8)}),
        "narrow.safetensors": save({"inputs": torch.randn(10, 5)}),
        "folder.safetensors/": b"",
    }
    return files


def _write_catalogue(folder: Path) -> None:
    for name, content in catalogue().items():
        if name.endswith("/"):
            (folder / name).mkdir()
        else:
            (folder / name).write_bytes(content)


def _snapshot(folder: Path) -> dict[str, str]:
    """Every path under `folder` with a hash of its bytes (folders as "dir")."""
    return {
        str(path.relative_to(folder)): "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
    }


@pytest.fixture
def user_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    _write_catalogue(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


# (TARGET and options after `gradcheck analyze`, text the one stderr line must contain)
CASES = {
    # model file
    "missing model file": ("missing.py", "file not found: missing.py"),
    "syntax error": ("syntax.py", "syntax.py:2"),
    "exception at import": ("import_error.py", "ValueError: boom at import"),
    "exception in build function": ("build_error.py", "build_model() raised RuntimeError: cannot build: bad config"),
    "no model found": ("no_model.py", "no model found in no_model.py"),
    "several candidates": ("several.py", "several models: Alpha, Beta"),
    "unknown NAME": ("mlp.py:Nope", "mlp.py has no attribute 'Nope': models defined there: model"),
    "unknown --model": ("mlp.py --model nope", "has no attribute 'nope'"),
    "NAME and --model disagree": ("several.py:Alpha --model Beta", "give the name once"),
    # weights
    "weights missing": ("mlp.py --weights nothing.safetensors", "weights file not found"),
    "weights not safetensors": ("mlp.py --weights mlp.py", "mlp.py is not a readable safetensors file"),
    "weights random bytes": ("mlp.py --weights random.bin.safetensors", "not a readable safetensors file"),
    "weights truncated": ("mlp.py --weights truncated.safetensors", "not a readable safetensors file"),
    "weights empty": ("mlp.py --weights empty.safetensors", "not a readable safetensors file"),
    "weights a directory": ("mlp.py --weights folder.safetensors", "folder.safetensors is a directory"),
    "pickle .pt refused": ("mlp.py --weights checkpoint.pt", "pickle checkpoint, and loading pickle can run"),
    "pickle .bin refused": ("mlp.py --weights checkpoint.bin", "--allow-pickle"),
    "pickle .ckpt refused": ("mlp.py --weights checkpoint.ckpt", "pickle checkpoint"),
    "pickle under a safetensors name": ("mlp.py --weights pickled.safetensors", "pickle checkpoint"),
    "allowed pickle that is garbage": (
        "mlp.py --weights garbage.pt --allow-pickle",
        "cannot load garbage.pt with torch.load(weights_only=True)",
    ),
    "weights of the wrong shape": (
        "mlp.py --weights shape.safetensors",
        "shape mismatch for 0.weight (16, 9) vs model (16, 8)",
    ),
    "missing and unexpected keys": (
        "mlp.py --weights keys.safetensors",
        "missing 3 key(s): 0.bias, 2.weight, 2.bias; unexpected 1 key(s): extra: check the model configuration, "
        "or pass --no-strict",
    ),
    # data
    "data file missing": ("mlp.py --data nothing.safetensors", "data file not found: nothing.safetensors"),
    "data without inputs": ("mlp.py --data no_inputs.safetensors", "no tensor named 'inputs' (found: x)"),
    "data random bytes": ("mlp.py --data random.bin.safetensors", "not a readable safetensors file"),
    "data truncated": ("mlp.py --data data_truncated.safetensors", "not a readable safetensors file"),
    "data a directory": ("mlp.py --data folder.safetensors", "folder.safetensors is a directory"),
    "malformed randn": ("mlp.py --data randn:a,b", "bad shape 'a,b' in --data 'randn:a,b'"),
    "malformed randint": ("mlp.py --data randint:3", "bad --data 'randint:3'"),
    "oversized randn": ("mlp.py --data randn:99999999999,99999999999", "more elements than torch can hold"),
    "unknown data kind": ("mlp.py --data data.csv", "cannot read --data 'data.csv'"),
    "data function missing": ("mlp.py --data data_fns.py:nope", "data_fns.py has no function 'nope'"),
    "data function raises": ("mlp.py --data data_fns.py:broken", "ValueError: no data today"),
    "data function returns no batch": ("mlp.py --data data_fns.py:number", "returned a int"),
    "inputs that do not fit (file)": (
        "mlp.py --data narrow.safetensors",
        "the forward pass failed in 0 (Linear, input (10, 5)): RuntimeError: mat1 and mat2 shapes",
    ),
    "inputs that do not fit (randn)": ("mlp.py --data randn:4,5", "failed in 0 (Linear, input (4, 5))"),
    "forward raises": ("forward_error.py --data randn:4,8", "ValueError: my forward is broken"),
    "forward calls sys.exit": ("forward_exit.py --data randn:4,8", "forward called sys.exit(3)"),
    "forward returns no tensor": ("no_tensor.py --data randn:4,8", "returned a NoneType with no tensor in it"),
    "loss raises": ("mlp.py --data randn:4,8 --loss loss_fns.py:broken", "the loss raised ValueError: loss broke"),
    "non-scalar loss": ("mlp.py --data randn:4,8 --loss loss_fns.py:per_sample", "returned shape (4,), not a scalar"),
    "no trainable parameters": ("frozen.py --data randn:4,8", "Linear has no trainable parameters"),
    "TorchScript model": ("scripted.py --data randn:4,8", "is a TorchScript module (RecursiveScriptModule)"),
    "meta-device parameters": ("on_meta.py --data randn:4,8", "parameter 0.weight is on the meta device"),
    "meta model, weights lacking": (
        "on_meta.py --data randn:4,8 --weights keys.safetensors --no-strict",
        "has no values for 3 tensor(s) the model built on the meta device: 0.bias, 2.weight, 2.bias",
    ),
    "complex parameters": ("complex.py --data randn:4,8", "parameter weight is complex (complex64)"),
    "BatchNorm over 2 values": ("batch_norm.py --data randn:2,8", "1 (BatchNorm1d) normalises 2 values per channel"),
    # user code that tries to end the process: never its own exit code (0 would read as a pass, 1 as findings)
    "sys.exit(0) in --data": ("mlp.py --data data_fns.py:exit_zero", "data_fns.py:exit_zero() called sys.exit(0)"),
    "sys.exit('msg') in --data": (
        "mlp.py --data data_fns.py:exit_message",
        "data_fns.py:exit_message() called sys.exit('no more data')",
    ),
    "sys.exit inside a data generator": (
        "mlp.py --data data_fns.py:exit_in_generator --steps 3",
        "reading batches from data_fns.py:exit_in_generator called sys.exit(0)",
    ),
    "sys.exit in get_batch": ("batch_exit.py", "get_batch() called sys.exit('no batch for you')"),
    "SystemExit(3) in the loss": ("mlp.py --data randn:4,8 --loss loss_fns.py:exits", "the loss called sys.exit(3)"),
    # flags
    "--steps 0": ("mlp.py --steps 0", "--steps must be at least 1, got 0"),
    "--steps negative": ("mlp.py --steps -2", "--steps must be at least 1, got -2"),
    "--steps not a number": ("mlp.py --steps two", "Invalid value for '--steps'"),
    "--train-steps negative": ("mlp.py --train-steps -1", "train steps must be 0 or more"),
    "--batch-size 0": ("mlp.py --batch-size 0", "--batch-size must be at least 1"),
    "--lr 0": ("mlp.py --lr 0", "learning rate must be a positive number"),
    "unknown loss": ("mlp.py --loss hinge", "unknown loss 'hinge'"),
    "unknown format": ("mlp.py --format yaml", "'yaml' is not one of 'table', 'json', 'markdown'"),
    "unknown option": ("mlp.py --bogus", "No such option: --bogus"),
    "unknown --fail-on": ("mlp.py --fail-on vanishing,bogus", "unknown --fail-on kind(s): bogus"),
    "warning above error": ("mlp.py --signal-warning 500", "signal error threshold (400) is below its warning"),
    "negative threshold": ("mlp.py --dead-warning -1", "threshold dead must be a positive number"),
    "fraction above 1": ("mlp.py --saturation-error 2", "saturation thresholds are fractions"),
    "unknown --output type": ("mlp.py --output report.xyz", "unknown report type '.xyz'"),
    "--output folder missing": ("mlp.py --output nowhere/report.json", "folder nowhere does not exist"),
    # running out of memory
    "CUDA out of memory": (
        "oom_cuda.py --data randn:4,8",
        "out of memory (OutOfMemoryError): use a smaller --batch-size",
    ),
    "CPU allocator out of memory": ("oom_cpu.py --data randn:4,8", "out of memory (RuntimeError): use a smaller"),
    "MemoryError": ("memory_error.py --data randn:4,8", "out of memory (MemoryError): use a smaller --batch-size"),
}


def _stderr_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize(("argv", "expected"), list(CASES.values()), ids=list(CASES))
def test_bad_input_exits_2_with_one_line(cli, user_folder: Path, argv: str, expected: str) -> None:
    before = _snapshot(user_folder)
    result = cli("analyze", *argv.split())
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.stdout == ""
    line = _stderr_line(result)
    assert line.startswith("error: ") and expected in line, line
    assert _snapshot(user_folder) == before  # the user's files as they were; no __pycache__, no temp file


def test_debug_adds_the_traceback_and_keeps_the_line(cli, user_folder: Path) -> None:
    result = cli("analyze", "forward_error.py", "--data", "randn:4,8", "--debug")
    assert result.exit_code == 2
    assert "Traceback" in result.stderr and "my forward is broken" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: the model's forward raised ValueError")


def test_ctrl_c_exits_130_with_one_line(cli, user_folder: Path) -> None:
    before = _snapshot(user_folder)
    result = cli("analyze", "interrupted.py", "--data", "randn:4,8")
    assert result.exit_code == 130
    assert _stderr_line(result) == "interrupted"
    assert _snapshot(user_folder) == before


def test_pickle_loads_only_when_allowed(cli, user_folder: Path) -> None:
    result = cli("analyze", "mlp.py", "--weights", "checkpoint.pt", "--allow-pickle", "--format", "json")
    assert result.exit_code == 0, result.output


# -- --output is written atomically ----------------------------------------------------------------------


def _failing_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    """The report stream writes half of the text, then the disk is full."""
    real_open = open

    class HalfWriter:
        def __init__(self, stream: io.TextIOWrapper) -> None:
            self.stream = stream

        def __enter__(self) -> HalfWriter:
            return self

        def __exit__(self, *exc: object) -> None:
            self.stream.close()

        def write(self, text: str) -> int:
            self.stream.write(text[: len(text) // 2])
            self.stream.flush()
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(files_module, "open", lambda *a, **k: HalfWriter(real_open(*a, **k)), raising=False)


@pytest.mark.parametrize("existing", [False, True])
def test_output_failing_midway_leaves_no_partial_file(cli, user_folder: Path, monkeypatch, existing: bool) -> None:
    report = user_folder / "report.json"
    if existing:
        report.write_text('{"previous": "report"}\n')
    before = _snapshot(user_folder)
    _failing_stream(monkeypatch)
    result = cli("analyze", "mlp.py", "--output", "report.json", "--quiet")
    assert result.exit_code == 2
    assert "cannot write --output report.json: No space left on device" in _stderr_line(result)
    assert _snapshot(user_folder) == before  # no half report, no temporary file, the old report intact


def test_output_rendering_failure_leaves_no_file(cli, user_folder: Path, monkeypatch) -> None:
    report = user_folder / "report.md"
    report.write_text("previous report\n")
    before = _snapshot(user_folder)

    def render(*args: object) -> str:
        raise RuntimeError("renderer bug")

    monkeypatch.setattr("gradcheck_cli.render.markdown.render", render)
    result = cli("analyze", "mlp.py", "--output", "report.md", "--quiet")
    assert isinstance(result.exception, RuntimeError)  # a bug in gradcheck keeps its traceback
    assert _snapshot(user_folder) == before


# -- the Python API leaves the model as it found it, also when the run fails -------------------------------


class Net(nn.Module):
    """BatchNorm (buffers), Dropout (mode) and a forward that raises on call `fail_on_call`."""

    def __init__(self, fail_on_call: int = 0, error: BaseException | None = None) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 4))
        self.fail_on_call = fail_on_call
        self.error = error or RuntimeError("fails on this call")
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise self.error
        return self.body(x)


HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
)


def _state(model: nn.Module) -> dict[str, object]:
    """Hooks on modules and parameters, mode flags and buffers: what a failed run must leave unchanged."""
    return {
        "module hooks": [
            (name, attr, list(getattr(module, attr, {})))
            for name, module in model.named_modules()
            for attr in HOOK_DICTS
        ],
        "parameter hooks": [
            (name, list(p._backward_hooks or {}), list(getattr(p, "_post_accumulate_grad_hooks", None) or {}))
            for name, p in model.named_parameters()
        ],
        "modes": [(name, module.training) for name, module in model.named_modules()],
        "buffers": {name: b.clone() for name, b in model.named_buffers()},
    }


def _assert_same_state(before: dict[str, object], after: dict[str, object]) -> None:
    assert after["module hooks"] == before["module hooks"]
    assert after["parameter hooks"] == before["parameter hooks"]
    assert after["modes"] == before["modes"]
    buffers_before, buffers_after = before["buffers"], after["buffers"]
    assert isinstance(buffers_before, dict) and isinstance(buffers_after, dict)
    assert all(torch.equal(buffers_before[k], buffers_after[k]) for k in buffers_before)


def _prepare(model: nn.Module) -> dict[str, torch.Tensor | None]:
    """The caller's own state: a hook of theirs, eval mode on one module, .grad on some parameters."""
    model.body[0].register_forward_hook(lambda module, args, output: None)
    model.body[4].weight.register_hook(lambda grad: grad)
    model.body[3].eval()
    model.body[0].weight.grad = torch.full_like(model.body[0].weight, 0.5)
    model.body[4].bias.grad = torch.ones_like(model.body[4].bias)
    return {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()}


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(10, 8, generator=g), torch.randint(0, 4, (10,), generator=g)


@pytest.mark.parametrize(
    ("make", "raises"),
    [
        (lambda: Net(fail_on_call=2), ModelRunError),  # the forward of the 2nd measured step
        (lambda: Net(fail_on_call=4), ModelRunError),  # after two SGD steps and one measured step
        (lambda: Net(fail_on_call=2, error=torch.OutOfMemoryError("CUDA out of memory")), torch.OutOfMemoryError),
        (lambda: Net(fail_on_call=3, error=KeyboardInterrupt()), KeyboardInterrupt),
    ],
    ids=["forward raises", "after training steps", "out of memory", "ctrl-c"],
)
def test_a_failed_run_leaves_hooks_modes_and_grads_as_found(make, raises) -> None:
    model = make()
    grads = _prepare(model)
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    before = _state(model)
    with pytest.raises(raises):
        gradcheck_cli.analyze(model, _batch(), steps=3, train_steps=2 if model.fail_on_call == 4 else 0)
    _assert_same_state(before, _state(model))
    for name, p in model.named_parameters():
        expected = grads[name]
        assert (p.grad is None) if expected is None else torch.equal(p.grad, expected), name
        assert torch.equal(p, weights[name]), name  # SGD steps taken before the failure are undone


def test_a_failing_loss_leaves_the_model_as_found() -> None:
    model = Net()
    grads = _prepare(model)
    before = _state(model)
    calls = []

    def loss(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("loss fails on the second step")
        return nn.functional.cross_entropy(output, targets)

    with pytest.raises(ModelRunError, match="loss fails on the second step"):
        gradcheck_cli.analyze(model, _batch(), loss, steps=3)
    _assert_same_state(before, _state(model))
    for name, p in model.named_parameters():
        expected = grads[name]
        assert (p.grad is None) if expected is None else torch.equal(p.grad, expected), name


def test_gradients_that_cannot_be_written_are_one_line(cli, user_folder: Path, monkeypatch) -> None:
    before = _snapshot(user_folder)
    real_fdopen = os.fdopen

    class FullDisk:
        """A binary stream on a disk that fills up at the first write."""

        def __init__(self, stream: io.BufferedWriter) -> None:
            self.stream = stream

        def write(self, data: bytes) -> int:
            raise OSError(28, "No space left on device")

        def close(self) -> None:
            self.stream.close()

    monkeypatch.setattr("gradcheck_cli.gradsave.os.fdopen", lambda *a, **k: FullDisk(real_fdopen(*a, **k)))
    result = cli("analyze", "mlp.py", "--save-grads", "grads.safetensors", "--quiet")
    assert result.exit_code == 2
    assert "cannot write --save-grads grads.safetensors: No space left on device" in _stderr_line(result)
    assert _snapshot(user_folder) == before  # the temporary data file is gone too


def test_a_plot_that_cannot_be_written_is_one_line(cli, user_folder: Path, monkeypatch) -> None:
    pytest.importorskip("matplotlib")
    before = _snapshot(user_folder)

    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("gradcheck_cli.render.plot.save", full_disk)
    result = cli("analyze", "mlp.py", "--plot", "flow.png", "--quiet")
    assert result.exit_code == 2
    assert "cannot write --plot flow.png: No space left on device" in _stderr_line(result)
    assert _snapshot(user_folder) == before


@pytest.mark.parametrize(
    ("argv", "victim", "what"),
    [
        ("mlp.py -w weights.safetensors --save-grads weights.safetensors", "weights.safetensors", "--weights file"),
        ("mlp.py -d data.safetensors --save-grads data.safetensors", "data.safetensors", "--data file"),
        ("mlp.py -d ./data.safetensors --save-grads sub/../data.safetensors", "data.safetensors", "--data file"),
        ("mlp.py -d randn:4,8 --save-grads link.safetensors", "weights.safetensors", "--weights file"),
        ("mlp.py -d randn:4,8 --save-grads hard.safetensors", "weights.safetensors", "--weights file"),
    ],
    ids=["save-grads onto weights", "save-grads onto data", "spelt another way", "via symlink", "via hard link"],
)
def test_no_output_option_may_overwrite_an_input(cli, user_folder: Path, argv: str, victim: str, what: str) -> None:
    """Writing gradients over the weights (mode 0600 turning 0644) must not happen, however the path is spelt."""
    (user_folder / "sub").mkdir()
    (user_folder / "link.safetensors").symlink_to(user_folder / "weights.safetensors")
    os.link(user_folder / "weights.safetensors", user_folder / "hard.safetensors")
    os.chmod(user_folder / "weights.safetensors", 0o600)
    if "link" in argv or "hard" in argv:
        argv = argv.replace("-d randn:4,8", "-w weights.safetensors -d randn:4,8")
    before = _snapshot(user_folder)
    mode = os.stat(user_folder / victim).st_mode
    result = cli("analyze", *argv.split(), "--quiet")
    assert result.exit_code == 2, result.output
    line = _stderr_line(result)
    assert line.startswith("error: ") and f"is the {what} this run reads" in line, line
    assert _snapshot(user_folder) == before
    assert os.stat(user_folder / victim).st_mode == mode


CHATTY = HEADER + (
    "print('hello from import')\n"
    "class Net(nn.Module):\n"
    "    def __init__(self):\n"
    "        super().__init__()\n"
    "        self.fc = nn.Linear(8, 2)\n"
    "    def forward(self, x):\n"
    "        print('hello from forward')\n"
    "        return self.fc(x)\n"
    "model = Net()\n"
)


def test_the_models_prints_never_mix_with_the_json_document(cli, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "chatty.py").write_text(CHATTY)
    result = cli("analyze", "chatty.py", "--data", "randn:4,8", "--format", "json")
    import json

    assert json.loads(result.stdout)["schema"] == "gradcheck.report/1"
    assert "hello from import" in result.stderr and "hello from forward" in result.stderr


def test_a_model_that_changes_directory_does_not_move_the_outputs(cli, tmp_path: Path, monkeypatch) -> None:
    """Relative --output, --plot and --save-grads are taken from where gradcheck started, not from wherever
    the model file moved the process."""
    pytest.importorskip("matplotlib")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "wanderer.py").write_text(HEADER + f"import os\nos.chdir({str(elsewhere)!r})\n" + MLP)
    result = cli(
        "analyze", "wanderer.py", "--data", "randn:4,8", "--output", "r.json", "--plot", "p.png",
        "--save-grads", "g.safetensors", "--quiet",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert {p.name for p in tmp_path.iterdir()} >= {"r.json", "p.png", "g.safetensors"}
    assert list(elsewhere.iterdir()) == []


def test_lazy_imports_of_the_model_write_no_bytecode(cli, tmp_path: Path, monkeypatch) -> None:
    """A sibling module imported in forward and in get_batch, after TARGET's own import: still no __pycache__."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "helper_fwd.py").write_text("def scale(x):\n    return x * 1.0\n")
    (tmp_path / "helper_data.py").write_text("import torch\ndef batch():\n    return torch.randn(4, 8)\n")
    (tmp_path / "lazy.py").write_text(
        HEADER
        + "class Net(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        + "        self.fc = nn.Linear(8, 2)\n    def forward(self, x):\n        import helper_fwd\n"
        + "        return self.fc(helper_fwd.scale(x))\nmodel = Net()\n"
        + "def get_batch():\n    import helper_data\n    return helper_data.batch()\n"
    )
    result = cli("analyze", "lazy.py", "--quiet")
    assert result.exit_code == 0, result.output
    assert not list(tmp_path.rglob("__pycache__"))


@pytest.mark.parametrize("name", ["safetensors.py", "rich.py"])
def test_a_users_file_named_like_a_library_does_not_shadow_gradchecks_imports(tmp_path: Path, name: str) -> None:
    """In a fresh process, where gradcheck imports these libraries only after the model's folder is on
    sys.path (to load the weights, to draw the table)."""
    import subprocess

    (tmp_path / name).write_text("raise ImportError('this is the user file, not the library')\n")
    (tmp_path / "mlp.py").write_text(HEADER + MLP)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    (tmp_path / "w.safetensors").write_bytes(save(model.state_dict()))
    command = [sys.executable, "-m", "gradcheck_cli", "analyze", "mlp.py", "-w", "w.safetensors", "-d", "randn:4,8"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "gradcheck: Sequential" in result.stdout


def test_an_empty_batch_is_bad_input_not_a_nan_model() -> None:
    model = nn.Sequential(nn.Linear(8, 4))
    for batch in ((torch.randn(0, 8), torch.randint(0, 4, (0,))), torch.randn(0, 8)):
        with pytest.raises(gradcheck_cli.UserError, match="batch 1 holds 0 samples"):
            gradcheck_cli.analyze(model, batch)


def test_a_meta_device_model_runs_once_its_weights_are_loaded(cli, user_folder: Path) -> None:
    """Built on the meta device to be loaded (the big-model pattern): with every tensor in the weights file it
    is the same model as mlp.py with those weights, so the same numbers."""
    code, on_meta = cli.json("analyze", "on_meta.py", "--data", "data.safetensors", "--weights", "weights.safetensors")
    assert code == 0
    _, plain = cli.json("analyze", "mlp.py", "--data", "data.safetensors", "--weights", "weights.safetensors")
    assert [layer["grad_norm"] for layer in on_meta["layers"]] == [layer["grad_norm"] for layer in plain["layers"]]


def _gradcheck(*argv: str, cwd: Path, stdout: Any = subprocess.PIPE) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "gradcheck_cli", *argv]
    return subprocess.run(command, cwd=cwd, stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=120)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
@pytest.mark.parametrize(("name", "argv"), [("w.safetensors", ("--weights",)), ("d.safetensors", ("--data",))])
def test_a_pipe_given_as_an_input_is_refused_not_read_until_it_hangs(tmp_path: Path, name: str, argv: tuple) -> None:
    (tmp_path / "mlp.py").write_text(HEADER + MLP)
    os.mkfifo(tmp_path / name)
    result = _gradcheck("analyze", "mlp.py", *argv, name, cwd=tmp_path)  # before the fix: hung (timeout)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"error: {'weights' if 'weights' in argv[0] else 'data'} file {name} is not a regular file (a pipe, socket "
        "or device): gradcheck reads inputs more than once: copy it to a regular file first"
    )


def test_a_pyproject_that_is_not_utf8_is_one_line(cli, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mlp.py").write_text(HEADER + MLP)
    (tmp_path / "pyproject.toml").write_bytes(b"[tool.gradcheck]\nsteps = 2  # caf\xe9\n")
    before = _snapshot(tmp_path)
    result = cli("analyze", "mlp.py", "--data", "randn:4,8")
    assert result.exit_code == 2
    assert "not UTF-8 (byte 0xe9 at offset 33): save it as UTF-8" in _stderr_line(result)
    assert _snapshot(tmp_path) == before


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
@pytest.mark.parametrize("fmt", ["table", "json"])
def test_a_full_disk_on_stdout_is_one_line_and_exit_2(tmp_path: Path, fmt: str) -> None:
    (tmp_path / "mlp.py").write_text(HEADER + MLP)
    with open("/dev/full", "w") as full:
        result = _gradcheck("analyze", "mlp.py", "--data", "randn:4,8", "--format", fmt, cwd=tmp_path, stdout=full)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: cannot write the report to stdout (No space left on device): free space where stdout goes, "
        "or use --output FILE"
    )


@pytest.mark.parametrize(
    "data",
    [
        lambda: (torch.randn(4, 8), torch.randint(0, 4, (4,))),  # one batch, repeated
        lambda: iter(lambda: torch.randn(4, 8), None),  # an endless generator of batches
        lambda: [torch.randn(4, 8) for _ in range(3)],  # a list, cycled
        lambda: None,  # synthesised for the first layer
    ],
    ids=["one batch", "endless iterator", "list", "synthesised"],
)
def test_batches_for_a_billion_steps_are_made_as_the_steps_read_them(data) -> None:
    """Before, every batch was made up front: --steps 1000000000 took 20 GB before its first step."""
    import tracemalloc

    from gradcheck_cli.api import prepare
    from gradcheck_cli.options import Options

    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    tracemalloc.start()
    try:
        setup, size, _ = prepare(model, data(), "auto", Options(steps=10**9), None)
        for step in range(5):
            assert setup.batches[step].size in (4, 32)  # 32: --batch-size's default, for synthesised inputs
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(setup.batches) == 10**9 and size in (4, 32)
    assert peak < 2**20  # a megabyte: the first batch and the one being read, not 10^9 of anything


def test_a_random_data_spec_for_a_billion_steps_is_made_lazily() -> None:
    import tracemalloc

    from gradcheck_cli.resolve.data import load_data
    from gradcheck_cli.resolve.specs import parse_data_spec

    tracemalloc.start()
    try:
        batches, _ = load_data(parse_data_spec("randn:4,8"), 10**9, 32, seed=0)
        first, second = batches[0].args[0], batches[1].args[0]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    generator = torch.Generator().manual_seed(0)  # the same draws as made up front before
    assert torch.equal(first, torch.randn(4, 8, generator=generator))
    assert torch.equal(second, torch.randn(4, 8, generator=generator))
    assert peak < 2**20


SLOW = HEADER + (
    "import time\n"
    "class Slow(nn.Module):\n"
    "    def __init__(self):\n"
    "        super().__init__()\n"
    "        self.fc = nn.Linear(8, 4)\n"
    "    def forward(self, x):\n"
    "        time.sleep(0.2)\n"
    "        return self.fc(x)\n"
    "model = Slow()\n"
)


@pytest.mark.skipif(not hasattr(signal, "SIGTERM") or sys.platform == "win32", reason="POSIX signals")
def test_sigterm_during_save_grads_leaves_no_temporary_file(tmp_path: Path) -> None:
    """A cancelled CI job gets SIGTERM: the run stops with exit 143 and one line, and the temporary data file
    of --save-grads is gone (before, SIGTERM killed the process with the file left behind)."""
    (tmp_path / "slow.py").write_text(SLOW)
    command = [sys.executable, "-m", "gradcheck_cli", "analyze", "slow.py", "--data", "randn:4,8", "--steps", "500"]
    command += ["--save-grads", "g.safetensors", "--quiet"]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not any(p.name.startswith(".g.safetensors.") for p in tmp_path.iterdir()):
            assert process.poll() is None and time.monotonic() < deadline, "the run never started writing"
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 143
    assert stderr.strip() == "terminated (SIGTERM); temporary files removed"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slow.py"]


# -- issue 14, case 16: the smaller ones -------------------------------------------------------------------


def test_a_bf16_model_without_data_gets_bf16_inputs(cli, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bf16.py").write_text(
        HEADER + "model = nn.Sequential(nn.Linear(8, 16), nn.ReLU()).to(torch.bfloat16)\n"
    )
    code, report = cli.json("analyze", "bf16.py")
    assert code == 0
    assert any("in bfloat16, the model's dtype" in note for note in report["notes"])


def test_a_dataclass_output_without_logits_is_taken_by_its_first_tensor() -> None:
    @dataclasses.dataclass
    class Out:
        scores: torch.Tensor
        step: int = 0

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> Out:
            return Out(self.fc(x))

    torch.manual_seed(0)
    model, x, y = Net(), torch.randn(6, 8), torch.randint(0, 4, (6,))
    report = gradcheck_cli.analyze(model, (x, y), steps=1)
    assert report.loss[0] == pytest.approx(float(nn.functional.cross_entropy(model.fc(x), y).detach()), rel=1e-6)


def test_a_reentrant_checkpoint_is_one_call_with_the_gradient_autograd_gives() -> None:
    from torch.utils.checkpoint import checkpoint

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first, self.inner, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(checkpoint(self.inner, self.first(x), use_reentrant=True))

    torch.manual_seed(0)
    model, x, y = Net(), torch.randn(6, 8), torch.randint(0, 4, (6,))
    report = gradcheck_cli.analyze(model, (x, y), steps=1)
    assert report.layer("inner").calls == 1  # its forward ran again inside backward: not a second call
    nn.functional.cross_entropy(model(x), y).backward()
    expected = torch.cat([p.grad.reshape(-1) for p in model.inner.parameters()]).norm()
    assert report.layer("inner").grad_norm == pytest.approx(float(expected), rel=1e-5)


def test_a_boolean_for_a_number_in_the_config_is_refused(cli, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mlp.py").write_text(HEADER + MLP)
    (tmp_path / "pyproject.toml").write_text("[tool.gradcheck]\nsteps = true\n")
    result = cli("analyze", "mlp.py", "--data", "randn:4,8")
    assert result.exit_code == 2
    assert "[tool.gradcheck] steps = true: true/false where a value is expected" in _stderr_line(result)
    (tmp_path / "pyproject.toml").write_text("[tool.gradcheck]\neval = true\n")  # a flag takes a boolean
    code, report = cli.json("analyze", "mlp.py", "--data", "randn:4,8")
    assert code == 0 and report["mode"] == "eval"


def test_analyze_works_under_no_grad_and_leaves_the_callers_grad_mode_and_rng() -> None:
    x = torch.randn(4, 8)
    model = nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.Linear(8, 2))  # materialised inside: draws numbers
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    with torch.no_grad():
        report = gradcheck_cli.analyze(model, x, steps=1)
        assert not torch.is_grad_enabled()
    assert torch.equal(torch.rand(3), expected)  # the caller's RNG stream as if nothing had run
    assert all(layer.grad_norm for layer in report.layers)


def test_a_build_function_that_needs_arguments_says_how_to_pass_them(cli, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "deep.py").write_text(HEADER + "def build_model(depth, width):\n    return nn.Linear(8, 2)\n")
    result = cli("analyze", "deep.py", "--data", "randn:4,8")
    assert result.exit_code == 2
    assert _stderr_line(result).endswith(
        "def small_model(): return build_model(depth=..., width=...), and analyze FILE:small_model"
    )
