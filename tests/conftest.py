"""Shared fixtures: a CLI runner with a fixed terminal width, and model files written into tmp_path."""

from __future__ import annotations

import json
import sys
import textwrap
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))  # zoo.py and theory.py import as plain modules

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


class Cli:
    """Runs `gradcheck ...` in-process with a fixed width, so table assertions do not depend on the terminal."""

    def __init__(self) -> None:
        self.runner = CliRunner(env={"COLUMNS": "160", "NO_COLOR": "1", "GITHUB_ACTIONS": ""})

    def __call__(self, *args: str, **kwargs: Any) -> Any:
        from gradcheck_cli.cli import app

        return self.runner.invoke(app, [str(a) for a in args], **kwargs)

    def json(self, *args: str) -> tuple[int, dict[str, Any]]:
        result = self(*args, "--format", "json")
        assert result.stdout.strip(), result.stderr
        return result.exit_code, json.loads(result.stdout)


@pytest.fixture
def cli() -> Cli:
    return Cli()


@pytest.fixture
def write(tmp_path: Path) -> Callable[[str, str], Path]:
    """write("model.py", source) -> path; the source is dedented."""

    def _write(name: str, source: str) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
        return path

    return _write


MLP_FILE = """
    import torch
    from torch import nn

    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))

    def get_batch():
        g = torch.Generator().manual_seed(1)
        return torch.randn(12, 8, generator=g), torch.randint(0, 4, (12,), generator=g)
"""


@pytest.fixture
def mlp_file(write: Callable[[str, str], Path]) -> Path:
    return write("mlp_model.py", MLP_FILE)
