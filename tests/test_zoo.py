"""The zoo: verdicts on models whose health is known from theory (labels in zoo.py, never from gradcheck)."""

from __future__ import annotations

import pytest
import torch
from zoo import Case, cases

import gradcheck_cli

CASES = {case.name: case for case in cases()}


def _run(case: Case, seed: int) -> gradcheck_cli.Report:
    torch.manual_seed(seed)
    model = case.build()
    return gradcheck_cli.analyze(model, case.batches(), seed=seed)


@pytest.mark.parametrize("name", [c.name for c in cases() if c.healthy])
def test_healthy_architectures_raise_no_finding(name: str) -> None:
    report = _run(CASES[name], seed=0)
    assert report.healthy
    assert report.findings == [], [f.message for f in report.findings]


@pytest.mark.parametrize("name", [c.name for c in cases() if not c.healthy])
def test_broken_models_get_the_verdict_theory_predicts(name: str) -> None:
    case = CASES[name]
    report = _run(case, seed=0)
    assert not report.healthy
    errors = {f.kind for f in report.findings if f.severity == "error"}
    assert set(case.expect) <= errors, (case.why, [f.message for f in report.findings])
    assert report.failing()  # exit 1 under the default --fail-on / --fail-level


@pytest.mark.parametrize("name", [c.name for c in cases()])
@pytest.mark.parametrize("seed", [1, 2])
def test_verdicts_do_not_flip_between_seeds(name: str, seed: int) -> None:
    case = CASES[name]
    report = _run(case, seed)
    assert report.healthy == case.healthy
    if case.healthy:
        assert report.findings == [], [f.message for f in report.findings]
    else:
        assert set(case.expect) <= {f.kind for f in report.findings if f.severity == "error"}


def test_frozen_backbone_layers_are_frozen_not_flagged() -> None:
    report = _run(CASES["frozen-backbone"], seed=0)
    statuses = {layer.name: layer.status for layer in report.layers}
    # the only trainable layer: nothing to compare it with (min_chain), so it was checked but not judged
    assert statuses.pop("head") == "unjudged"
    assert set(statuses.values()) == {"frozen"}


def test_nan_origin_is_named_separately_from_where_it_spread() -> None:
    forward = _run(CASES["nan-forward"], seed=0)
    assert forward.nan_origin is not None
    assert (forward.nan_origin.phase, forward.nan_origin.module) == ("forward", "bad")
    spread = [f for f in forward.findings if f.kind == "nan" and f.layer not in ("<loss>",)]
    assert spread and all("spread from bad" in f.message for f in spread)

    backward = _run(CASES["nan-backward"], seed=0)
    assert backward.nan_origin is not None
    assert (backward.nan_origin.phase, backward.nan_origin.module) == ("backward", "root")
    origin = next(f for f in backward.findings if f.layer == "root")
    assert "start here" in origin.message


def test_dead_relu_net_reports_dead_units() -> None:
    report = _run(CASES["dead-relu"], seed=0)
    deep = [layer for layer in report.layers if layer.name.startswith("hidden.") and layer.name != "hidden.0"]
    assert all(layer.dead_fraction == 1.0 for layer in deep)
    assert all(layer.status == "dead" for layer in deep)
