"""The model is left as found: no hooks, same grads, modes, buffers and weights; the caller's hooks survive."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradcheck_cli
from gradcheck_cli.errors import ModelRunError
from gradcheck_cli.probe import hook_count


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(inplace=True), nn.Dropout(0.5), nn.Linear(16, 4))


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(10, 8, generator=g), torch.randint(0, 4, (10,), generator=g)


def _tensor_hooks(model: nn.Module) -> int:
    return sum(len(p._backward_hooks or {}) for p in model.parameters())


def test_no_hooks_remain_after_a_run() -> None:
    model = _net()
    gradcheck_cli.analyze(model, _batch())
    assert hook_count(model) == 0
    assert _tensor_hooks(model) == 0


class FailsOnSecondCall(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("boom on call 2")
        return self.fc(x)


def test_no_hooks_remain_after_a_failing_run_and_the_state_is_restored() -> None:
    model = FailsOnSecondCall()
    model.eval()
    before = model.fc.weight.detach().clone()
    with pytest.raises(ModelRunError, match="boom on call 2"):
        gradcheck_cli.analyze(model, _batch(), steps=3)
    assert hook_count(model) == 0
    assert not model.training
    assert model.fc.weight.grad is None
    assert torch.equal(model.fc.weight, before)


def test_modes_grads_buffers_and_weights_are_restored() -> None:
    model = _net()
    model.eval()
    model[1].train()  # a mixed state must come back exactly
    x, y = _batch()
    model(x).sum().backward()
    grads = [p.grad for p in model.parameters()]
    buffers = [b.clone() for b in model.buffers()]
    weights = [p.detach().clone() for p in model.parameters()]
    modes = [m.training for m in model.modules()]

    gradcheck_cli.analyze(model, (x, y), train_steps=2, lr=0.5)

    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is g for p, g in zip(model.parameters(), grads, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), buffers, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), weights, strict=True))


def test_train_steps_change_what_is_measured() -> None:
    model = _net()
    batch = _batch()
    at_init = gradcheck_cli.analyze(model, batch, steps=1)
    trained = gradcheck_cli.analyze(model, batch, steps=1, train_steps=5, lr=0.5)
    assert len(trained.train_loss) == 5
    assert trained.loss[0] < at_init.loss[0]  # SGD on one batch lowers its loss
    again = gradcheck_cli.analyze(model, batch, steps=1)
    assert again.loss == pytest.approx(at_init.loss)  # and the model was put back


def test_the_callers_own_hooks_survive_and_still_fire() -> None:
    model = _net()
    seen: list[int] = []
    handle = model[0].register_forward_hook(lambda m, i, o: seen.append(1))
    gradcheck_cli.analyze(model, _batch(), steps=2)
    assert len(seen) == 2  # fired during the analysis
    assert hook_count(model) == 1
    model(_batch()[0])
    assert len(seen) == 3
    handle.remove()


def test_global_rng_state_is_untouched() -> None:
    model, batch = _net(), _batch()
    torch.manual_seed(1234)
    state = torch.random.get_rng_state()
    gradcheck_cli.analyze(model, batch, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_runs_are_deterministic_for_a_seed() -> None:
    model = _net()  # has dropout: the seed fixes its masks
    first = gradcheck_cli.analyze(model, _batch(), seed=3)
    second = gradcheck_cli.analyze(model, _batch(), seed=3)
    assert [p.grad_norm for p in first.parameters] == [p.grad_norm for p in second.parameters]


def test_torch_compile_wrapper_is_unwrapped() -> None:
    inner = _net()

    class Wrapper(nn.Module):  # what torch.compile returns: the eager module under _orig_mod
        def __init__(self) -> None:
            super().__init__()
            self._orig_mod = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self._orig_mod(x)

    report = gradcheck_cli.analyze(Wrapper(), _batch())
    assert [layer.name for layer in report.layers] == ["0", "1", "4"]
    assert any("torch.compile" in note for note in report.notes)


def test_the_model_output_is_not_kept_alive_through_the_backward() -> None:
    """A training loop frees the logits once the loss has its own copy (log_softmax saves its result, not its
    input); a probe that held the last module's output would keep the step's largest tensor alive through the
    whole backward (on a language model, +8% peak memory)."""
    import weakref

    seen: dict[str, bool] = {}

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(8, 16)
            self.head = nn.Linear(16, 4)
            self.logits: weakref.ref[torch.Tensor] | None = None

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            hidden = torch.tanh(self.body(x))
            if hidden.requires_grad:
                # Runs when the backward reaches the hidden layer: the head's output should be gone by then.
                hidden.register_hook(lambda g: seen.__setitem__("logits alive", self.logits() is not None))
            logits = self.head(hidden)
            self.logits = weakref.ref(logits)
            return logits

    model = Net()
    gradcheck_cli.analyze(model, (torch.randn(32, 8), torch.randint(0, 4, (32,))), loss_fn="cross-entropy", steps=2)
    assert seen == {"logits alive": False}
