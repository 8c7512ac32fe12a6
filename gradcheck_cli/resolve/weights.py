"""--weights: parameters and buffers from safetensors (or, when allowed, a pickle checkpoint)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gradcheck_cli.errors import UserError, first_line
from gradcheck_cli.files import input_file

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle", ".tar")


def load_weights(model: Any, path: Path, strict: bool = True, allow_pickle: bool = False) -> list[str]:
    """Load parameters and buffers into `model`; return notes (e.g. keys left out under --no-strict).

    safetensors files are parsed without running code. Pickle checkpoints can run arbitrary code when loaded,
    so they are refused unless allow_pickle, and even then read with torch.load(weights_only=True).
    """
    input_file(path, "weights file", "give the .safetensors file itself")
    if path.suffix.lower() in PICKLE_SUFFIXES or _looks_like_pickle(path):
        if not allow_pickle:
            raise UserError(
                f"{path.name} is a pickle checkpoint, and loading pickle can run arbitrary code",
                "convert it to safetensors, or pass --allow-pickle to load it with torch.load(weights_only=True)",
            )
        state = _load_pickle(path)
    else:
        state = _load_safetensors(path)
    return _apply_state(model, state, path, strict)


def _looks_like_pickle(path: Path) -> bool:
    """torch.save writes a zip archive ("PK\x03\x04"), older torch and plain pickle start with 0x80. A safetensors
    file starts with its header's length (8 bytes, little-endian) and then "{", which is checked first: a
    128-byte header also starts with 0x80."""
    try:
        with path.open("rb") as handle:
            head = handle.read(9)
    except OSError:
        return False
    if len(head) == 9 and head[8:9] == b"{":
        return False
    return head[:1] == b"\x80" or head[:4] == b"PK\x03\x04"


def _load_safetensors(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    try:
        return dict(load_file(str(path)))
    except Exception as exc:
        raise UserError(
            f"{path.name} is not a readable safetensors file ({first_line(exc, '(no message)')})",
            "check that the file is complete and was written by safetensors.torch.save_file or save_model",
        ) from exc


def _load_pickle(path: Path) -> dict[str, Any]:
    import torch

    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(
            f"cannot load {path.name} with torch.load(weights_only=True): {first_line(exc, '(no message)')}",
            "save a plain state_dict (torch.save(model.state_dict(), ...)) or convert it to safetensors",
        ) from exc
    if isinstance(loaded, dict) and "state_dict" in loaded and isinstance(loaded["state_dict"], dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise UserError(f"{path.name} does not hold a state_dict", "save model.state_dict() instead")
    return dict(loaded)


def _apply_state(model: Any, state: dict[str, Any], path: Path, strict: bool) -> list[str]:
    import torch

    own = model.state_dict()
    meta = {key for key, tensor in own.items() if tensor.is_meta}
    if meta:  # built on the meta device to be loaded: storage first, then every meta tensor must be in the file
        absent = [key for key in own if key in meta and key not in state]
        if absent:
            raise UserError(
                f"{path.name} has no values for {len(absent)} tensor(s) the model built on the meta device: "
                f"{_names(absent)}",
                "build the model on a real device, or give weights for every tensor",
            )
        model.to_empty(device="cpu")
        own = model.state_dict()
    mismatched = [
        f"{key} {tuple(state[key].shape)} vs model {tuple(own[key].shape)}"
        for key in state
        if key in own and tuple(state[key].shape) != tuple(own[key].shape)
    ]
    if mismatched:
        more = f" and {len(mismatched) - 3} more" if len(mismatched) > 3 else ""
        raise UserError(
            f"{path.name} does not fit the model: shape mismatch for {'; '.join(mismatched[:3])}{more}",
            "check that the weights belong to this model and its configuration",
        )
    # Tied weights: a tensor registered under several names is saved once (safetensors' save_model);
    # a missing alias of a loaded tensor is not missing.
    loaded_storage = {own[k].untyped_storage().data_ptr() for k in state if k in own}
    missing = [k for k in own if k not in state and own[k].untyped_storage().data_ptr() not in loaded_storage]
    unexpected = [k for k in state if k not in own]
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s): {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s): {_names(unexpected)}")
        raise UserError(
            f"{path.name} does not match the model: {'; '.join(parts)}",
            "check the model configuration, or pass --no-strict to load the keys that match",
        )
    with torch.no_grad():
        for key, value in state.items():
            if key in own:
                own[key].copy_(value.to(dtype=own[key].dtype))
    notes = []
    if missing:
        notes.append(f"--no-strict: {len(missing)} model key(s) kept their initial values: {_names(missing)}")
    if unexpected:
        notes.append(f"--no-strict: {len(unexpected)} key(s) in {path.name} were ignored: {_names(unexpected)}")
    return notes


def _names(keys: list[str], limit: int = 4) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown}, ... ({len(keys) - limit} more)" if len(keys) > limit else shown
