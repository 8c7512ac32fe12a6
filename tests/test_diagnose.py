"""The rules alone, on hand-made layer records: each rule fires where it should and nowhere else."""

from __future__ import annotations

import dataclasses
import random

import pytest
from torch import nn

from gradcheck_cli.diagnose import Thresholds, diagnose
from gradcheck_cli.errors import UserError
from gradcheck_cli.layers import layout
from gradcheck_cli.report import Layer, NanOrigin


def layer(name: str, index: int | None, dz: float | None = 1.0, ratio: float | None = 0.01, **extra) -> Layer:
    values = dict(
        name=name,
        type="Linear",
        category="linear",
        params=100,
        trainable_params=100,
        parameters=(f"{name}.weight",),
        calls=1.0,
        forward_index=index,
        grad_norm=1.0,
        grad_norm_median=1.0,
        grad_norm_steps=(1.0, 1.0, 1.0),
        weight_norm=10.0,
        grad_to_weight=ratio,
        grad_to_weight_steps=(ratio,) * 3,
        output_grad_norm=dz,
        output_grad_norm_median=dz,
        output_grad_per_position=dz,
        output_grad_per_position_steps=(dz,) * 3,
        grad_norm_spread=1.0,
        output_grad_spread=1.0,
        output_grad_norm_steps=(dz,) * 3,
        rms=0.1,
        max_abs=1.0,
        zero_fraction=0.0,
        nonfinite=0,
        input_rms=1.0,
        input_zero_fraction=0.0,
        dead_fraction=None,
        saturated_fraction=None,
        zero_grad_unit_fraction=None,
    )
    values.update(extra)
    return Layer(**values)


def ratio(record: Layer, value: float) -> Layer:
    """The same ||g||/||W|| in every step (and so as the median)."""
    return dataclasses.replace(record, grad_to_weight=value, grad_to_weight_steps=(value,) * 3)


def chain(gains: list[float], **extra) -> list[Layer]:
    """Layers 0..n in forward order with dL/dz given from the output end backwards by per-layer gains."""
    norms = [1.0]
    for gain in gains:
        norms.append(norms[-1] * gain)
    norms.reverse()
    return [layer(f"l{i}", i, dz=n, **extra) for i, n in enumerate(norms)]


def kinds(layers: list[Layer], **kwargs) -> set[tuple[str, str, str, str]]:
    verdict = diagnose(layers, [1.0], Thresholds(), **kwargs)
    return {(f.layer, f.kind, f.severity, f.view) for f in verdict.findings}


def test_flat_chain_is_clean_even_with_an_odd_head_and_embedding() -> None:
    layers = chain([1.0] * 9)
    layers[0] = dataclasses.replace(layers[0], output_grad_norm_median=1e-3, category="embedding")
    layers[-1] = dataclasses.replace(layers[-1], output_grad_norm_median=50.0)
    assert kinds(layers) == set()


def test_geometric_decay_flags_the_layers_far_from_the_output() -> None:
    layers = chain([0.5] * 11)  # 2x smaller per layer toward the input: 2048x over the chain
    verdict = diagnose(layers, [1.0], Thresholds())
    # one cause, one finding: on the first layer, 2048x below the output end
    assert [(f.layer, f.kind, f.severity, f.view) for f in verdict.findings] == [("l0", "vanishing", "error", "signal")]
    # l1..l6 are 2**(11 - i) >= 32x below the end, past 20x (6 depth scales): covered by it; l7 (16x) is not
    assert verdict.findings[0].also == ("l1", "l2", "l3", "l4", "l5", "l6")
    assert "also smaller past the warning threshold: l1 1024x, l2 512x, l3 256x, l4 128x and 2 more" in (
        verdict.findings[0].message
    )
    status = {layer.name: (layer.status, layer.severity) for layer in verdict.layers}
    assert status["l6"] == ("vanishing", "error") and status["l7"] == ("ok", None)


def test_growth_toward_the_input_is_exploding() -> None:
    assert ("l0", "exploding", "error", "signal") in kinds(chain([3.0] * 8))


def test_growth_through_batch_norm_layers_is_not_blamed_on_the_weights_scale() -> None:
    """BN divides the weights' scale out: growth through a plain BN chain is BN's (Yang et al. 2019)."""
    (plain,) = diagnose(chain([3.0] * 8), [1.0], Thresholds()).findings
    (normed,) = diagnose(chain([3.0] * 8, feeds_norm=True), [1.0], Thresholds()).findings
    assert "weights too large" in plain.fix and "batch normalisation" not in plain.fix
    assert "batch normalisation without skip connections" in normed.fix and "weights too large" not in normed.fix


def test_one_odd_layer_without_a_trend_is_not_a_signal_finding() -> None:
    layers = chain([1.0] * 9)
    layers[4] = dataclasses.replace(layers[4], output_grad_norm_median=1e-4)
    assert kinds(layers) == set()


def test_short_chains_are_not_fitted() -> None:
    verdict = diagnose(chain([0.1] * 3), [1.0], Thresholds())
    assert verdict.signal.gain_per_layer is None
    assert verdict.findings == []


def test_a_trend_needs_more_than_one_pair_of_comparable_layers() -> None:
    """A seq2seq GRU with attention: embedding, encoder, decoder, score projection, head. Only the last two share
    a group (nn.Linear at one resolution), and the score projection's dL/dz is 200x the head's smaller by
    design: one step between two particular layers, not a per-layer gain to compound over the chain."""
    types = ["Embedding", "GRU", "GRU", "Linear", "Linear"]
    positions = [320.0, 320.0, 256.0, 256.0, 256.0]
    dz = [1e-3, 1e-3, 1e-3, 5e-5, 1e-2]
    layers = [
        layer(f"l{i}", i, dz=z, type=t, output_positions=p, depth=i + 1)
        for i, (t, p, z) in enumerate(zip(types, positions, dz, strict=True))
    ]
    verdict = diagnose(layers, [1.0], Thresholds())
    assert verdict.signal.gain_per_layer is None and not verdict.findings
    # a third nn.Linear at that resolution on the same trend (200x per layer) makes it one
    layers.append(layer("l5", 5, dz=2.0, type="Linear", output_positions=256.0, depth=6))
    (finding,) = diagnose(layers, [1.0], Thresholds()).findings
    assert (finding.kind, finding.severity, finding.view) == ("vanishing", "error", "signal")
    assert finding.covers("l3")


def test_balance_flags_layers_far_below_the_median() -> None:
    layers = [layer(f"l{i}", i, ratio=0.01) for i in range(6)]
    layers[2] = ratio(layers[2], 0.0005)  # 20x below
    layers[3] = ratio(layers[3], 0.000005)  # 2000x below
    found = kinds(layers)
    assert ("l2", "vanishing", "warning", "update") in found
    assert ("l3", "vanishing", "error", "update") in found
    assert len(found) == 2


def test_input_lag_needs_both_an_unstandardised_input_and_a_lag() -> None:
    layers = [layer(f"l{i}", i, ratio=0.01) for i in range(6)]
    lagging = ratio(layers[0], 0.003)  # 3.3x below the median
    assert kinds([lagging, *layers[1:]]) == set()  # standardised input: 3x is within healthy spread
    small_input = dataclasses.replace(lagging, input_rms=0.3)
    assert kinds([small_input, *layers[1:]]) == {("l0", "vanishing", "warning", "update")}
    sparse_input = dataclasses.replace(lagging, input_zero_fraction=0.8)
    assert kinds([sparse_input, *layers[1:]]) == {("l0", "vanishing", "warning", "update")}
    no_lag = dataclasses.replace(layers[0], input_rms=0.3)
    assert kinds([no_lag, *layers[1:]]) == set()


def test_update_size_uses_the_learning_rate() -> None:
    layers = [layer(f"l{i}", i, ratio=20.0) for i in range(3)]
    assert kinds(layers, lr=0.01) == set()  # 0.2x per step: large, but heads reach that at init
    assert {k[1:] for k in kinds(layers, lr=0.1)} == {("exploding", "warning", "update")}  # 2x per step
    assert {k[1:] for k in kinds(layers, lr=1.0)} == {("exploding", "error", "update")}  # 20x per step


def test_a_head_initialised_near_zero_is_judged_against_the_scale_of_its_shape() -> None:
    """timm's EVA head: trunc_normal(0.02) x 1e-3, ||W|| 0.01 for 1000 units. A step of 5x that norm only moves
    it toward the scale of its shape: the default init gives ||W|| = sqrt(1000 / 3) = 18.3, and the step is
    compared with a tenth of that, 1.83 (0.027x). The same gradient 100x larger is an exploding step either way."""
    body = [layer(f"l{i}", i, ratio=0.01, units=64) for i in range(5)]

    def head(weight_norm: float, grad_norm: float) -> Layer:
        return dataclasses.replace(
            ratio(layer("head", 5, units=1000), grad_norm / weight_norm), weight_norm=weight_norm
        )

    assert kinds([*body, head(0.01, 5.0)], lr=0.01) == set()  # ||g||/||W|| = 500: 5x its own norm
    flagged = kinds([*body, head(0.01, 500.0)], lr=0.01)  # 0.01 * 500 / 1.83 = 2.7x the floor
    assert flagged == {("head", "exploding", "warning", "update")}
    # weights of ordinary scale: judged against their own norm, as before (0.01 * 50 / 18.3 = 0.027x: no)
    assert kinds([*body, head(18.3, 50.0)], lr=0.01) == set()
    assert kinds([*body, head(18.3, 5000.0)], lr=0.01) == {("head", "exploding", "warning", "update")}


def test_scale_invariant_layers_are_not_judged_by_step_size_or_balance() -> None:
    """A layer feeding a normalisation layer: the loss ignores its weight scale (Arora et al. 2019)."""
    layers = [layer(f"l{i}", i, ratio=0.01) for i in range(6)]
    layers[2] = dataclasses.replace(layers[2], grad_to_weight=1e-6, feeds_norm=True)
    layers[3] = dataclasses.replace(layers[3], grad_to_weight=500.0, feeds_norm=True)
    assert kinds(layers, lr=0.1) == set()


def test_a_stage_that_learns_slower_by_design_is_judged_among_its_repeats() -> None:
    """Two stages of one role (s.#.b.#.fc): the first's two blocks (100 parameters each) 30x below the second's
    four (400 each), consistently: no finding. One layer off its own repeats still is one, in either stage."""

    def stages(first: list[float], second: list[float]) -> list[Layer]:
        names = [(f"s.0.b.{i}.fc", 100, r) for i, r in enumerate(first)]
        names += [(f"s.1.b.{i}.fc", 400, r) for i, r in enumerate(second)]
        return [layer(name, i, ratio=r, params=n, trainable_params=n) for i, (name, n, r) in enumerate(names)]

    assert kinds(stages([1e-4, 1e-4], [3e-3] * 4)) == set()
    # 1550x below the role's median (an error past balance_error 1000), 3000x below its repeats': an error
    assert kinds(stages([1e-4, 1e-4], [3e-3, 3e-3, 1e-6, 3e-3])) == {("s.1.b.2.fc", "vanishing", "error", "update")}
    # 3000x below the role's median, 50x below the midpoint of its pair of repeats: the milder, a warning
    assert kinds(stages([1e-6, 1e-4], [3e-3] * 4)) == {("s.0.b.0.fc", "vanishing", "warning", "update")}


def test_nan_layers_name_the_origin() -> None:
    layers = [layer("a", 0, nonfinite=5), layer("b", 1, nonfinite=3), layer("c", 2)]
    origin = NanOrigin("forward", "b", "b produced NaN")
    verdict = diagnose(layers, [float("nan")], Thresholds(), nan_origin=origin)
    messages = {f.layer: f.message for f in verdict.findings}
    assert "start here" in messages["b"]
    assert "spread from b" in messages["a"]
    assert "<loss>" in messages
    assert [x.status for x in verdict.layers] == ["nan", "nan", "unjudged"]  # three layers: no view compares c


def test_all_zero_gradients_are_dead_errors_and_status_prefers_the_worst() -> None:
    zero = layer("z", 0, grad_norm_steps=(0.0, 0.0, 0.0), dead_fraction=1.0)
    verdict = diagnose([zero], [1.0], Thresholds())
    assert verdict.layers[0].status == "dead" and verdict.layers[0].severity == "error"
    assert {f.view for f in verdict.findings} == {"numeric", "activation"}


def test_dead_and_saturated_fractions() -> None:
    found = kinds([layer("a", 0, dead_fraction=0.6), layer("b", 1, saturated_fraction=0.95)])
    assert found == {("a", "dead", "warning", "activation"), ("b", "saturated", "error", "activation")}


def test_frozen_and_unused() -> None:
    frozen = layer("f", 0, trainable_params=0, grad_norm_steps=(None, None, None))
    unused = layer("u", None, grad_norm_steps=(None, None, None))
    verdict = diagnose([frozen, unused], [1.0], Thresholds())
    assert [x.status for x in verdict.layers] == ["frozen", "unused"]
    assert [(f.layer, f.severity) for f in verdict.findings] == [("u", "warning")]


@pytest.mark.parametrize(
    "change",
    [
        {"signal_warning": 0.5},
        {"signal_warning": 100.0, "signal_error": 10.0},
        {"dead_error": 1.5},
        {"balance_warning": float("nan")},
        {"input_lag": 1.0},
        {"min_chain": 2},
    ],
)
def test_thresholds_out_of_range_are_user_errors(change: dict) -> None:
    with pytest.raises(UserError):
        Thresholds(**change).validate()


def test_a_finding_must_hold_on_most_batches() -> None:
    """One wild batch moves a median only so far; the per-step vote removes what the others do not show."""
    layers = [layer(f"l{i}", i, ratio=0.01) for i in range(6)]
    # l2 is 50x below the median in one of three steps and normal in the others
    odd = dataclasses.replace(layers[2], grad_to_weight=0.0002, grad_to_weight_steps=(0.0002, 0.01, 0.01))
    assert kinds([*layers[:2], odd, *layers[3:]]) == set()
    steady = dataclasses.replace(layers[2], grad_to_weight=0.0002, grad_to_weight_steps=(0.0002, 0.0002, 0.01))
    assert kinds([*layers[:2], steady, *layers[3:]]) == {("l2", "vanishing", "warning", "update")}


def test_balance_compares_a_layer_with_its_peers_in_other_blocks() -> None:
    """Roles differ by design (a fused QKV projection vs a scaled residual projection); the same role in
    other blocks should not."""
    layers = []
    for block in range(6):
        layers.append(ratio(layer(f"h.{block}.attn", 2 * block), 0.01))  # a whole role 20x below the median
        layers.append(ratio(layer(f"h.{block}.proj", 2 * block + 1), 0.2))
    assert kinds(layers) == set()
    odd = ratio(layers[4], 0.0005)  # one attention layer 20x below its peers
    found = kinds([*layers[:4], odd, *layers[5:]])
    assert found == {("h.2.attn", "vanishing", "warning", "update")}
    collapsed = [ratio(x, 1e-6) if x.name.endswith("attn") else x for x in layers]  # a role 200000x below
    assert {k[1:] for k in kinds(collapsed)} == {("vanishing", "error", "update")}


def test_stacked_gated_layers_lag_their_peers_by_their_neutral_gates_by_design() -> None:
    """Six separate LSTM modules at default init: each gate at sigmoid(0) puts x1/4 on the gradient reaching
    its layer's input, so layer k's ||g||/||W|| carries 0.25^(5-k); the bottom sits 0.25^2.5 = 1/32 below the
    median of its peers, which is no finding. 20x below what its gates explain is one; and a stack of plain
    layers gets no such credit."""

    def stack(bottom: float, type: str = "LSTM", gate: float | None = 0.25) -> list[Layer]:
        layers = [layer("embed", 0, ratio=0.01, type="Embedding", category="embedding")]
        for k in range(6):
            value = 0.01 * 0.25 ** (5 - k) * (bottom if k == 0 else 1.0)
            layers.append(
                ratio(layer(f"rnns.{k}", k + 1, type=type, category="recurrent", neutral_gate_gain=gate), value)
            )
        return [*layers, ratio(layer("head", 7), 0.01)]

    assert kinds(stack(1.0)) == set()
    assert kinds(stack(1 / 20)) == {("rnns.0", "vanishing", "warning", "update")}
    assert ("rnns.0", "vanishing", "warning", "update") in kinds(stack(1.0, type="RNN", gate=None))


def test_a_role_across_stages_of_growing_width_is_compared_with_its_trend_over_sizes() -> None:
    """One attention projection per stage of a hierarchical net, each wider than the last (timm's SwiftFormer-XS:
    48, 56, 112, 220 wide): ||g||/||W|| falls 3-4x a stage by design, so the last stage sits 12x below the role's
    median, on its trend over sizes. A projection 100x off that trend is still found."""
    sizes, values = (2352, 3192, 12656, 48620), (3.1e-8, 9.9e-9, 2e-9, 5.1e-10)

    def role(last: float) -> list[Layer]:
        layers = [ratio(layer(f"body.{i}.fc", i), 2e-8) for i in range(8)]
        for stage, (size, value) in enumerate(zip(sizes, values, strict=True)):
            value = value * last if stage == 3 else value
            layers.append(ratio(layer(f"stages.{stage}.attn.proj", 8 + stage, params=size), value))
        return layers

    assert kinds(role(1.0)) == set()
    assert kinds(role(0.01)) == {("stages.3.attn.proj", "vanishing", "warning", "update")}
    # a trend read far from the sizes it was fitted on can say anything: it only clears what the median says
    odd = [ratio(layer(f"body.{i}.fc", i), 0.01) for i in range(8)]
    for k, (size, value) in enumerate(zip((100, 101, 102, 103, 10_000), (0.01, 0.02, 0.01, 0.02, 0.01), strict=True)):
        odd.append(ratio(layer(f"stages.{k}.mix.conv", 8 + k, params=size), value))
    assert kinds(odd) == set()


def test_a_role_across_stages_with_repeats_is_compared_with_the_other_stages_trend() -> None:
    """MaxxViT's stages hold 1, 2, 3 and 1 blocks, each stage 4x the parameters of the last, and the gradient in
    its residual stream shrinks ~7x a stage toward the input: the first stage's MLP reads ~40x below its role's
    median, ~3x below the trend of the other stages' medians (one point per size, so the stage of three
    blocks weighs as one). Cleared; 100x further off that trend it is still found."""
    blocks, values = (1, 2, 3, 1), (5.5e-7, 4.8e-6, 2.5e-5, 5.6e-5)

    def role(first: float) -> list[Layer]:
        layers = [ratio(layer(f"body.{i}.fc", i), 2e-5) for i in range(8)]
        for stage, (count, value) in enumerate(zip(blocks, values, strict=True)):
            for block in range(count):
                name, index = f"stages.{stage}.blocks.{block}.mlp.fc1", 8 + len(layers)
                layers.append(ratio(layer(name, index, params=4096 * 4**stage), value * (first if stage == 0 else 1)))
        return layers

    assert kinds(role(1.0)) == set()
    assert kinds(role(0.01)) == {("stages.0.blocks.0.mlp.fc1", "vanishing", "warning", "update")}


def test_a_pair_of_peers_cannot_say_which_of_them_is_off() -> None:
    """Two class-attention blocks (XCiT): the first block's value projection 100x above the network median
    (behind a LayerNorm of a small token), the second 2x above it. The pair's midpoint puts the second 25x
    below its 'peers'; the network median says it is not slow. Slow against both: flagged."""
    layers = [ratio(layer(f"blocks.{i}.fc", i), 0.01) for i in range(8)]  # the network median: 0.01
    fast, normal = ratio(layer("cls.0.v", 8), 1.0), ratio(layer("cls.1.v", 9), 0.02)
    assert kinds([*layers, fast, normal]) == set()
    slow = ratio(layer("cls.1.v", 9), 0.0002)  # 2500x below its pair's midpoint, 50x below the network median
    assert kinds([*layers, fast, slow]) == {("cls.1.v", "vanishing", "warning", "update")}
    # three peers: the median is the typical member, and one 25x below it is the odd one
    third = ratio(layer("cls.2.v", 10), 1.0)
    assert kinds([*layers, fast, ratio(layer("cls.1.v", 9), 0.04), third]) == {
        ("cls.1.v", "vanishing", "warning", "update")
    }


def _median_of_all_slopes(xs: list[float], ys: list[float]) -> float:
    slopes = sorted((ys[j] - ys[i]) / (xs[j] - xs[i]) for i in range(len(xs)) for j in range(i + 1, len(xs)))
    middle = len(slopes) // 2
    return slopes[middle] if len(slopes) % 2 else (slopes[middle - 1] + slopes[middle]) / 2


@pytest.mark.parametrize("count", [40, 447, 1500])
def test_the_slope_fit_is_exact_on_small_chains_and_sampled_within_a_hair_on_long_ones(count: int) -> None:
    """Theil-Sen over every pair is O(n^2) (10,000 layers: 5e7 pairs, 2 GB); beyond 100,000 pairs it takes a
    fixed sample of them. Reference: the median over all pairs, computed here."""
    from gradcheck_cli.series import theil_sen_slope

    generator = random.Random(count)
    xs = [float(i) for i in range(count)]
    ys = [-0.3 * x + generator.gauss(0.0, 5.0) + (400.0 if i % 5 == 0 else 0.0) for i, x in enumerate(xs)]
    exact = _median_of_all_slopes(xs, ys)
    fitted = theil_sen_slope(xs, ys)
    assert fitted is not None
    if count * (count - 1) // 2 <= 100_000:
        assert fitted == exact
    else:
        assert fitted == pytest.approx(exact, rel=0.01)
    assert fitted == pytest.approx(-0.3, rel=0.1)  # the outliers (every fifth point) do not move it
    assert theil_sen_slope(xs, ys) == fitted  # the sample is fixed: the same chain, the same fit


@pytest.mark.parametrize(
    ("gated", "gain", "expected"),
    [
        (False, 0.6, "vanishing"),  # a plain recurrence: x0.6^63 = 1e-14 over 64 steps
        (True, 0.6, None),  # a gate near its neutral point sigmoid(0) = 0.5: by design at init
        (True, 0.5, None),  # exactly neutral
        (True, 0.3, "vanishing"),  # gates held closed: faster than a neutral gate decays
        (True, 1.3, "exploding"),  # growth is judged for every recurrence
    ],
)
def test_gated_cells_decay_through_time_by_design_down_to_a_neutral_gate(
    gated: bool, gain: float, expected: str | None
) -> None:
    norms = tuple(gain ** (63 - t) for t in range(64))  # the first step first; the last step's gradient is 1
    rnn = dataclasses.replace(
        layer("rnn", 0), type="LSTM", category="recurrent", time_grad_norms=norms, time_gated=gated
    )
    verdict = diagnose([rnn], [1.0], Thresholds())
    kinds = [(f.kind, f.severity) for f in verdict.findings if f.view == "time"]
    assert kinds == ([] if expected is None else [(expected, "error")])
    noted = [note for note in verdict.notes if note.startswith("rnn (LSTM)")]
    assert len(noted) == (1 if expected is None else 0)
    if noted:
        assert f"x{gain:.3g} per step" in noted[0]


def lstm_stack(weight_gain: float, gate: float | None) -> list[Layer]:
    """embed, four LSTM layers, head: each layer scales dL/dz toward its input by weight_gain, an LSTM layer also
    by its gates (0.25 at sigmoid(0), i x o); gate None: the same numbers from layers not marked gated."""
    lstm = 0.25 * weight_gain
    layers = chain([weight_gain, lstm, lstm, lstm, lstm])  # l5 (head) first, then l4..l1
    gated = dict(type="LSTM", category="recurrent", neutral_gate_gain=gate)
    return [dataclasses.replace(record, **gated) if 1 <= i <= 4 else record for i, record in enumerate(layers)]


@pytest.mark.parametrize(
    ("weight_gain", "gate", "expected"),
    [
        (0.8, 0.25, None),  # x0.2 per layer, all but x0.8 of it the gates at their neutral point
        (1.0, 0.25, None),  # the whole decay is the gates
        (0.8, None, "vanishing"),  # the same numbers from layers without gates: a plain chain decaying x0.2
        (0.05, 0.25, "vanishing"),  # x0.05 per layer beyond the gates: judged
        (12.0, 0.25, "exploding"),  # x3 per layer (x12 x 1/4): growth is judged as measured
    ],
)
def test_gated_recurrent_layers_lose_their_neutral_gate_factor_by_design_and_only_that(
    weight_gain: float, gate: float | None, expected: str | None
) -> None:
    verdict = diagnose(lstm_stack(weight_gain, gate), [1.0], Thresholds())
    found = {f.kind for f in verdict.findings if f.view == "signal" and f.severity == "error"}
    assert found == (set() if expected is None else {expected})
    beyond = verdict.signal.beyond_gates_gain
    if gate is not None and weight_gain < 4:  # a decay through gated layers: the gain beyond them is reported
        assert beyond == pytest.approx(weight_gain, rel=1e-9)
    else:
        assert beyond is None


def test_query_and_key_projections_are_slow_by_design_and_judged_only_past_role_error() -> None:
    """Uniform attention makes dL/ds_ij a covariance across tokens: query/key projections learn slower than
    every other layer by design. A plain layer as slow still warns; a q/k 1e6 times below still fails."""
    layers = [layer(f"mlp{i}", i, ratio=0.01) for i in range(6)]
    slow = [
        layer("blocks.0.attn.q_proj", 6, ratio=1e-4),
        layer("encoder.attention.self.key", 7, ratio=1e-4),
        layer("lonely", 8, ratio=1e-4),
        layer("blocks.0.attn.k_proj", 9, ratio=1e-8),
    ]
    verdict = diagnose(layers + slow, [1.0], Thresholds())
    found = {(f.layer, f.severity) for f in verdict.findings if f.view == "update"}
    assert found == {("lonely", "warning"), ("blocks.0.attn.k_proj", "error")}


def test_a_small_input_makes_query_and_key_projections_slower_by_its_square() -> None:
    """dL/dW_q at uniform attention carries three factors of the input (value spread, key, x) against one in the
    other layers: at input RMS 1e-3 a q/k projection is expected 1e6x slower. 1e-8 against a median of 0.01 is
    1e6x: within role_error (1e5) of what that input explains, 10x past it at unit scale. A large input is not
    credited (its attention is no longer uniform)."""
    layers = [layer(f"mlp{i}", i, ratio=0.01) for i in range(6)]

    def key(rms: float) -> list:
        return [layer("blocks.0.attn.k_proj", 6, ratio=1e-8, input_rms=rms)]

    assert diagnose(layers + key(1e-3), [1.0], Thresholds()).findings == []
    for rms in (1.0, 30.0):
        found = {(f.layer, f.severity) for f in diagnose(layers + key(rms), [1.0], Thresholds()).findings}
        assert found == {("blocks.0.attn.k_proj", "error")}


def test_a_dash_separated_block_index_is_a_position_not_a_role() -> None:
    from gradcheck_cli.diagnose.peers import peer_group

    assert peer_group("trunk_output.block3.block3-4.f.se.fc1") == "trunk_output.block3.block3-#.f.se.fc1"
    assert peer_group("layer1.0.conv1") == "layer1.#.conv1"  # conv1 and conv2 stay different roles


def test_query_key_projections_of_a_softmax_over_one_position_are_dead_and_say_why() -> None:
    """A softmax over one position is 1 whatever its logit (d softmax_i / d s_j = p_i (delta_ij - p_j) = 0 at
    p = 1), so q and k get exactly zero gradient while v and the output projection learn; over 8 positions
    all four learn."""
    import torch
    from torch import nn

    import gradcheck_cli

    class Attention(nn.Module):
        def __init__(self, width: int = 16) -> None:
            super().__init__()
            self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            logits = self.q(x) @ self.k(x).transpose(1, 2) / 4.0
            return x + self.o(torch.softmax(logits, dim=-1) @ self.v(x))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.attn, self.head = nn.Linear(8, 16), Attention(), nn.Linear(16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.attn(self.embed(x)).mean(dim=1))

    torch.manual_seed(0)
    for positions in (1, 8):
        x, y = torch.randn(32, positions, 8), torch.randint(0, 3, (32,))
        report = gradcheck_cli.analyze(Net(), (x, y), steps=2)
        dead = {f.layer: f for f in report.findings if f.kind == "dead"}
        if positions == 1:
            assert set(dead) == {"attn.q", "attn.k"}
            assert all(f.severity == "error" and "single position" in f.message for f in dead.values())
            assert "while v beside it learns" in dead["attn.q"].message or "while o beside" in dead["attn.q"].message
        else:
            assert not dead


@pytest.mark.parametrize(("units", "severity"), [(8, "warning"), (16, "error")])
def test_a_narrow_layer_whose_relus_all_die_is_an_error_only_past_chance(units: int, severity: str) -> None:
    """A squeeze-excitation's reduction of 8 units, each dead at init with probability up to 1/2 (a ReLU reading
    one pooled vector per image): all 8 at once is 1 in 256, which random init alone gives (CHANCE_DEAD 1e-3;
    timm sehalonet33ts at seed 0). The layer gets no gradient at all: a warning that says why. 16 units all dead
    (1 in 65,536) is an error."""
    import torch
    from torch import nn

    import gradcheck_cli

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.fc1 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, units, 1)
            self.act, self.fc2, self.head = nn.ReLU(), nn.Conv2d(units, 16, 1), nn.Linear(16, 3)
            with torch.no_grad():
                self.fc1.bias.fill_(-3.0)  # pooled inputs are O(0.1): every unit below 0 on every image

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.conv(x))
            gate = torch.sigmoid(self.fc2(self.act(self.fc1(h.mean((2, 3), keepdim=True)))))
            return self.head((h * gate).mean((2, 3)))

    torch.manual_seed(0)
    batch = (torch.randn(8, 3, 8, 8), torch.randint(0, 3, (8,)))
    report = gradcheck_cli.analyze(Net(), batch, steps=2)
    assert report.layer("fc1").dead_fraction == 1.0 and report.layer("fc1").grad_norm == 0.0
    dead = {f.view: f for f in report.findings if f.layer == "fc1" and f.kind == "dead"}
    assert dead["numeric"].severity == severity
    assert (f"all {units} ReLU units after it never activate" in dead["numeric"].message) == (severity == "warning")
    assert ("activation" in dead) == (severity == "error")  # the activation rule's chance, the same


def test_an_embedding_that_only_looks_up_its_padding_row_is_unused_not_dead() -> None:
    """nn.Embedding's backward adds dL/dz into the rows looked up except padding_idx's: a table read only at
    its padding index gets exactly 0 while its output gets a gradient (RoCBert's shape ids default to zeros,
    its padding_idx). The inputs never exercise it: unused, a warning. Read at other indices, it learns."""
    import torch
    from torch import nn

    import gradcheck_cli

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.words, self.shapes = nn.Embedding(50, 16), nn.Embedding(20, 16, padding_idx=0)
            self.head = nn.Linear(16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            words, shapes = x.unbind(-1)
            return self.head((self.words(words) + self.shapes(shapes)).mean(1))

    torch.manual_seed(0)
    words, labels = torch.randint(0, 50, (8, 12)), torch.randint(0, 3, (8,))
    for shapes in (torch.zeros(8, 12, dtype=torch.long), torch.randint(1, 20, (8, 12))):
        report = gradcheck_cli.analyze(Net(), (torch.stack([words, shapes], -1), labels), steps=2)
        found = {(f.layer, f.kind, f.severity) for f in report.findings}
        if shapes.max() == 0:
            assert found == {("shapes", "unused", "warning")}
            assert (report.layer("shapes").output_grad_norm or 0) > 0 and report.layer("shapes").grad_norm == 0
        else:
            assert found == set()


def test_a_layer_reading_a_layer_norm_over_one_feature_is_dead_and_says_its_input_is_zero() -> None:
    """CSATv2's spatial attention normalises one channel: LayerNorm over a single feature gives (x - mean) = 0,
    so its output is its bias (0 at init) for every x, and the bias-free projection reading it gets dL/dW =
    dL/dz x 0 = 0 whatever reaches it. Dead, with that cause; over two features it learns."""
    import torch
    from torch import nn

    import gradcheck_cli

    class Net(nn.Module):
        def __init__(self, features: int) -> None:
            super().__init__()
            self.embed, self.norm = nn.Linear(8, features), nn.LayerNorm(features)
            self.proj, self.head = nn.Linear(features, 16, bias=False), nn.Linear(16 + features, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.embed(x)
            return self.head(torch.cat([self.proj(self.norm(h)), h], dim=1))

    torch.manual_seed(0)
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    for features in (1, 2):
        report = gradcheck_cli.analyze(Net(features), (x, y), steps=2)
        dead = {f.layer: f for f in report.findings if f.kind == "dead"}
        if features == 1:
            assert set(dead) == {"proj"} and dead["proj"].severity == "error"
            assert "and so is its input" in dead["proj"].message and "single feature" in dead["proj"].fix
        else:
            assert not dead


@pytest.mark.parametrize(
    ("start", "feeds_norm", "judged"),
    [(0.01, True, False), (1.0, True, True), (0.01, False, True)],
)
def test_a_normalised_residual_nets_gradient_is_judged_at_its_inputs_scale_below_unit_rms(
    start: float, feeds_norm: bool, judged: bool
) -> None:
    """signal._at_input_scale. Ten layers whose dL/dz grows x2 per layer toward the input while their input's
    RMS grows x2 per layer toward the output, from `start`: dL/dz x RMS(input) is the same at every layer, as in
    a net whose branches normalise their output (OLMo-2). From 0.01 (0.01 .. 5.1) the inputs are below unit
    scale for the first 7 layers: credited, flat there; the last 3 keep their x2, and the fit over all pairs
    stays under residual_gain: no finding. From 1.0 the inputs grow past unit scale at
    every layer (a forward explosion: 1 .. 512): no credit, the x2 trend stands. Without normalisation layers
    the credit does not apply at all (a stream's scale then reaches the loss)."""
    layers = chain([2.0] * 9, feeds_norm=feeds_norm)
    layers = [dataclasses.replace(item, input_rms=start * 2.0**i) for i, item in enumerate(layers)]
    verdict = diagnose(layers, [1.0], Thresholds(), residual=True)
    exploding = [f for f in verdict.findings if f.view == "signal" and f.kind == "exploding"]
    assert verdict.signal.gain_per_layer == pytest.approx(2.0)
    assert bool(exploding) is judged
    if not judged:
        assert verdict.signal.input_scale_gain is not None and verdict.signal.input_scale_gain < 1.5


@pytest.mark.parametrize(("stem", "flagged"), [(5e-4, False), (2.5e-5, True)])
def test_a_layer_without_peers_is_compared_with_the_same_sublayer_of_the_other_blocks(
    stem: float, flagged: bool
) -> None:
    """peers.peer_medians: a stem's squeeze-excitation (stem.se.fc1) has no role of its own; the same sublayer
    in the ten blocks (blocks.#.se.fc1) learns 20x slower than the network median (their 30 MLP layers) by
    design of where it sits (a pooled input): the stem's copy is compared with them, not with the median, and
    is flagged only when it is slow against them too (20x below its twins: a warning)."""
    layers = [layer(f"blocks.{i}.mlp.fc{j}", 4 * i + j, ratio=0.01) for i in range(10) for j in range(3)]
    layers += [layer(f"blocks.{i}.se.fc1", 4 * i + 3, ratio=5e-4) for i in range(10)]
    layers.append(layer("stem.se.fc1", 40, ratio=stem))
    verdict = diagnose(layers, [1.0], Thresholds())
    found = [(f.layer, f.kind, f.view) for f in verdict.findings]
    assert (("stem.se.fc1", "vanishing", "update") in found) is flagged, found
    assert not [f for f in verdict.findings if f.layer != "stem.se.fc1"]


def test_depthwise_and_pointwise_convolutions_under_one_name_are_fitted_apart() -> None:
    """signal._group: Hugging Face's MobileNet-v1 names both halves of each depthwise-separable pair
    layer.#.convolution; a depthwise 3x3 (9 inputs per output) sits ~4x above the pointwise 1x1 after it in
    per-position dL/dz by design, and each resolution starts on a (strided) depthwise conv. Fitted as one group,
    every resolution's run reads high-to-low, a slope the layers do not have. Here the true trend is x1.1 per
    layer over 24 layers (1.1^23 = 9x, under the 20x warning): one group per layout recovers it, one group for
    both read x1.39 and an error."""
    layers = [
        layer(
            f"layer.{k}.convolution",
            k,
            dz=1.1 ** (23 - k) * (4.0 if k % 2 == 0 else 1.0),
            type="Conv2d",
            category="conv",
            output_positions=float(4 ** (6 - k // 4)),
            layout="3x3 depthwise" if k % 2 == 0 else "1x1",
        )
        for k in range(24)
    ]
    verdict = diagnose(layers, [1.0], Thresholds())
    assert verdict.signal.gain_per_layer == pytest.approx(1.1)
    assert not verdict.findings, verdict.findings


def test_a_convolution_layout_names_its_kernel_and_grouping() -> None:
    assert layout(nn.Conv2d(8, 8, 3, groups=8)) == "3x3 depthwise"
    assert layout(nn.Conv2d(8, 16, 1)) == "1x1"
    assert layout(nn.Conv1d(8, 16, 5, groups=2)) == "5 groups 2"
    assert layout(nn.Conv3d(4, 4, (1, 3, 3))) == "1x3x3"
    assert layout(nn.Linear(4, 4)) is None


@pytest.mark.parametrize(("weights_per_unit", "flagged"), [(1, False), (9, True)])
def test_one_weight_per_unit_before_a_norm_is_not_a_starved_unit(weights_per_unit: int, flagged: bool) -> None:
    """A 1x1 depthwise conv (MobileOne's scale branch) has one weight per channel, and the BatchNorm it feeds
    divides it out: BN(w x) = BN(x) for w > 0 while w^2 var(x) dwarfs BN's eps, so dL/dw is 0 up to rounding
    by design, and 80% of its units below 1e-5 of the RMS row is no starved unit. A 3x3 depthwise conv has 9
    weights per unit whose direction BN does not remove: 80% starved there is a finding."""
    units = 128
    layers = chain([1.0] * 9)
    scale = layer(
        "scale",
        10,
        units=units,
        params=units * weights_per_unit,
        trainable_params=units * weights_per_unit,
        feeds_norm=True,
        zero_grad_unit_fraction=0.8,
    )
    verdict = diagnose([*layers, scale], [1.0], Thresholds())
    dead = [f for f in verdict.findings if f.kind == "dead" and f.layer == "scale"]
    assert bool(dead) is flagged, verdict.findings


def test_a_loop_over_depth_with_a_call_that_got_no_gradient_is_fitted_on_the_others() -> None:
    """diagnose/time._judge_block: a call whose gradient is exactly 0 (nothing usable on a log scale) is left
    out of the fit, as the per-layer fit of a time loop leaves it out; the other calls still carry the trend:
    x0.25 per call over 8 calls, 0.25**7 = 6e-5, an error."""
    norms = tuple(0.25 ** (7 - t) for t in range(8))
    block = [
        layer(name, i, time_grad_norms=(norms[0], 0.0, *norms[2:]) if i else norms, loop_over_depth=True)
        for i, name in enumerate(("shared.a", "shared.b"))
    ]
    verdict = diagnose([*chain([1.0] * 4), *block], [1.0], Thresholds())
    found = [f for f in verdict.findings if f.view == "time"]
    assert [(f.layer, f.kind, f.severity) for f in found] == [("shared.a", "vanishing", "error")]
    assert found[0].factor == pytest.approx(0.25**7) and found[0].also == ("shared.b",)


@pytest.mark.parametrize("p", [0.5, 0.999])
def test_a_heavy_dropout_is_named_as_the_cause_of_the_units_before_it_getting_no_gradient(p: float) -> None:
    """A unit behind nn.Dropout(p) gets a gradient from a sample with probability 1 - p, so over 3 steps of 8
    samples it gets none with probability p^24: 6e-8 at p = 0.5, 0.976 at p = 0.999 (Hugging Face
    MobileNetV1Config's default classifier_dropout_prob). At 0.999 nearly all of the first layer's 64 units starve
    (GELU: no ReLU module to count active units, so the starved rows are what is judged), a true finding, and the
    note names the dropout as its cause; at 0.5 there is neither."""
    import torch

    import gradcheck_cli

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Dropout(p), nn.Linear(64, 4))
    batches = [(torch.randn(8, 16), torch.randint(0, 4, (8,))) for _ in range(3)]
    report = gradcheck_cli.analyze(model, batches, steps=3)
    starved = report.layer("0").zero_grad_unit_fraction or 0.0
    named = [note for note in report.notes if note.startswith("2 (Dropout, p=0.999)")]
    dead = [f for f in report.findings if f.layer == "0" and f.kind == "dead"]
    if p == 0.5:
        assert starved == 0.0 and not named and not dead
    else:
        assert starved > 0.85 and len(named) == 1 and dead, (starved, report.notes)
