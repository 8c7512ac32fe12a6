"""The gate: which findings fail the run and the exit code, decided once and handed to every renderer.

Exit codes: 0 no failing finding, 1 a failing finding, 2 bad usage or input, 130 interrupted.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

from gradcheck_cli.kinds import DEFAULT_FAIL_ON, KIND_BY_NAME, SEVERITIES

if TYPE_CHECKING:
    from gradcheck_cli.report import Finding, Report

EXIT_OK, EXIT_FINDINGS, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143


@dataclass(frozen=True)
class Gate:
    """--fail-on and --fail-level applied to one report."""

    fail_on: tuple[str, ...]
    fail_level: str
    failing: tuple[Finding, ...]

    @classmethod
    def of(cls, report: Report, fail_on: Iterable[str] = DEFAULT_FAIL_ON, fail_level: str = "error") -> Gate:
        kinds = tuple(fail_on)
        levels = SEVERITIES[SEVERITIES.index(fail_level) :]  # "warning": both; "error": errors only
        failing = tuple(
            f for f in report.findings if f.kind in kinds and (f.severity in levels or not KIND_BY_NAME[f.kind].graded)
        )
        return cls(kinds, fail_level, failing)

    @property
    def code(self) -> int:
        return EXIT_FINDINGS if self.failing else EXIT_OK

    @cached_property
    def _failing_ids(self) -> frozenset[int]:
        return frozenset(id(f) for f in self.failing)

    def fails(self, finding: Finding) -> bool:
        """Whether this very finding (not an equal one on another layer) fails the run."""
        return id(finding) in self._failing_ids

    def options(self) -> str:
        """The options behind the decision, as the user would write them."""
        return f"--fail-on {','.join(self.fail_on)} at --fail-level {self.fail_level}"
