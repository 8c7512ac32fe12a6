"""Data: --data specs and Python objects -> a list of Batch.

A batch is a tensor (the inputs), a tuple or list (inputs, targets), or a dict passed to the model as keyword
arguments (as model-hub models expect; its "labels", if any, also serve as targets).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradcheck_cli.batch import Batch, Batches
from gradcheck_cli.errors import UserError, exited
from gradcheck_cli.files import input_file
from gradcheck_cli.resolve.modules import file_function, function_in
from gradcheck_cli.resolve.specs import DataSpec

if TYPE_CHECKING:
    import torch
    from torch import nn

SYNTHETIC_SEQUENCE_LENGTH = 16  # token ids per row for an embedding-first model without --data
SYNTHETIC_IMAGE_SIZE = 32  # spatial size per dimension for a conv-first model without --data


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


def collect_batches(obj: Any, count: int, origin: str = "the data", single: bool | None = None) -> Batches:
    """`count` batches from one batch or an iterable of batches (DataLoader, generator, list), read as the steps
    ask for them and cycled when the iterable holds fewer; `single` overrides the guess. The first batch is read
    here, so an empty or broken source fails before any pass."""
    if isinstance(obj, Batches) and len(obj) >= count:
        return obj
    if single if single is not None else is_single_batch(obj):
        return Batches(count, itertools.repeat(to_batch(obj), count))
    if not isinstance(obj, Iterable):
        raise UserError(
            f"{origin} returned a {type(obj).__name__}",
            "return one batch (tensor, (inputs, targets) or dict) or an iterable of batches",
        )
    batches = Batches(count, _cycled(obj, f"reading batches from {origin}"))
    try:
        batches[0]
    except StopIteration:
        raise UserError(f"{origin} yielded no batches", "make sure the data source is not empty") from None
    return batches


# Batches kept for cycling a one-shot iterable (a generator) that ends before the steps do: enough to cycle any
# data set a short check reads, bounded so that an endless generator read for 10^9 steps keeps no more.
CYCLED = 256


def _cycled(obj: Iterable[Any], where: str) -> Iterator[Batch]:
    """The iterable's batches, then again: a re-iterable one (a list, a DataLoader) is iterated anew, a
    one-shot one (a generator) cycles over the first CYCLED batches it gave."""
    kept: list[Batch] = []
    while True:
        iterator = _call(lambda: iter(obj), where)
        one_shot = iterator is obj
        given = 0
        for batch in _read(iterator, where):
            given += 1
            if one_shot and len(kept) < CYCLED:
                kept.append(batch)
            yield batch
        if one_shot:
            yield from itertools.cycle(kept) if kept else ()
            return
        if not given:
            return


def _read(iterator: Iterator[Any], where: str) -> Iterator[Batch]:
    end = object()
    while (item := _call(lambda: next(iterator, end), where)) is not end:
        yield to_batch(item)


def load_data(spec: DataSpec, count: int, batch_size: int, seed: int) -> tuple[Batches, list[str]]:
    """Batches for `count` steps from a --data spec; also notes for the report."""
    import torch

    if spec.kind in ("randn", "randint"):
        generator = torch.Generator().manual_seed(seed)

        def random() -> Iterator[Batch]:
            for _ in range(count):
                if spec.kind == "randn":
                    yield Batch((torch.randn(spec.shape, generator=generator),))
                else:
                    yield Batch((torch.randint(0, spec.high, spec.shape, generator=generator),))

        return Batches(count, random()), []
    if spec.kind == "safetensors":
        return _safetensors_batches(Path(spec.path or ""), count, batch_size)
    if spec.kind == "text":
        raise UserError(
            f"--data {spec.text}: text is tokenised by an hf: model's own tokenizer",
            "give TARGET as hf:DIR (a directory with the tokenizer), or --data FILE.safetensors / FILE.py:FN",
        )
    assert spec.target is not None
    function = function_in(spec.target)
    return collect_batches(_call(function, f"{spec.text}()"), count, spec.text), []


def _call(function: Callable[[], Any], where: str) -> Any:
    """The user's data code run, its exceptions and exits turned into one line naming `where`."""
    try:
        return function()
    except UserError:
        raise
    except SystemExit as exc:
        raise exited(exc, where) from exc
    except Exception as exc:
        raise UserError(
            f"{where} raised {type(exc).__name__}: {exc}",
            "fix the data function (--debug shows the traceback)",
        ) from exc


def _safetensors_batches(path: Path, count: int, batch_size: int) -> tuple[Batches, list[str]]:
    from safetensors.torch import load_file

    input_file(path, "data file", "give the .safetensors file itself")
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
    starts = range(0, total, batch_size)
    batches = Batches(
        count,
        (
            Batch(
                (inputs[start : start + batch_size],),
                {},
                None if targets is None else targets[start : start + batch_size],
            )
            for start in itertools.islice(itertools.cycle(starts), count)
        ),
    )
    notes = []
    ignored = sorted(set(tensors) - {"inputs", "targets"})
    if ignored:
        notes.append(f"{path.name}: tensors other than inputs/targets were ignored: {', '.join(ignored)}")
    if total < count * batch_size:
        notes.append(f"{path.name} holds {total} samples; batches were reused to run {count} steps")
    return batches, notes


def model_file_batches(module: Any, count: int) -> Batches | None:
    """Batches from the model file's get_batch() (one batch) or batches() (an iterable), if it defines one."""
    if module is None:
        return None
    get_batch = file_function(module, "get_batch")
    if get_batch is not None:
        return collect_batches(_call(get_batch, "get_batch()"), count, "get_batch()", single=True)
    batches = file_function(module, "batches")
    if batches is not None:
        return collect_batches(_call(batches, "batches()"), count, "batches()", single=False)
    return None


def synthetic_batches(model: nn.Module, count: int, batch_size: int, seed: int) -> tuple[Batches, str]:
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
    weight = next(first.parameters(), None)
    dtype = weight.dtype if weight is not None and weight.dtype.is_floating_point else None
    if dtype is not None and dtype != torch.float32 and not isinstance(first, nn.Embedding | nn.EmbeddingBag):
        description += f" in {str(dtype).removeprefix('torch.')}, the model's dtype"  # a bf16 model reads bf16
        return Batches(count, (Batch((make().to(dtype),)) for _ in range(count))), description
    return Batches(count, (Batch((make(),)) for _ in range(count))), description
