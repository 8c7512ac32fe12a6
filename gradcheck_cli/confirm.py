"""Confirm: targeted replays that settle what the records alone cannot, each one forward and backward on the
first measured batch, run only when the records call for it, the model restored afterwards.

- open_gates: layers whose every gradient is exactly 0. Either something kills their signal for good (dead
  ReLUs, a detach), or a zero-initialised layer after them multiplies it by 0 by design (torchvision's ViT
  head, timm's MLP-Mixer head, zero_init_residual's last BatchNorm gamma, LoRA's B = 0, ReZero, Fixup): such a
  gate gets a gradient itself, moves on the first update and opens the path. Setting the zero tensors to small
  random values tells the two apart exactly.
- find_bypass: whether the backpropagated signal has a path around the layers of the chain (residual or dense
  connections). Zeroing one layer's weights in the middle of the chain stops every gradient before it in a
  plain chain; in a residual net the skip path carries it on. Plain chains are subject to the depth limit of
  mean-field theory (Schoenholz et al. 2017), residual ones are not (their gradients grow polynomially with
  depth: Yang & Schoenholz 2017; De & Smith 2020).

Every decision is taken from numbers that are the same on every process under torchrun (the records, and
squared norms combined across ranks), so all ranks replay alike.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Collection, Sequence

import torch

from gradcheck_cli.diagnose.common import all_zero, got_no_gradient
from gradcheck_cli.distributed import Combiner, local
from gradcheck_cli.functional import MatmulWatch, watched
from gradcheck_cli.layers import LayerSpec, is_matrix
from gradcheck_cli.loops import GateWatch
from gradcheck_cli.passes import Passes, Setup, clear_grads
from gradcheck_cli.report import Layer, ParameterRecord
from gradcheck_cli.restore import Restorer

# The size of an opened gate: small enough to leave the network's function as it was, far above float32's
# smallest normal (1e-38), so that a gradient through it cannot underflow to exactly 0.
OPEN_GATE_STD = 1e-3


def open_gates(
    setup: Setup, layers: Sequence[Layer], parameters: Sequence[ParameterRecord], combiner: Combiner
) -> tuple[set[str], list[str]]:
    """(layers whose zero gradient a zero-initialised gate explains, the gates' layer names). A layer whose
    matrices get exactly 0 while its bias learns is silent too: its input is zero where the loss reads it (a
    one-block DeiT's query projection reads the class token, zero-initialised, which a gate before it holds).

    Gates behind gates: a zero-initialised matrix that gets no gradient only because an outer gate holds it (a
    global-context block's zero last projection inside a residual branch whose last BatchNorm scale starts at 0)
    gets one once the outer gate is opened, and is opened in turn, up to NESTED_GATES levels."""
    zero = [p for p in parameters if p.requires_grad and p.weight_norm == 0 and not p.name.endswith("bias")]
    gates = [p.name for p in zero if p.grad_norm]
    if not gates:
        return set(), []
    silent = [layer.name for layer in layers if layer.trainable_params and all_zero(layer)]
    by_name = {p.name: p for p in parameters}
    matrices = {
        layer.name
        for layer in layers
        if not all_zero(layer) and (mine := _matrices(layer, by_name)) and all(all_zero(p) for p in mine)
    }
    if not (silent or matrices):
        return set(), []
    named = dict(setup.model.named_parameters())
    owner = {p.name: p.layers[0] for p in zero if p.layers}
    opened: set[str] = set()
    for _ in range(NESTED_GATES):
        opened = _replay(
            setup,
            combiner,
            [*silent, *sorted(matrices)],
            perturb=_opening([named[name] for name in gates]),
            matrices_only=matrices,
        )
        woken = [p.name for p in zero if p.name not in gates and owner.get(p.name) in opened]
        if not woken:
            break
        gates += woken
    owners = sorted({layer.name for layer in layers for name in gates if name in layer.parameters})
    return opened, owners


# Levels of gates behind gates that open_gates opens in turn (one replay each): a residual branch's zero scale
# holding a zero-initialised projection inside it is two.
NESTED_GATES = 3


# Where the chain is cut, as fractions of its length: a residual net's stage transitions (a strided block
# without a skip) are single paths, so one cut can land on one; three are unlikely to all do.
CUTS = (0.5, 0.25, 0.75)


def find_bypass(setup: Setup, chain: Sequence[Layer], combiner: Combiner) -> bool | None:
    """Whether gradients still reach the layers before a cut (a layer's weights set to 0) at one of CUTS;
    None when no layer of the chain has a feature-mixing weight to cut."""
    ordered = [layer for layer in chain if layer.forward_index is not None]
    specs = {spec.name: spec for spec in setup.layers}
    cuttable = [
        index
        for index, layer in enumerate(ordered)
        if index and layer.name in specs and any(is_matrix(p) and p.requires_grad for _, p in specs[layer.name].params)
    ]
    if not cuttable:
        return None
    tried: set[int] = set()
    for fraction in CUTS:
        index = min(cuttable, key=lambda i: abs(i - fraction * len(ordered)))
        if index in tried:
            continue
        tried.add(index)
        weights = [p for _, p in specs[ordered[index].name].params if is_matrix(p) and p.requires_grad]
        before = [layer.name for layer in ordered[:index]]
        if _replay(setup, combiner, before, perturb=_zeroing(weights)):
            return True
    return False


def _opening(tensors: Sequence[torch.Tensor]) -> Callable[[], object]:
    return lambda: [tensor.normal_(0.0, OPEN_GATE_STD) for tensor in tensors]


def _zeroing(tensors: Sequence[torch.Tensor]) -> Callable[[], object]:
    return lambda: [tensor.zero_() for tensor in tensors]


def _matrices(layer: Layer, by_name: dict[str, ParameterRecord]) -> list[ParameterRecord]:
    """A layer's trainable matrices (those on its first owner: a tied tensor is judged there)."""
    return [
        p
        for name in layer.parameters
        if (p := by_name.get(name)) is not None and p.requires_grad and p.layers[0] == layer.name and is_matrix(p.shape)
    ]


def _replay(
    setup: Setup,
    combiner: Combiner,
    watched: list[str],
    perturb: Callable[[], object],
    matrices_only: Collection[str] = (),
) -> set[str]:
    """Change some parameters (perturb), run one forward and backward, and return the watched layers that got
    a nonzero gradient (in their matrices, for those in `matrices_only`). Parameters, buffers, .grad and modes
    are restored afterwards."""
    specs = {spec.name: spec for spec in setup.layers}
    passes = Passes(setup.runner, setup.loss, setup.device, setup.amp_dtype)
    model = setup.model
    with Restorer(model, save_parameters=True):
        with torch.no_grad():
            perturb()
        clear_grads(model)
        passes.forward_backward(setup.batches[0].to(setup.device))
        squares = torch.stack(
            [
                sum(
                    (
                        local(p.grad).float().square().sum()
                        for _, p in specs[name].params
                        if p.grad is not None and (name not in matrices_only or is_matrix(p))
                    ),
                    torch.zeros((), device=setup.device),
                )
                for name in watched
            ]
        )
        combiner.grads(squares)
        got = squares.tolist()
        clear_grads(model)
    return {name for name, value in zip(watched, got, strict=True) if value > 0}


def side_outputs(setup: Setup, layers: Sequence[Layer]) -> set[str]:
    """Layers that got no gradient in any step only because they feed outputs of the model that the loss does
    not read (GoogLeNet's and Inception's auxiliary classifiers in training mode): one forward of the first
    batch, and a backward from those other outputs alone. What the loss did not read was not measured; it is
    not a bug of the model."""
    from gradcheck_cli.batch import tensors_in
    from gradcheck_cli.passes import forward
    from gradcheck_cli.resolve.losses import model_output_loss, prediction

    silent = [layer.name for layer in layers if got_no_gradient(layer)]
    if not silent:
        return set()
    specs = {spec.name: spec for spec in setup.layers}
    passes = Passes(setup.runner, setup.loss, setup.device, setup.amp_dtype)
    with Restorer(setup.model):
        clear_grads(setup.model)
        with passes.autocast():
            output = forward(setup.runner, setup.batches[0].to(setup.device))
            read = {id(prediction(output)), id(model_output_loss(output))}
            others = [
                t
                for t in tensors_in(output)
                if id(t) not in read and t.requires_grad and (t.dtype.is_floating_point or t.dtype.is_complex)
            ]
        if others:
            torch.autograd.backward([t.float().sum().real for t in others])
        reached = {name for name in silent if any(p.grad is not None for _, p in specs[name].params if p.requires_grad)}
        clear_grads(setup.model)
    return reached


# Fewest time steps for a through-time fit: the same least number of points as a signal-view chain.
MIN_TIME_STEPS = 5


def through_time(
    setup: Setup, layers: Sequence[Layer], combiner: Combiner
) -> tuple[dict[str, tuple[float, ...]], set[str], set[str]]:
    """||dL/dx_t|| per time step for every recurrent layer, input end first, under the model's own loss (one
    replay of the first batch).

    Fused nn.RNN/LSTM/GRU: the gradient reaching each step of the module's input (a zero tensor added to the
    input, whose gradient is exactly dL/dx_t, without changing the forward) from its last output step only
    (_last_step_only: the gradient of its other output steps is held back in this replay). Cells looped in Python
    (nn.RNNCell..., or any layer called at least MIN_TIME_STEPS times in one forward, such as a hand-written
    W_hh): ||dL/dh|| at each call's output. When the loss is taken at the last step (a model that reads the
    whole sequence), this is the textbook view of Bengio et al. 1994 and Pascanu et al. 2013: how the gradient
    decays or grows with its distance from the loss. Also returns the looped layers that form a gated
    recurrence (a hand-written LSTM or GRU cell: loops.GateWatch), and those whose calls are depth, not time: a
    block applied again to its own result, reading no new part of the batch per call (loops.py)."""
    from torch import nn

    from gradcheck_cli.batch import tensors_in

    calls = {layer.name: layer.calls for layer in layers}
    fused = [spec for spec in setup.layers if isinstance(spec.module, nn.RNNBase)]
    looped = [
        spec
        for spec in setup.layers
        if not isinstance(spec.module, nn.RNNBase)
        and (isinstance(spec.module, nn.RNNCellBase) or calls.get(spec.name, 0) >= MIN_TIME_STEPS)
        and (spec.functional or spec.module is not setup.model)
    ]
    if not fused and not looped:
        return {}, set(), set()
    probes: dict[str, tuple[torch.Tensor, int]] = {}
    steps: dict[str, list[torch.Tensor]] = {spec.name: [] for spec in looped}
    watch = GateWatch()
    modules = [spec for spec in looped if not spec.functional]
    handles = [spec.module.register_forward_pre_hook(_probe_input(spec.name, spec.module, probes)) for spec in fused]
    handles += [spec.module.register_forward_hook(_last_step_only(spec.name, probes)) for spec in fused]
    for spec in modules:
        watch.owns(spec.name, (param for _, param in spec.params))
    handles += [spec.module.register_forward_pre_hook(_watch_input(watch, spec.name)) for spec in modules]
    handles += [
        spec.module.register_forward_hook(_record_calls(spec.name, steps[spec.name], watch)) for spec in modules
    ]
    order: list[str] = []  # every module layer's calls, in the order they end
    handles += [
        spec.module.register_forward_hook(_log_call(spec.name, order))
        for spec in setup.layers
        if not spec.functional and spec.module is not setup.model
    ]
    matrices = _functional_calls([spec for spec in looped if spec.functional], steps, watch)
    passes = Passes(setup.runner, setup.loss, setup.device, setup.amp_dtype)
    batch = setup.batches[0].to(setup.device)
    watch.batch(tensors_in((batch.args, batch.kwargs)))
    try:
        with Restorer(setup.model):
            clear_grads(setup.model)
            with watch if looped else contextlib.nullcontext(), matrices or contextlib.nullcontext():
                passes.forward_backward(batch)
            clear_grads(setup.model)
    finally:
        for handle in handles:
            handle.remove()
    squares: dict[str, torch.Tensor] = {}
    for name, (probe, time_dim) in probes.items():
        if probe.grad is not None and probe.dim() > time_dim:
            others = [d for d in range(probe.dim()) if d != time_dim]
            squares[name] = probe.grad.float().square().sum(dim=others)
    for name, recorded in steps.items():
        if len(recorded) >= MIN_TIME_STEPS:
            squares[name] = torch.stack(recorded)
    cells = {spec.name for spec in looped if isinstance(spec.module, nn.RNNCellBase)}
    in_time = _time_loops({name: len(recorded) for name, recorded in steps.items()}, watch, cells)
    weights = {spec.name for spec in setup.layers if any(is_matrix(p) for _, p in spec.params)}
    interleaved = _interleaved(order, set(steps) - in_time, weights)
    for name in interleaved:
        squares.pop(name, None)
    return (
        _per_step_norms(squares, combiner, setup.device),
        watch.gated & in_time,
        set(steps) - in_time - interleaved,
    )


def _interleaved(order: Sequence[str], looped: set[str], weights: set[str]) -> set[str]:
    """The looped layers whose calls are not a loop over depth: between two of them a weight layer of its own
    runs (one called fewer times than the looped layer, so not part of a loop body). A block applied again to
    its own result (ALBERT's shared layer) passes the stream from one call to the next through itself alone, so
    the change of its gradient from call to call is its own Jacobian compounding; a layer shared by distinct
    blocks (timm's CoaT applies one convolutional position encoder per stage in each of that stage's blocks)
    passes it through those blocks' weights, so that change is the stream's, which the signal view judges with
    those blocks in its chain. Such a layer is judged as any other, not through its calls."""
    counts = Counter(order)
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    for index, name in enumerate(order):
        first.setdefault(name, index)
        last[name] = index
    return {
        name
        for name in looped
        if counts[name] >= 2
        and any(other in weights and counts[other] < counts[name] for other in set(order[first[name] + 1 : last[name]]))
    }


def _log_call(name: str, order: list[str]) -> Callable[..., None]:
    def hook(module: torch.nn.Module, args: object, output: object) -> None:
        order.append(name)

    return hook


def _time_loops(calls: dict[str, int], watch: GateWatch, cells: set[str]) -> set[str]:
    """The looped layers that run through time (loops.py): nn.RNNCell/LSTMCell/GRUCell modules, and layers
    called as often as some layer whose calls read a new part of the batch at (nearly) every call, x[:, t];
    the others are one block applied again to its own result (ALBERT, shared position encoders)."""
    stepping = {count for name, count in calls.items() if watch.steps_read(name) >= count - 1}
    return cells | {name for name, count in calls.items() if count in stepping}


def gated_cells(setup: Setup) -> dict[str, float]:
    """Layers whose recurrence is gated, nn.LSTM and nn.GRU, fused or as cells, and the factor by which their
    gates at the neutral point sigmoid(0) = 1/2 scale the gradient reaching their input: dh/dx runs through the
    input and output gates of an LSTM (1/4) and through 1 - z of a GRU (1/2). Their gain per time step is the
    forget (update) gate's value, which learns; a plain RNN's is fixed by W_hh and the nonlinearity."""
    from torch import nn

    gains = {nn.LSTM: 0.25, nn.LSTMCell: 0.25, nn.GRU: 0.5, nn.GRUCell: 0.5}
    return {spec.name: gain for spec in setup.layers for cell, gain in gains.items() if isinstance(spec.module, cell)}


def _probe_input(
    name: str, module: torch.nn.Module, probes: dict[str, tuple[torch.Tensor, int]]
) -> Callable[..., object]:
    def hook(mod: torch.nn.Module, args: tuple[object, ...]) -> object:
        x = args[0] if args else None
        if name in probes or not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
            return None
        probe = torch.zeros_like(x, requires_grad=True)
        probes[name] = (probe, 1 if getattr(module, "batch_first", False) and x.dim() == 3 else 0)
        return (x + probe, *args[1:])

    return hook


def _last_step_only(name: str, probes: dict[str, tuple[torch.Tensor, int]]) -> Callable[..., None]:
    """Let only the gradient of the module's last output step into it: what reaches each input step is then
    dL/dy_T carried back through the recurrence, the textbook view, whatever the loss reads. A language model's
    loss at every step would otherwise add T - t terms at step t, and a recurrence that remembers well (a GRU
    whose update gate holds its state, a trained LSTM's open forget gate) would read as exploding through time
    when it only accumulates. Bidirectional modules are measured as the loss has it: their two directions end at
    opposite steps."""

    def hook(module: torch.nn.Module, args: object, output: object) -> None:
        y = output[0] if isinstance(output, tuple) else output
        if name not in probes or getattr(module, "bidirectional", False) or not isinstance(y, torch.Tensor):
            return
        if not y.requires_grad or y.dim() < 2:
            return
        time_dim = probes[name][1]
        mask = torch.zeros(y.shape[time_dim], dtype=y.dtype, device=y.device)
        mask[-1] = 1.0
        shape = [1] * y.dim()
        shape[time_dim] = -1
        y.register_hook(lambda grad: grad * mask.view(shape))

    return hook


def _functional_calls(
    specs: Sequence[LayerSpec], steps: dict[str, list[torch.Tensor]], watch: GateWatch
) -> MatmulWatch | None:
    """A looped matrix that no module applies (`h @ self.W_hh` in a loop): its calls, seen through the functions
    it is passed to (functional.py), recorded as a looped module's are."""
    if not specs:
        return None
    hooks = {
        spec.index: (_watch_input(watch, spec.name), _record_calls(spec.name, steps[spec.name], watch))
        for spec in specs
    }

    def on_call(index: int, kind: str, inputs: torch.Tensor | None, output: torch.Tensor) -> None:
        before, after = hooks[index]
        if inputs is not None:
            before(None, (inputs,))
        after(None, (), output)

    return MatmulWatch(watched(specs), on_call)


def _watch_input(watch: GateWatch, name: str) -> Callable[..., None]:
    from gradcheck_cli.batch import tensors_in

    def hook(module: torch.nn.Module, args: object) -> None:
        for x in tensors_in(args):  # a cell's input and the state it carries: cell(x_t, (h, c))
            watch.input(x, name)

    return hook


def _record_calls(name: str, recorded: list[torch.Tensor], watch: GateWatch) -> Callable[..., None]:
    from gradcheck_cli.batch import first_tensor

    def hook(module: torch.nn.Module, args: object, output: object) -> None:
        out = first_tensor(output)
        if out is None or not out.requires_grad:
            return
        watch.output(name, out)
        slot = len(recorded)
        recorded.append(torch.zeros((), device=out.device))

        def grad_hook(grad: torch.Tensor) -> None:
            recorded[slot] = recorded[slot] + grad.detach().float().square().sum()

        out.register_hook(grad_hook)

    return hook


def _per_step_norms(
    squares: dict[str, torch.Tensor], combiner: Combiner, device: torch.device
) -> dict[str, tuple[float, ...]]:
    """Squared norms per step summed across processes (each holds a slice of the batch), as norms."""
    if not squares:
        return {}
    names = list(squares)
    flat = torch.cat([squares[name].reshape(-1).to(device) for name in names])
    combiner.locals(flat)
    values = flat.sqrt().tolist()
    result, start = {}, 0
    for name in names:
        count = squares[name].numel()
        result[name] = tuple(values[start : start + count])
        start += count
    return result
