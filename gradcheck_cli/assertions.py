"""assert_healthy: analyze() as a test assertion, for pytest.

It fails exactly when `gradcheck analyze` would exit 1 with the same --fail-on and --fail-level, and its message
is the report as the CLI prints it (the flagged layers, the findings with their fixes, the verdict), in plain
text: a failing test reads like the CI log, not like a list of objects.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from gradcheck_cli.api import analyze
from gradcheck_cli.gate import Gate
from gradcheck_cli.kinds import DEFAULT_FAIL_ON
from gradcheck_cli.options import Options, parse_fail_on
from gradcheck_cli.render import render_text
from gradcheck_cli.render.common import verdict_line
from gradcheck_cli.report import Report
from gradcheck_cli.resolve.losses import LossFunction


def assert_healthy(
    model: nn.Module,
    batches: Any = None,
    loss_fn: str | LossFunction = "auto",
    *,
    fail_on: str | Iterable[str] = DEFAULT_FAIL_ON,
    fail_level: str = "error",
    **settings: Any,
) -> Report:
    """Run analyze(model, batches, loss_fn, **settings) and raise AssertionError when a finding fails the gate.

    fail_on: the finding kinds that fail (a comma list or names, as --fail-on); fail_level: "error" (the
    default, as the CLI's) or "warning". The message's first line is the verdict, then the report as text.
    Returns the report, for further assertions.
    """
    __tracebackhide__ = True  # pytest shows the caller's line, not this one
    kinds = parse_fail_on(fail_on if isinstance(fail_on, str) else ",".join(fail_on))
    Options(fail_on=kinds, fail_level=fail_level)  # refuses an unknown level as the CLI does
    report = analyze(model, batches, loss_fn, **settings)
    gate = Gate.of(report, kinds, fail_level)
    if gate.failing:
        table = "\n".join(line.rstrip() for line in render_text(report, "text", gate, "flagged").splitlines())
        raise AssertionError(f"{verdict_line(report, gate)}\n\n{table}")
    return report
