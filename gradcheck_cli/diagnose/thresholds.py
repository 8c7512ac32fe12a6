"""Every threshold of the diagnosis in one dataclass, each with the reason for its default (README:
"Thresholds")."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from gradcheck_cli.errors import UserError


def threshold(default: Any, help: str) -> Any:
    """A threshold field: its default, and the --help text of the `gradcheck analyze` flag made from it."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Thresholds:
    """Every threshold of the diagnosis, with the reason for its default (README: "Thresholds")."""

    # signal view: factor by which ||dL/dz|| at a layer differs from the output end of the chain, flagged only
    # when the fitted per-layer gain compounds to at least the same factor over the chain (a trend, not one
    # odd layer). Over L layers the factor is exp(L / (2 xi)), xi = -1/ln(chi1) the depth scale; plain nets
    # stop training beyond L ~ 6 xi (Schoenholz et al. 2017), a factor of e^3 ~ 20: the warning. Twice that
    # depth, e^6 ~ 400: the error. Critical nets stay within ~2x over tens of layers at practical widths.
    signal_warning: float = threshold(20.0, "Signal view: dL/dz change (factor) toward the input that warns.")
    signal_error: float = threshold(400.0, "Signal view: factor that is an error.")
    # signal view, residual nets: with a path around the layers (skip or dense connections, confirm.find_bypass)
    # gradients grow polynomially with depth, not exponentially, and such nets train at any depth (Yang &
    # Schoenholz 2017; De & Smith 2020): the normalised ones in the corpus show 1.03-1.11 per layer at init.
    # Only a per-layer gain beyond this factor (either way) is judged in them: 1.5 per layer compounds to 20x
    # in 7 layers, which no residual design needs.
    residual_gain: float = threshold(1.5, "Signal view, nets with skip connections: per-layer gain judged.")
    # update view, balance: a weight layer whose ||g||/||W|| is this many times below the network median
    # learns that many times slower under SGD (the tutorial's layer 1).
    balance_warning: float = threshold(10.0, "Update view: ||g||/||W|| this many times below the median warns.")
    balance_error: float = threshold(1000.0, "Update view: factor below the median that is an error.")
    # update view, a whole role (the same layer in every block) against the network: roles differ by design
    # (CaiT's talking-heads projections sit ~4000x below its MLPs), so only a gap no design needs is an error:
    # at 1e5 x slower, a layer moves 1e-8 of its norm per step when the median moves 1e-3, nothing in a run.
    role_error: float = threshold(1e5, "Update view: factor by which a whole role below the median is an error.")
    # update view, size: lr * ||g||/||W||, the fraction by which one SGD step changes the weights. Above 1 a
    # step is no longer an update but a re-initialisation of the layer; 10 is ten of them. (The usual healthy
    # range is 1e-4..1e-2; DeepDiagnosis flags > 0.1, but output heads legitimately reach ~0.1 at init.)
    update_warning: float = threshold(1.0, "Update view: lr*||g||/||W|| (step size relative to weights) that warns.")
    update_error: float = threshold(10.0, "Update view: step size that is an error.")
    # activation view: fraction of ReLU units never active over all batches (a He-initialised unit is active
    # for half the examples, so chance alone leaves ~0.5^batch of them dead), and fraction of sigmoid/tanh
    # inputs where the derivative is under 5% of its peak (DeepDiagnosis flags > 50% outside [-5, 5]).
    dead_warning: float = threshold(0.5, "Fraction of dead ReLU units that warns.")
    dead_error: float = threshold(0.9, "Fraction of dead ReLU units that is an error.")
    # activation view, nearly dead: fraction of exact zeros in what a hidden weight layer reads. A unit active
    # for a fraction p of its inputs passes a gradient (and its input to the next layer's weight gradient) for
    # only those: E[relu'(z)^2] = p, half at a He-initialised ReLU. Healthy models read at most 85% zeros (VGG's
    # and GoogLeNet's classifiers behind ReLU and dropout 0.5-0.7; 72 torchvision and timm models): activity
    # under 5% is ten times below a healthy unit's; under 1%, fifty times, a unit that learns from 1 input in 100.
    nearly_dead_warning: float = threshold(
        0.95, "Fraction of exact zeros in a hidden weight layer's input (a nearly dead activation) that warns."
    )
    nearly_dead_error: float = threshold(0.99, "Fraction of exact zeros in a hidden layer's input that is an error.")
    saturation_warning: float = threshold(0.5, "Fraction of saturated sigmoid/tanh inputs that warns.")
    saturation_error: float = threshold(0.9, "Fraction of saturated inputs that is an error.")
    # --amp: fraction of gradient values below the AMP dtype's smallest normal (subnormal, or flushed to zero).
    # Values only get there when the distribution straddles the underflow edge, and everything further below
    # is already zero: 1% in that band means a visible tail of the updates is being lost; 10% a large part.
    underflow_warning: float = threshold(
        0.01, "--amp: fraction of gradient values below the AMP dtype's smallest normal that warns."
    )
    underflow_error: float = threshold(0.1, "--amp: fraction below the smallest normal that is an error.")
    # update view, input scale: dL/dW = dL/dz x input, so the layer reading the model's input learns in
    # proportion to the input's scale. When that input is not standardised (RMS outside [1/2, 2] or over half
    # exact zeros; LeCun et al. 1998, "Efficient BackProp") and the layer's ||g||/||W|| lags the median by
    # this factor, the lag has a measured cause and a standard fix, so it is flagged below balance_warning.
    input_lag: float = threshold(
        2.0, "Update view: lag of the input layer (factor) flagged when its input is unstandardised."
    )
    # training view (--train-steps), spikes: a step whose loss or global gradient norm is this many times the
    # running median of the steps before it. Batch-to-batch spread of ||g|| at batch sizes from 8 up stays
    # within 2-3x (grad_norm_spread over the corpus), and a loss falls smoothly over a short run, so an order of
    # magnitude is no batch noise: under SGD that step moves the weights 10x further than the others, and under
    # Adam it inflates the second moment for ~1/(1 - beta2) steps. Two orders: an error, as one such step can
    # undo the run (Megatron-LM's --check-for-large-grads, Lightning's SpikeDetection look for the same).
    spike_warning: float = threshold(10.0, "Training: loss or gradient norm this many times its running median warns.")
    spike_error: float = threshold(100.0, "Training: spike factor that is an error.")
    # training view, clipping: --clip acting on more than this fraction of the steps means the threshold, not
    # the gradient, sets the step size (most runs clip rarely: espnet/fairseq logs show it on a few % of steps).
    clip_warning: float = threshold(0.5, "Training: fraction of steps where --clip acted that warns.")
    # training view, updates below precision: fraction of a layer's weights that had a nonzero gradient but did
    # not change, because the update was below half the spacing of the weight's dtype around its value (bf16:
    # 2^-8 relative). Half of them frozen halves the layer's learning; 90% is a layer that has stopped.
    stall_warning: float = threshold(0.5, "Training: fraction of a layer's updates lost to rounding that warns.")
    stall_error: float = threshold(0.9, "Training: fraction of updates lost to rounding that is an error.")
    # fewest layers for a signal fit and for a balance median. The fit is a Theil-Sen line, which ignores up to
    # ~29% outlying points: with 5 or more layers one odd end (an embedding, an output head) cannot fake a trend.
    min_chain: int = threshold(5, "Fewest layers for a signal-view fit or a balance median.")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise UserError for a threshold that makes no sense (it runs once, when the thresholds are made)."""
        for name in ("signal", "balance", "update", "dead", "nearly_dead", "saturation", "underflow", "spike", "stall"):
            low = getattr(self, f"{name}_warning")
            high = getattr(self, f"{name}_error")
            if not (math.isfinite(low) and math.isfinite(high)) or low <= 0:
                raise UserError(f"threshold {name} must be a positive number", "see gradcheck analyze --help")
            if high < low:
                raise UserError(
                    f"{name} error threshold ({high:g}) is below its warning threshold ({low:g})",
                    "the error threshold must be at least the warning threshold",
                )
        if not math.isfinite(self.residual_gain) or self.residual_gain <= 1:
            raise UserError("residual_gain is a factor and must be above 1", "e.g. 1.5")
        if not math.isfinite(self.input_lag) or self.input_lag <= 1:
            raise UserError("input_lag is a factor and must be above 1", "e.g. 2")
        if not math.isfinite(self.role_error) or self.role_error < self.balance_error:
            raise UserError("role_error is a factor at least balance_error", "e.g. 1e5")
        for name in ("signal", "balance", "spike"):
            if getattr(self, f"{name}_warning") <= 1:
                raise UserError(f"{name} thresholds are factors and must be above 1", "e.g. 10")
        if not 0 < self.clip_warning <= 1:
            raise UserError("clip_warning is a fraction of steps and must be in (0, 1]", "e.g. 0.5")
        for name in ("dead", "nearly_dead", "saturation", "underflow", "stall"):
            if getattr(self, f"{name}_error") > 1:
                raise UserError(f"{name} thresholds are fractions and must be in (0, 1]", "e.g. 0.5")
        if self.min_chain < 3:
            raise UserError("min_chain must be at least 3", "use 5 or more")

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in dataclasses.asdict(self).items()}
