"""The CI gate's demos: deep nets whose verdict mean-field theory gives, computed here (theory.py), not taken
from gradcheck. A failing demo must exit 1 with an error from the signal view, its fixed twin exit 0, and the
per-layer gain gradcheck measures must be theory's."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from theory import relu_chi1, sigmoid_chi1

from gradcheck_cli.demo_names import DEMO_LISTINGS
from gradcheck_cli.diagnose.thresholds import Thresholds

# name -> (theory's chi1, the kind of the failing finding or None). 784-128x20-10 with zero biases: weights
# N(0, sw2/fan_in) on the square layers (Glorot on 128x128 is sw2 = 1, He is sw2 = 2).
THEORY = {
    "deep-sigmoid": (sigmoid_chi1(1.0, 0.0), "vanishing"),
    "exploding-relu": (relu_chi1(4.0), "exploding"),
    "deep-relu-he": (relu_chi1(2.0), None),
}
CHAIN_STEPS = 20  # 21 linear layers in forward order: 20 steps of the chain rule between them
# How close the measured gain must be. The fit is a median over the chain's pairs of layers, so its error is
# about the per-layer fluctuation over sqrt(20). Sigmoid: phi'^2 varies little across 128 units, per-layer
# spread ~2%; measured over seeds 0-4: 0.2354-0.2394 against 0.2361. ReLU: chi1 per layer is the fraction of
# the 128 units that are active, binomial (std 1/sqrt(128) = 9%, 4.4% in the gain), and barely averaged over
# the batch because deep ReLU nets align their inputs; measured over seeds 0-12: 1.394-1.446 against 1.414.
# Each band is more than 3x the spread seen, and excludes the nearest wrong theories (sigmoid's bound 1/4 is
# 6% off; a ReLU gain of chi1 instead of sqrt(chi1) is 41% off).
TOLERANCE = {"deep-sigmoid": 0.05, "exploding-relu": 0.1, "deep-relu-he": 0.1}


def _expected_exit(chi1: float) -> int:
    """The default gate fails when theory's change over the chain passes the signal view's error factor."""
    total = math.sqrt(chi1) ** CHAIN_STEPS
    return 1 if max(total, 1 / total) > Thresholds().signal_error else 0


@pytest.mark.parametrize("name", THEORY)
def test_deep_demo_exits_as_theory_says_and_measures_its_gain(cli, tmp_path: Path, name: str) -> None:
    chi1, kind = THEORY[name]
    gain = math.sqrt(chi1)
    result = cli("demo", name, "--output", tmp_path / "report.json")
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["signal"]["gain_per_layer"] == pytest.approx(gain, rel=TOLERANCE[name])
    assert result.exit_code == _expected_exit(chi1) == DEMO_LISTINGS[name].exit_code, result.output
    # the table: theory's gain (as computed here) beside the measured one; the finding, the fix, the verdict
    measured = report["signal"]["gain_per_layer"]
    assert f"||dL/dz|| x{gain:.3g} per layer toward the input" in result.stdout
    assert f"measured x{measured:.3g}" in result.stdout
    if kind is None:
        assert report["findings"] == [] and "PASS" in result.stdout
        return
    first = next(f for f in report["findings"] if f["severity"] == "error")
    assert (first["layer"], first["kind"], first["view"]) == ("net.fc1", kind, "signal")
    assert f"ERROR   net.fc1 {kind} [signal]: x{measured:.3g} per layer" in result.stdout
    assert "fix (the" in result.stdout and "fixed twin: gradcheck demo deep-relu-he" in result.stdout
    assert "FAIL:" in result.stdout


def test_demo_theory_is_the_tests_theory() -> None:
    """What the demos print as theory's chi1 (Simpson's rule in demos.py) against Golub-Welsch here."""
    from gradcheck_cli.demos import DEMOS

    for name, (chi1, _) in THEORY.items():
        theory = DEMOS[name].theory
        assert theory is not None and theory.chi1() == pytest.approx(chi1, rel=1e-6)
    sigmoid = DEMOS["deep-sigmoid"].theory
    assert sigmoid is not None and sigmoid.chi1() < 1 / 16  # sigmoid' <= 1/4 at sw2 = 1


def test_demo_list_says_what_to_expect(cli) -> None:
    result = cli("demo", "--list")
    assert result.exit_code == 0
    lines = {line.split()[0]: line.split(maxsplit=3)[1:] for line in result.stdout.splitlines()}
    assert set(lines) == set(DEMO_LISTINGS)
    for name, (verb, code, summary) in lines.items():
        assert verb == "exits" and int(code) == DEMO_LISTINGS[name].exit_code and summary
