"""gradcheck: find the layers whose gradients vanish or explode in any PyTorch model.

    import gradcheck_cli
    report = gradcheck_cli.analyze(model, (inputs, targets))
    gradcheck_cli.assert_healthy(model, (inputs, targets))  # in a test: fails with the findings table

Nothing heavy is imported here: `gradcheck --help` must start without importing torch. The public names are
loaded on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gradcheck_cli._version import __version__

if TYPE_CHECKING:
    from gradcheck_cli.api import analyze
    from gradcheck_cli.assertions import assert_healthy
    from gradcheck_cli.diagnose.thresholds import Thresholds
    from gradcheck_cli.errors import UserError
    from gradcheck_cli.options import Options
    from gradcheck_cli.report import Finding, Layer, ParameterRecord, Report

__all__ = [
    "Finding",
    "Layer",
    "Options",
    "ParameterRecord",
    "Report",
    "Thresholds",
    "UserError",
    "__version__",
    "analyze",
    "assert_healthy",
]

_LAZY = {
    "analyze": "gradcheck_cli.api",
    "assert_healthy": "gradcheck_cli.assertions",
    "Thresholds": "gradcheck_cli.diagnose.thresholds",
    "UserError": "gradcheck_cli.errors",
    "Options": "gradcheck_cli.options",
    "Finding": "gradcheck_cli.report",
    "Layer": "gradcheck_cli.report",
    "ParameterRecord": "gradcheck_cli.report",
    "Report": "gradcheck_cli.report",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'gradcheck_cli' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
