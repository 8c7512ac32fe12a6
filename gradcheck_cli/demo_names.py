"""Demo names, what each one shows and the exit code to expect, importable without torch (`gradcheck demo --list`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DemoListing:
    summary: str  # what the demo shows, one line
    exit_code: int  # what `gradcheck demo NAME` exits with under the default gate: 0 pass, 1 a failing finding


DEMO_LISTINGS = {
    "sigmoid-mlp": DemoListing("the 2017 tutorial's sigmoid MLP, N(0,1) weights: layer 1 learns slower (warnings)", 0),
    "relu-he-mlp": DemoListing("the tutorial's announced fixes, ReLU units and He init: clean", 0),
    "dying-relu": DemoListing("relu-he-mlp trained at lr 1.0, far too large: its ReLU units die, step by step", 1),
    "deep-sigmoid": DemoListing("the sigmoid MLP made deep (20 layers, Glorot): gradients vanish by theory", 1),
    "exploding-relu": DemoListing("20 ReLU layers at twice He's variance: gradients explode by theory", 1),
    "deep-relu-he": DemoListing("the fixed twin of both: 20 ReLU layers, He init, gain 1 by theory", 0),
}
DEMO_SUMMARIES = {name: listing.summary for name, listing in DEMO_LISTINGS.items()}


def listing_lines() -> list[str]:
    """`gradcheck demo --list`: name, the exit code to expect, what it shows."""
    width = max(map(len, DEMO_LISTINGS))
    return [f"{name:<{width}}  exits {item.exit_code}  {item.summary}" for name, item in DEMO_LISTINGS.items()]
