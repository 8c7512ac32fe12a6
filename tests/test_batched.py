"""The batched reductions (issue 18): many small gradients reduced together (reduce.reduce_small) and the hooks'
samples reduced at the step's end (tape.StepTape.blocks) give what each tensor reduced alone gives, checked
against plain torch arithmetic written out here."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradcheck_cli.layers import SIGMOID_SATURATED_HIGH, SIGMOID_SATURATED_LOW, TANH_SATURATED
from gradcheck_cli.reduce import STARVED_UNIT, on_device, reduce_small
from gradcheck_cli.tape import StepTape


def _expected(grad: torch.Tensor, rows: bool, starved: float) -> tuple[float, float, float, list[bool] | None]:
    values = grad.detach().double().reshape(-1)
    norm_sq = float(values.square().sum())
    touched = None
    if rows and grad.dim() >= 2:
        row_sq = grad.detach().double().reshape(grad.shape[0], -1).square().sum(1)
        floor = norm_sq / grad.shape[0] * starved**2
        touched = [not (float(r) <= floor) for r in row_sq]
    return norm_sq, float((values == 0).sum()), float(values.abs().max()), touched


def test_small_gradients_reduced_together_equal_each_alone() -> None:
    g = torch.Generator().manual_seed(3)
    grads = [
        torch.randn(6, 5, generator=g),
        torch.randn(7, generator=g),
        torch.zeros(3, 4),
        torch.randn(4, 2, 3, generator=g),
        torch.randn(1, generator=g),
    ]
    grads[0][2] = 0.0  # a row with no gradient
    grads[0][4] *= 1e-7  # a starved row: below STARVED_UNIT of the RMS row
    grads[3][1] = 0.0
    rows = [True, False, True, True, False]
    starved = [STARVED_UNIT, STARVED_UNIT, 0.0, STARVED_UNIT, 0.0]
    batch = reduce_small(grads, rows, starved)
    at = 0
    for i, (grad, want, floor) in enumerate(zip(grads, rows, starved, strict=True)):
        norm_sq, zeros, max_abs, touched = _expected(grad, want, floor)
        assert float(batch.norm_sq[i]) == pytest.approx(norm_sq, rel=1e-12)
        assert float(batch.zeros[i]) == zeros
        assert float(batch.max_abs[i]) == pytest.approx(max_abs, rel=1e-7)
        count = batch.counts[i]
        if touched is not None:
            assert batch.touched_rows[at : at + count].tolist() == touched
        at += count
    assert batch.touched_rows[0:6].tolist() == [True, True, False, True, False, True]
    assert batch.sizes == [g.numel() for g in grads]


def test_small_gradients_keep_nan_and_count_underflow() -> None:
    grads = [torch.tensor([[1.0, float("nan")], [0.5, 0.0]]), torch.tensor([1e-6, 0.0, 2.0, 1e-8])]
    batch = reduce_small(grads, [True, False], [STARVED_UNIT, 0.0], tiny=1e-5)
    assert math.isnan(float(batch.norm_sq[0])) and math.isnan(float(batch.max_abs[0]))
    assert batch.touched_rows[:2].tolist() == [True, True]  # a NaN row got a gradient (the numeric rule's finding)
    assert float(batch.norm_sq[1]) == pytest.approx(1e-12 + 4.0 + 1e-16)
    assert batch.underflow is not None and batch.underflow.tolist() == [0.0, 2.0]  # nonzero values below tiny


def test_float64_small_gradients_keep_their_precision() -> None:
    grad = torch.full((3,), 1.0 + 1e-12, dtype=torch.float64)
    batch = reduce_small([grad], [False], [0.0])
    assert float(batch.norm_sq[0]) == pytest.approx(3 * (1.0 + 1e-12) ** 2, rel=1e-15)


def _blocks(tape: StepTape) -> dict[tuple[int, str], float]:
    found = {}
    for block in tape.blocks(torch.device("cpu")):
        assert block.column is not None and block.keys is not None  # one value per layer
        for layer, value in zip(block.keys, block.vector.tolist(), strict=True):
            found[(layer, block.column)] = value
    return found


def test_tape_sums_each_layers_calls_and_applies_the_squash_rule() -> None:
    g = torch.Generator().manual_seed(0)
    tanh_out = torch.tanh(3 * torch.randn(40, 30, generator=g))  # spans [-1, 1], many near the bounds
    sigmoid_out = torch.sigmoid(4 * torch.randn(50, 20, generator=g))
    relu_out = torch.relu(torch.randn(30, 20, generator=g))  # in [0, inf), half exact zeros: not squashed
    small = 0.1 * torch.rand(10, 10, generator=g)  # bounded by chance, spans little of [0, 1]: not squashed
    tape = StepTape()
    tape.keep(tanh_out, layer=1, squashed_for=0)
    tape.keep(tanh_out, layer=1, squashed_for=0)  # a second call of layer 1
    tape.keep(sigmoid_out, layer=2, squashed_for=5)
    tape.keep(relu_out, layer=3, squashed_for=6)
    tape.keep(small, layer=4, squashed_for=7)
    pre = 3 * torch.randn(20, 20, generator=g)
    tape.keep(pre, layer=None, saturated_for=8, limit=2.0)  # an nn.Tanh module's input
    found = _blocks(tape)
    assert found[(1, "input_sq")] == pytest.approx(2 * float(tanh_out.double().square().sum()))
    assert found[(3, "input_zero")] == float((relu_out == 0).sum())
    assert found[(0, "saturated")] == 2 * float((tanh_out.abs() > TANH_SATURATED).sum())
    assert found[(0, "bounded_numel")] == 2 * tanh_out.numel()
    near = ((sigmoid_out < SIGMOID_SATURATED_LOW) & (sigmoid_out != 0)) | (sigmoid_out > SIGMOID_SATURATED_HIGH)
    assert found[(5, "saturated")] == float(near.sum())
    assert found[(6, "bounded_numel")] == 0.0 and found[(7, "bounded_numel")] == 0.0
    assert found[(8, "saturated")] == float((pre.abs() > 2.0).sum())
    assert (8, "bounded_numel") not in found and (8, "input_sq") not in found


def test_tape_copies_its_samples() -> None:
    """The model may change a tensor in place after a layer read it: the tape keeps what the layer read."""
    x = torch.ones(4, 4)
    tape = StepTape()
    tape.keep(x, layer=0)
    x.mul_(3.0)
    assert _blocks(tape)[(0, "input_sq")] == 16.0


def test_many_small_layers_measure_what_autograd_gives() -> None:
    """End to end: 300 small layers side by side (all reduced together) next to one large one (alone)."""
    import gradcheck_cli

    torch.manual_seed(0)

    class SideBySide(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.small = nn.ModuleList(nn.Linear(32, 2) for _ in range(300))
            self.large = nn.Linear(32, 600)  # 19,200 weights: reduced alone

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = torch.cat([layer(x) for layer in self.small], dim=1) + self.large(x).tanh()
            return out.reshape(x.shape[0], -1, 10).sum(1)

    model = SideBySide()
    x, y = torch.randn(16, 32), torch.randint(0, 10, (16,))
    nn.functional.cross_entropy(model(x), y).backward()
    expected = {name: float(p.grad.norm()) for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    report = gradcheck_cli.analyze(model, (x, y), steps=1)
    measured = {p.name: p.grad_norm for p in report.parameters}
    assert measured.keys() == expected.keys()
    for name, value in expected.items():
        assert measured[name] == pytest.approx(value, rel=1e-5), name


def test_constant_vectors_are_not_kept_on_a_cpu() -> None:
    first, second = on_device([1, 2, 3], torch.device("cpu")), on_device([1, 2, 3], torch.device("cpu"))
    assert first.tolist() == [1, 2, 3] and first.data_ptr() != second.data_ptr()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_one_host_synchronisation_per_measured_step_on_cuda() -> None:
    """Each further measured step adds exactly one synchronisation (its transfer): counted with torch's sync
    debug mode, which warns on every operation that waits for the device."""
    import warnings

    import gradcheck_cli

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10)).cuda()
    batch = (torch.randn(32, 64, device="cuda"), torch.randint(0, 10, (32,), device="cuda"))

    def synchronisations(steps: int) -> int:
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                gradcheck_cli.analyze(model, batch, steps=steps, device="cuda")
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    assert synchronisations(5) - synchronisations(3) == 2


def test_bin_counts_without_bincount_are_the_same() -> None:
    """The GPU path of the |g| histograms (no bincount, which synchronises there) counts as bincount does."""
    from gradcheck_cli.reduce import bin_counts

    bins = torch.randint(0, 300, (5000,), generator=torch.Generator().manual_seed(1))
    assert torch.equal(bin_counts(bins, 300, bincount=False), torch.bincount(bins, minlength=300))


def test_layers_reading_one_tensor_share_its_sample_until_it_changes() -> None:
    """Query, key and value projections read one tensor: one sample, each layer's sums as if it had its own;
    a tensor changed in place since is sampled again (its version)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 8, generator=g)
    tape = StepTape()
    for layer in (0, 1, 2):
        tape.keep(x, layer=layer)
    tape.keep(x, layer=None, saturated_for=2, limit=1.0)  # an activation's limit: a sample of its own
    assert len(tape.samples) == 2
    x.mul_(2.0)
    tape.keep(x, layer=3)
    assert len(tape.samples) == 3
    found = _blocks(tape)
    expected = float(x.double().square().sum()) / 4  # x before the doubling
    for layer in (0, 1, 2):
        assert found[(layer, "input_sq")] == pytest.approx(expected)
    assert found[(3, "input_sq")] == pytest.approx(4 * expected)
    assert found[(2, "saturated")] == float((x.abs() / 2 > 1.0).sum())


@pytest.mark.parametrize("tiled", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_max_abs_and_zero_count_are_exact_for_signed_zeros_and_nonfinite_values(
    dtype: torch.dtype, tiled: bool
) -> None:
    """reduce_gradient's max |g| and count of exact zeros, checked against float arithmetic on the values
    written out here: == 0 (which is true of -0.0) and the largest |x| (NaN wherever there is one). Tiled:
    each case repeated past two of the CPU path's blocks (its count is the case's times the copies), and put
    once at the end of zeros-free values, so that one block holds it and the others none."""
    from gradcheck_cli.reduce import BLOCK, reduce_gradient

    g, tiny = torch.Generator().manual_seed(7), torch.finfo(dtype).tiny
    base = torch.randn(5000, generator=g).to(dtype)
    base[torch.rand(5000, generator=g) < 0.3] = 0.0
    cases = {
        "zeros at random": base,
        "masked: -0.0 where the value was negative": torch.randn(5000, generator=g).to(dtype) * (base != 0),
        "all negative": -torch.rand(300, generator=g).to(dtype) - 0.5,
        "negative and -0.0 only": torch.tensor([-0.0, -3.0, -0.0], dtype=dtype),
        "one +0.0": torch.zeros(1, dtype=dtype),
        "-inf beside positives": torch.tensor([1.0, -float("inf"), 0.0], dtype=dtype),
        "NaN among negatives": torch.tensor([-1.0, float("nan"), -0.0], dtype=dtype),
        "negative NaN": torch.tensor([2.0, -float("nan")], dtype=dtype),
        "subnormal beside zero": torch.tensor([tiny / 4, 0.0, -tiny / 8], dtype=dtype),
    }
    filler = torch.full((2 * BLOCK,), 0.25, dtype=dtype)  # no zeros, below every case's largest |x| but one
    for name, values in cases.items():
        zeros_expected = sum(1 for v in values.tolist() if v == 0.0)
        magnitudes = [abs(v) for v in values.tolist()]
        expected = float("nan") if any(math.isnan(v) for v in magnitudes) else max(magnitudes)
        expected = float(torch.tensor(expected, dtype=torch.float64).float())  # reported in float32
        runs = [(values, zeros_expected, expected)]
        if tiled:
            copies = 2 * BLOCK // values.numel() + 1
            runs = [
                (values.repeat(copies), copies * zeros_expected, expected),
                (torch.cat([filler, values]), zeros_expected, expected if not expected < 0.25 else 0.25),
            ]
        for tensor, zeros_wanted, largest_wanted in runs:
            reduced = reduce_gradient(tensor, want_rows=False)
            largest, zeros = reduced.max_abs, reduced.zeros
            assert zeros.item() == zeros_wanted, name
            assert largest.dtype == torch.float32, name
            if math.isnan(largest_wanted):
                assert math.isnan(largest.item()), name
            else:
                assert largest.item() == largest_wanted, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(3, 1_500_001), (1, (1 << 22) + 3), (700, 9000), ((1 << 22) * 2 + 5,)])
def test_large_cpu_gradients_reduced_by_blocks_give_every_row_and_the_exact_counts(
    dtype: torch.dtype, shape: tuple[int, ...]
) -> None:
    """The CPU path for large gradients (blocks of whole rows, or of values where a row is longer than a
    block): row norms, the squared norm, max |g| and the zero count against float64 arithmetic on the whole
    tensor. Zeros of both signs sit in one row and in one column, and one -0.0 alone in the last block."""
    from gradcheck_cli.reduce import reduce_gradient

    g = torch.Generator().manual_seed(3)
    grad = torch.randn(shape, generator=g).to(dtype)
    flat = grad.view(-1)
    dead = 1 if shape[0] > 1 else None
    if dead is not None:
        grad[dead] = 0.0
    if grad.dim() == 2:
        grad[:, 5] = -0.0
    flat[: flat.numel() // 3] *= 1.5
    flat[-2] = -0.0
    reduced = reduce_gradient(grad, want_rows=True)
    exact = grad.double()
    assert reduced.zeros.item() == int((exact == 0).sum())
    assert reduced.max_abs.item() == float(exact.abs().max().float())
    # float32: torch's own sums of millions of squares (vector_norm, as before this path) err by ~1e-4
    tolerance = 5e-4 if dtype == torch.float32 else 1e-12
    assert reduced.norm_sq.item() == pytest.approx(float(exact.square().sum()), rel=tolerance)
    if grad.dim() == 2:
        assert reduced.touched_rows is not None
        assert reduced.touched_rows.tolist() == [i != dead for i in range(shape[0])]
