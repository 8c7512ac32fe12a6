"""Mixed precision on CPU: unscaled gradients, the loss scale, underflow in the AMP dtype."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradcheck_cli


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(32, 64, generator=g), torch.randint(0, 10, (32,), generator=g)


def _autocast_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
    """Independent reference: the same pass under torch.autocast, unscaled."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize(("amp", "dtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_amp_reports_unscaled_gradients(amp: str, dtype: torch.dtype) -> None:
    model, (x, y) = _net(), _batch()
    report = gradcheck_cli.analyze(model, (x, y), steps=1, amp=amp)
    reference = _autocast_grads(model, x, y, dtype)
    for record, grad in zip(report.parameters, reference, strict=True):
        # fp16 gradients carried a loss scale of 2^16 and are reported divided by it
        assert record.grad_norm == pytest.approx(grad.norm().item(), rel=2e-3)
    assert report.amp == amp
    assert report.loss_scale == (65536.0 if amp == "fp16" else None)
    assert report.findings == []
    assert all(layer.underflow_fraction == 0.0 for layer in report.layers)


def test_fp16_overflow_backs_off_the_scale_like_gradscaler() -> None:
    """Targets 300x the outputs: dL/dz ~ 1e3, times 2^16 overflows fp16's 65504; halving until it fits."""
    model, (x, _) = _net(), _batch()
    targets = torch.randn(32, 10, generator=torch.Generator().manual_seed(1)) * 300
    report = gradcheck_cli.analyze(model, (x, targets), steps=2, amp="fp16", loss_fn="mse")
    fp32 = gradcheck_cli.analyze(model, (x, targets), steps=2, loss_fn="mse")
    assert report.skipped_steps > 0
    assert report.loss_scale is not None and report.loss_scale < 65536
    assert report.loss_scale == 65536 / 2**report.skipped_steps  # halved once per overflow (one step retried)
    for a, b in zip(report.parameters, fp32.parameters, strict=True):
        assert a.grad_norm == pytest.approx(b.grad_norm, rel=2e-3)
    assert not any(f.kind == "nan" for f in report.findings)


def test_underflow_is_found_and_zeros_are_not_counted() -> None:
    """A loss scaled by 1e-9 pushes gradients below fp16's smallest normal (6.1e-5) even at scale 2^16;
    the ReLU zeros of a healthy net are not underflow."""
    model, (x, y) = _net(), _batch()

    def tiny_loss(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output, targets) * 1e-9

    report = gradcheck_cli.analyze(model, (x, y), tiny_loss, steps=1, amp="fp16")
    assert all((layer.underflow_fraction or 0) > 0.5 for layer in report.layers)
    assert {(f.kind, f.view, f.severity) for f in report.findings} == {("vanishing", "numeric", "error")}
    healthy = gradcheck_cli.analyze(model, (x, y), steps=1, amp="fp16")
    assert all(layer.zero_fraction is not None for layer in healthy.layers)
    assert all(layer.output_grad_underflow_fraction == 0.0 for layer in healthy.layers[:2])  # ReLU zeros excluded


def test_unknown_amp_is_a_user_error() -> None:
    with pytest.raises(gradcheck_cli.UserError, match="unknown --amp"):
        gradcheck_cli.analyze(_net(), _batch(), amp="fp8")


def test_one_host_synchronisation_per_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every device-to-host read goes through these methods; a step must use exactly one."""
    model, batch = _net(), _batch()
    gradcheck_cli.analyze(model, batch, steps=1)  # warm up imports and caches
    calls = {"count": 0, "depth": 0}
    for name in ("tolist", "item", "__float__", "__int__", "__bool__"):
        original = getattr(torch.Tensor, name)

        def counted(self: torch.Tensor, *args: object, _original: object = original) -> object:
            # one read, however many times a TorchFunctionMode (flat.py) hands the same call back through here
            calls["count"] += calls["depth"] == 0
            calls["depth"] += 1
            try:
                return _original(self, *args)  # type: ignore[operator]
            finally:
                calls["depth"] -= 1

        monkeypatch.setattr(torch.Tensor, name, counted)
    reads = []
    for steps in (2, 5):
        calls["count"] = 0
        gradcheck_cli.analyze(model, batch, steps=steps)
        reads.append(calls["count"])
    assert reads[1] - reads[0] == 3  # three more steps, three more reads
    assert reads[0] <= 2 + 2  # the steps, the weight norms, the final masks and histograms


def test_fp16_saved_gradients_and_value_histograms_are_unscaled(tmp_path) -> None:
    from safetensors.torch import load_file

    model, (x, y) = _net(), _batch()
    path = tmp_path / "grads.safetensors"
    report = gradcheck_cli.analyze(model, (x, y), steps=1, amp="fp16", save_grads=path, value_histograms=True)
    reference = _autocast_grads(model, x, y, torch.float16)
    saved = load_file(str(path))
    for (name, _), grad in zip(model.named_parameters(), reference, strict=True):
        layer, parameter = name.split(".")
        assert torch.allclose(saved[f"step0/{layer}/{parameter}"], grad, rtol=1e-2, atol=1e-6), name
    for layer in report.layers:
        assert layer.value_histograms is not None
        # tensors this small are sampled whole: the histogram's range is the layer's largest |g|, unscaled
        assert layer.value_histograms[0].limit == pytest.approx(layer.max_abs, rel=1e-5)
