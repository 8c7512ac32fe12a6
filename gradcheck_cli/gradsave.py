"""--save-grads: the measured gradients, every layer and step, in one safetensors file.

safetensors' own `save_file` needs numpy, which gradcheck does not depend on, and holds every tensor in
memory until the end. The format is simple enough to write directly (https://github.com/huggingface/safetensors):

    8 bytes: N, the header's length (little-endian u64)
    N bytes: JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}
    the tensors' raw bytes, little-endian, at those offsets

Gradients are copied to the CPU one tensor at a time and appended to a temporary file beside the target; the
header, known only at the end, is written in front when the run finishes and the file renamed into place. So
memory holds one gradient at a time, and a run that fails leaves no half-written file.

Keys are `step{S}/{layer}/{parameter}` (parameter as named inside its layer, e.g. `step0/net.fc1/weight`);
the metadata entry of the same name is JSON: {"step", "layer", "parameter" (the name named_parameters()
gives), "layers" (every layer that owns the tensor: tied weights are saved once, under the first)}.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import sys
import tempfile
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING

import torch

from gradcheck_cli.files import check_file_option, replace_atomic, writing

if TYPE_CHECKING:
    from gradcheck_cli.layers import LayerSpec

FORMAT = "gradcheck.grads/1"

DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
}


def check_path(path: Path) -> None:
    """Refuse a bad --save-grads path before any pass runs."""
    check_file_option(
        "--save-grads",
        path,
        (".safetensors",),
        ("not a .safetensors file", "name it e.g. grads.safetensors"),
        "grads.safetensors",
    )


def layer_label(name: str) -> str:
    """A layer's name in keys; the root module (name "") is "(model)", as the table shows it."""
    return name or "(model)"


class GradientWriter:
    """Use as `with GradientWriter(path, metadata) as writer: writer.add_step(step, layers)`.

    On a clean exit the file appears at `path`; on an exception nothing does.
    """

    def __init__(
        self,
        path: Path,
        metadata: dict[str, str] | None = None,
        target: Path | None = None,
        option: str = "--save-grads",
    ) -> None:
        self.path = path  # as the user gave it, for messages
        self.option = option  # the flag that asked for the file, for messages
        self.target = target or path  # where it is written (resolved before any user code ran)
        self.metadata = dict(metadata or {})
        self.header: dict[str, dict[str, object]] = {}
        self.offset = 0
        self.bytes_written = 0
        self._data: IO[bytes] | None = None
        self._data_path: str | None = None

    def __enter__(self) -> GradientWriter:
        with self._disk():
            handle, self._data_path = tempfile.mkstemp(
                prefix=f".{self.path.name}.", suffix=".data", dir=self.target.parent
            )
        self._data = os.fdopen(handle, "wb")
        return self

    def _disk(self) -> contextlib.AbstractContextManager[None]:
        """A full disk or a read-only folder is the user's to fix: one line, exit 2."""
        return writing(self.option, self.path)

    def add_step(self, step: int, layers: list[LayerSpec], unscale: float = 1.0) -> None:
        """Append every trainable parameter's current .grad, once per tensor, under its first owning layer.

        unscale: 1 / the fp16 loss scale the gradients carry, so the file holds true gradients."""
        owners: dict[int, list[str]] = {}
        for spec in layers:
            for _, param in spec.params:
                owners.setdefault(id(param), []).append(spec.name)
        seen: set[int] = set()
        for spec in layers:
            for qualified, param in spec.params:
                if id(param) in seen or param.grad is None:
                    continue
                seen.add(id(param))
                local = (
                    qualified[len(spec.name) + 1 :]
                    if spec.name and qualified.startswith(spec.name + ".")
                    else qualified
                )
                key = f"step{step}/{layer_label(spec.name)}/{local}"
                self.add(key, param.grad if unscale == 1.0 else param.grad * unscale)
                self.metadata[key] = json.dumps(
                    {"step": step, "layer": spec.name, "parameter": qualified, "layers": owners[id(param)]}
                )

    def add(self, key: str, grad: torch.Tensor) -> None:
        """Append one tensor under `key` (copied to the CPU, as its exact bytes)."""
        assert self._data is not None, "use GradientWriter as a context manager"
        tensor = grad.detach()
        if tensor.is_sparse:
            tensor = tensor.to_dense()
        if tensor.dtype not in DTYPES:
            tensor = tensor.float()
        # A copy on the CPU in its own contiguous storage: exactly the tensor's bytes, nothing around them.
        tensor = tensor.to("cpu", memory_format=torch.contiguous_format, copy=True)
        if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        data = bytes(tensor.untyped_storage())
        if sys.byteorder == "big":  # safetensors is little-endian
            data = _byteswap(data, tensor.element_size())
        with self._disk():
            self._data.write(data)
        self.header[key] = {
            "dtype": DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [self.offset, self.offset + len(data)],
        }
        self.offset += len(data)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        assert self._data is not None and self._data_path is not None
        self._data.close()
        try:
            if exc_type is None:
                with self._disk():
                    self._finish(self._data_path)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(self._data_path)

    def _finish(self, data_path: str) -> None:
        self.metadata.setdefault("format", FORMAT)
        header = json.dumps({"__metadata__": self.metadata, **self.header}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # pad with spaces to 8 bytes, as safetensors itself does

        def write(name: str) -> None:
            with open(name, "wb") as out, open(data_path, "rb") as data:
                out.write(struct.pack("<Q", len(header)))
                out.write(header)
                shutil.copyfileobj(data, out, 1 << 20)

        replace_atomic(self.target, write)
        self.bytes_written = 8 + len(header) + self.offset


def _byteswap(data: bytes, width: int) -> bytes:
    swapped = bytearray(len(data))
    for i in range(width):
        swapped[i::width] = data[width - 1 - i :: width]
    return bytes(swapped)
