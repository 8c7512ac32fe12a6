"""Finding kinds, layer statuses and severities: their one definition. The CLI's --fail-on, the rules, the
statuses in the table and the report schema all read it (a test checks the schema against it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Kind:
    """A kind of finding, and so a layer status."""

    name: str
    rank: int  # when a layer has several findings its status is the lowest rank: the most serious
    fails_by_default: bool  # in the default --fail-on
    amount: Literal["factor", "fraction"] | None  # how its status shows how bad: "830x", "93%", or not at all
    summary: str  # what it means, for --help and the README
    graded: bool = True  # False: no severity scale (always a warning), so naming it in --fail-on fails the run


KIND_LIST = (
    Kind("vanishing", 3, True, "factor", "gradients shrink: a layer learns orders of magnitude slower"),
    Kind("exploding", 2, True, "factor", "gradients or steps grow out of scale"),
    Kind("nan", 0, True, None, "NaN/Inf in the loss or the gradients"),
    Kind("dead", 1, True, "fraction", "units or layers that pass no gradient at all"),
    Kind("saturated", 4, False, "fraction", "sigmoid/tanh inputs where the derivative is nearly 0"),
    Kind("unused", 5, False, None, "trainable parameters that got no gradient"),
    Kind("unjudged", 6, False, None, "neither view had enough layers to judge: the verdict says nothing", False),
)
KIND_BY_NAME = {kind.name: kind for kind in KIND_LIST}
# Every kind of finding, in the order --help lists them; the CLI's --fail-on accepts these names.
KINDS = tuple(kind.name for kind in KIND_LIST)
DEFAULT_FAIL_ON = tuple(kind.name for kind in KIND_LIST if kind.fails_by_default)
# Most serious first: how a layer's status is chosen among its findings, and how findings are ordered.
STATUS_ORDER = tuple(kind.name for kind in sorted(KIND_LIST, key=lambda kind: kind.rank))
# A layer without findings is "ok", "frozen" when it has no trainable parameter, "gated" when its gradient
# is 0 only because a zero-initialised layer after it gates it (measured), or "unjudged" when it is a weight
# layer that no view could compare (Layer.views is empty): in the last two nothing about it was judged.
STATUSES = ("ok", "frozen", "gated", *KINDS)
# Lowest first: --fail-level warning fails on both.
SEVERITIES = ("warning", "error")
# Which view of the gradients raised a finding.
VIEWS = ("signal", "update", "numeric", "activation", "usage", "time", "training")
# What kind of layer a module is (layers.category_of), for the rules that treat kinds differently.
CATEGORIES = ("linear", "conv", "embedding", "norm", "recurrent", "attention", "other")
