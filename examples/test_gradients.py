# examples/test_gradients.py: copy to tests/test_gradients.py; run with pytest
from pathlib import Path

import torch
from models.net import build_model
from safetensors.torch import load_file

import gradcheck_cli

BATCH = Path(__file__).parent / "batch.safetensors"  # the batch the CI step analyzes


def test_gradients_are_healthy() -> None:
    torch.manual_seed(0)  # the same initialisation on every run
    batch = load_file(BATCH)
    # fails when `gradcheck analyze` would exit 1, with the findings table as the message
    gradcheck_cli.assert_healthy(build_model(), (batch["inputs"], batch["targets"]))
