"""Data: --data specs and Python objects -> a list of Batch.

A batch is a tensor (the inputs), a tuple or list (inputs, targets), or a dict passed to the model as keyword
arguments (as model-hub models expect; its "labels", if any, also serve as targets).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradcheck_cli.errors import UserError
from gradcheck_cli.loading import Target, file_function, import_target, parse_target

if TYPE_CHECKING:
    import torch
    from torch import nn

DEFAULT_BATCH_SIZE = 32
SYNTHETIC_SEQUENCE_LENGTH = 16  # token ids per row for an embedding-first model without --data
SYNTHETIC_IMAGE_SIZE = 32  # spatial size per dimension for a conv-first model without --data
MAX_INT64 = 2**63 - 1  # torch sizes and integer bounds are int64: larger ones overflow inside torch


@dataclass
class Batch:
    """One batch, ready to call the model with: model(*args, **kwargs); targets for the loss (or None)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    targets: Any = None

    def to(self, device: torch.device) -> Batch:
        return Batch(_move(self.args, device), _move(self.kwargs, device), _move(self.targets, device))

    @property
    def size(self) -> int | None:
        """Examples in the batch: the first dimension of the first tensor input."""
        from gradcheck_cli.probe import first_tensor

        first = first_tensor((self.args, self.kwargs))
        return int(first.shape[0]) if first is not None and first.dim() else None


def _move(value: Any, device: torch.device) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {k: _move(v, device) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return type(value)(_move(v, device) for v in value)
    return value


def to_batch(obj: Any) -> Batch:
    """Interpret one batch object by the documented convention."""
    import torch

    if isinstance(obj, Batch):
        return obj
    if isinstance(obj, torch.Tensor):
        return Batch((obj,))
    if isinstance(obj, Mapping):
        kwargs = dict(obj)
        if not kwargs:
            raise UserError("a batch is an empty dict", "return the model's keyword arguments, e.g. {'input_ids': ...}")
        return Batch((), kwargs, kwargs.get("labels"))
    if isinstance(obj, tuple | list):
        if len(obj) == 0:
            raise UserError("a batch is an empty tuple", "return (inputs, targets) or just inputs")
        if len(obj) > 2:
            raise UserError(
                f"a batch has {len(obj)} items; gradcheck reads a tuple as (inputs, targets)",
                "return ((input1, input2), targets) for several inputs, or a dict of keyword arguments",
            )
        inputs = obj[0]
        targets = obj[1] if len(obj) == 2 else None
        if isinstance(inputs, Mapping):
            return Batch((), dict(inputs), targets)
        if isinstance(inputs, tuple | list):
            return Batch(tuple(inputs), {}, targets)
        return Batch((inputs,), {}, targets)
    raise UserError(
        f"a batch is a {type(obj).__name__}",
        "a batch must be a tensor, a tuple (inputs, targets) or a dict of keyword arguments",
    )


def is_single_batch(obj: Any) -> bool:
    """A tensor, a tuple (a record: inputs, targets) or a dict is one batch; a list, generator or DataLoader is
    a collection of batches (inside a collection, a list [inputs, targets] is a batch, as DataLoader yields)."""
    import torch

    return isinstance(obj, torch.Tensor | Mapping | tuple | Batch)


def collect_batches(obj: Any, count: int, origin: str = "the data", single: bool | None = None) -> list[Batch]:
    """`count` batches from one batch or an iterable of batches (DataLoader, generator, list), cycling when the
    iterable holds fewer; an infinite iterable is read only as far as needed. `single` overrides the guess."""
    if single if single is not None else is_single_batch(obj):
        return [to_batch(obj)] * count
    if not isinstance(obj, Iterable):
        raise UserError(
            f"{origin} returned a {type(obj).__name__}",
            "return one batch (tensor, (inputs, targets) or dict) or an iterable of batches",
        )
    try:
        taken = list(itertools.islice(iter(obj), count))
    except UserError:
        raise
    except Exception as exc:
        raise UserError(
            f"reading batches from {origin} raised {type(exc).__name__}: {exc}",
            "fix the data function (--debug shows the traceback)",
        ) from exc
    if not taken:
        raise UserError(f"{origin} yielded no batches", "make sure the data source is not empty")
    batches = [to_batch(b) for b in taken]
    return [batches[i % len(batches)] for i in range(count)]


# -- --data specs ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataSpec:
    """A parsed --data value."""

    kind: str  # "safetensors" | "python" | "randn" | "randint"
    text: str
    path: str | None = None
    target: Target | None = None
    shape: tuple[int, ...] = ()
    high: int = 0


def _parse_shape(text: str, spec: str) -> tuple[int, ...]:
    parts = [p.strip() for p in text.split(",")]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise UserError(
            f"bad shape '{text}' in --data '{spec}'",
            "give positive integers separated by commas, batch first, e.g. randn:32,784",
        )
    if math.prod(shape) > MAX_INT64:
        raise UserError(
            f"shape '{text}' in --data '{spec}' has more elements than torch can hold", "use a smaller shape"
        )
    return shape


def parse_data_spec(spec: str) -> DataSpec:
    """Parse --data: FILE.safetensors, FILE.py:FN (or module:FN), randn:B,D1,..., randint:HIGH:B,T."""
    text = spec.strip()
    if text.startswith("randn:"):
        return DataSpec("randn", text, shape=_parse_shape(text[len("randn:") :], spec))
    if text.startswith("randint:"):
        high_text, sep, shape_text = text[len("randint:") :].partition(":")
        try:
            high = int(high_text)
        except ValueError:
            high = 0
        if not sep or not 0 < high <= MAX_INT64:
            raise UserError(
                f"bad --data '{spec}'",
                "write randint:HIGH:B,T with HIGH the number of ids (e.g. the vocabulary size), e.g. randint:1000:8,32",
            )
        return DataSpec("randint", text, shape=_parse_shape(shape_text, spec), high=high)
    if text.endswith(".safetensors"):
        return DataSpec("safetensors", text, path=text)
    if ":" in text:
        target = parse_target(text, what="--data")
        if target.name is None:
            raise UserError(f"--data '{spec}' names no function", "write FILE.py:FN")
        return DataSpec("python", text, target=target)
    raise UserError(
        f"cannot read --data '{spec}'",
        "use FILE.safetensors, FILE.py:FN, randn:B,D1,... or randint:HIGH:B,T",
    )


def load_data(
    spec: DataSpec, count: int, batch_size: int, seed: int, default_module: Any = None
) -> tuple[list[Batch], list[str]]:
    """Batches for `count` steps from a --data spec; also notes for the report."""
    import torch

    if spec.kind in ("randn", "randint"):
        generator = torch.Generator().manual_seed(seed)
        batches = []
        for _ in range(count):
            if spec.kind == "randn":
                batches.append(Batch((torch.randn(spec.shape, generator=generator),)))
            else:
                batches.append(Batch((torch.randint(0, spec.high, spec.shape, generator=generator),)))
        return batches, []
    if spec.kind == "safetensors":
        return _safetensors_batches(Path(spec.path or ""), count, batch_size)
    assert spec.target is not None
    module = import_target(spec.target)
    function = getattr(module, spec.target.name or "", None)
    if function is None or not callable(function):
        raise UserError(f"{spec.target.source} has no function '{spec.target.name}'", "check the name after ':'")
    return collect_batches(_call(function, spec.text), count, spec.text), []


def _call(function: Callable[[], Any], label: str) -> Any:
    try:
        return function()
    except UserError:
        raise
    except Exception as exc:
        raise UserError(
            f"{label}() raised {type(exc).__name__}: {exc}",
            "fix the data function (--debug shows the traceback)",
        ) from exc


def _safetensors_batches(path: Path, count: int, batch_size: int) -> tuple[list[Batch], list[str]]:
    from safetensors.torch import load_file

    if not path.exists():
        raise UserError(f"data file not found: {path}", "check the path")
    if path.is_dir():
        raise UserError(f"{path} is a directory", "give the .safetensors file itself")
    try:
        tensors = load_file(str(path))
    except Exception as exc:
        raise UserError(
            f"{path.name} is not a readable safetensors file ({exc})",
            "write it with safetensors.torch.save_file({'inputs': ..., 'targets': ...}, path)",
        ) from exc
    if "inputs" not in tensors:
        found = ", ".join(sorted(tensors)) or "nothing"
        raise UserError(
            f"{path.name} has no tensor named 'inputs' (found: {found})",
            "save the model inputs under the key 'inputs' (and optionally 'targets')",
        )
    inputs = tensors["inputs"]
    targets = tensors.get("targets")
    if inputs.dim() == 0:
        raise UserError(f"'inputs' in {path.name} is a scalar", "the first dimension must index samples")
    if targets is not None and (targets.dim() == 0 or targets.shape[0] != inputs.shape[0]):
        raise UserError(
            f"'targets' in {path.name} has {tuple(targets.shape)} but 'inputs' has {tuple(inputs.shape)}",
            "both need the same first dimension (one target per sample)",
        )
    total = inputs.shape[0]
    batches = []
    starts = range(0, total, batch_size)
    for start in itertools.islice(itertools.cycle(starts), count):
        stop = min(start + batch_size, total)
        batches.append(Batch((inputs[start:stop],), {}, None if targets is None else targets[start:stop]))
    notes = []
    ignored = sorted(set(tensors) - {"inputs", "targets"})
    if ignored:
        notes.append(f"{path.name}: tensors other than inputs/targets were ignored: {', '.join(ignored)}")
    if total < count * batch_size:
        notes.append(f"{path.name} holds {total} samples; batches were reused to run {count} steps")
    return batches, notes


# -- without --data ----------------------------------------------------------------------------------------


def model_file_batches(module: Any, count: int) -> list[Batch] | None:
    """Batches from the model file's get_batch() (one batch) or batches() (an iterable), if it defines one."""
    if module is None:
        return None
    get_batch = file_function(module, "get_batch")
    if get_batch is not None:
        return collect_batches(_call(get_batch, "get_batch"), count, "get_batch()", single=True)
    batches = file_function(module, "batches")
    if batches is not None:
        return collect_batches(_call(batches, "batches"), count, "batches()", single=False)
    return None


def synthetic_batches(model: nn.Module, count: int, batch_size: int, seed: int) -> tuple[list[Batch], str]:
    """Random inputs shaped for the model's first parameter layer, when that layer says what it takes.

    Returns the batches and a description for the report. Raises UserError when the first layer does not
    determine the input (then the user must pass --data).
    """
    import torch
    from torch import nn

    first = next((m for m in model.modules() if any(True for _ in m.parameters(recurse=False))), None)
    generator = torch.Generator().manual_seed(seed)
    make: Callable[[], torch.Tensor]
    if isinstance(first, nn.Linear):
        shape: tuple[int, ...] = (batch_size, first.in_features)
        description = f"randn:{','.join(map(str, shape))} (from {type(first).__name__}.in_features)"

        def make() -> torch.Tensor:
            return torch.randn(shape, generator=generator)
    elif isinstance(first, nn.modules.conv._ConvNd):
        spatial = (SYNTHETIC_IMAGE_SIZE,) * (first.weight.dim() - 2)
        shape = (batch_size, first.in_channels, *spatial)
        description = f"randn:{','.join(map(str, shape))} (from {type(first).__name__}.in_channels)"

        def make() -> torch.Tensor:
            return torch.randn(shape, generator=generator)
    elif isinstance(first, nn.Embedding | nn.EmbeddingBag):
        shape = (batch_size, SYNTHETIC_SEQUENCE_LENGTH)
        high = first.num_embeddings
        description = f"randint:{high}:{batch_size},{SYNTHETIC_SEQUENCE_LENGTH} (from Embedding.num_embeddings)"

        def make() -> torch.Tensor:
            return torch.randint(0, high, shape, generator=generator)
    elif isinstance(first, nn.RNNBase):
        length = SYNTHETIC_SEQUENCE_LENGTH
        shape = (batch_size, length, first.input_size) if first.batch_first else (length, batch_size, first.input_size)
        description = f"randn:{','.join(map(str, shape))} (from {type(first).__name__}.input_size)"

        def make() -> torch.Tensor:
            return torch.randn(shape, generator=generator)
    else:
        kind = type(first).__name__ if first is not None else "no layer with parameters"
        raise UserError(
            f"cannot tell what input the model takes (its first layer is {kind})",
            "pass --data, e.g. --data randn:32,3,224,224, or define get_batch() in the model file",
        )
    return [Batch((make(),)) for _ in range(count)], description
