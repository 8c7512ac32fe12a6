"""Which modules are layers: every module that directly owns parameters, what kind of layer it is, and the
activation modules whose inputs tell dead and saturated units."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)
CONV_TYPES: tuple[type[nn.Module], ...] = (nn.modules.conv._ConvNd,)
RECURRENT_TYPES: tuple[type[nn.Module], ...] = (nn.RNNBase, nn.RNNCellBase)
EMBEDDING_TYPES: tuple[type[nn.Module], ...] = (nn.Embedding, nn.EmbeddingBag)
LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Bilinear)
ATTENTION_TYPES: tuple[type[nn.Module], ...] = (nn.MultiheadAttention,)

# ReLU-family: a unit whose input is never > 0 passes no gradient at all ("dead").
DEAD_TYPES: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6)
# Saturating activations and the |input| beyond which the derivative is under 5% of its peak:
# sigmoid'(x) < 0.05 * 0.25 for |x| > 4.34; tanh'(x) < 0.05 for |x| > 2.18; Hardtanh and Hardsigmoid have
# derivative exactly 0 beyond their corners.
SATURATION_LIMITS: dict[type[nn.Module], float] = {
    nn.Sigmoid: 4.34,
    nn.Tanh: 2.18,
    nn.Hardsigmoid: 3.0,
}
# The same limits seen from the activation's output, for activations that are not modules (probe: a weight
# layer's bounded input): tanh(2.18) = 0.975; sigmoid(4.34) = 0.987, sigmoid(-4.34) = 0.013.
TANH_SATURATED = 0.975
SIGMOID_SATURATED_LOW, SIGMOID_SATURATED_HIGH = 0.0129, 0.9871


def category_of(module: nn.Module) -> str:
    """What kind of layer a module is, for the rules that treat kinds differently.

    Models often define their own normalisation (nanoGPT's LayerNorm, Llama's RMSNorm): a module whose class
    name says Norm and whose own parameters are all 1-D (a scale, a shift) counts as one.
    """
    own = list(module.parameters(recurse=False))
    if "Norm" in type(module).__name__ and own and all(p.dim() == 1 for p in own):
        return "norm"
    named = dict(module.named_parameters(recurse=False))
    for category, types in (
        ("norm", NORM_TYPES),
        ("embedding", EMBEDDING_TYPES),
        ("recurrent", RECURRENT_TYPES),
        ("attention", ATTENTION_TYPES),
        ("conv", CONV_TYPES),
        ("linear", LINEAR_TYPES),
    ):
        if isinstance(module, types):
            return category
    # A module of another library that holds a 2-D weight (and a bias) applies it as a matmul: Hugging Face's
    # Conv1D (GPT-2's blocks: a Linear with its weight transposed), quantised and LoRA-wrapped linears.
    weight = named.get("weight")
    if weight is not None and weight.dim() == 2 and set(named) <= {"weight", "bias"}:
        return "linear"
    return "other"


@dataclass(frozen=True)
class LayerSpec:
    """A module that directly owns parameters."""

    index: int
    name: str
    module: nn.Module
    category: str
    # (qualified name as named_parameters() gives it, the tensor)
    params: tuple[tuple[str, nn.Parameter], ...]
    # one matrix that no module of its own applies (a parameter of the model itself, or of a ParameterList or
    # ParameterDict, used by the forward as x @ W, F.linear, F.conv2d): module hooks cannot see its calls, so
    # the probe watches the functions it is passed to (functional.MatmulWatch); `module` is its owner
    functional: bool = False


def type_name(module: nn.Module) -> str:
    """The class a user wrote, not an internal subclass: torch.nn.utils.parametrize swaps a module's class for
    a generated ParametrizedLinear, and torch's own modules use private subclasses (MultiheadAttention's
    out_proj is a NonDynamicallyQuantizableLinear): walk up to the first class torch.nn exports by name."""
    from torch.nn.utils import parametrize

    cls = type(module)
    if parametrize.is_parametrized(module) and cls.__bases__:
        cls = cls.__bases__[0]
    if cls.__module__.startswith("torch.") and getattr(nn, cls.__name__, None) is not cls:
        public = next((base for base in cls.__mro__ if getattr(nn, base.__name__, None) is base), None)
        if public is not None and public is not nn.Module:
            return str(public.__name__)
    return cls.__name__


def layout(module: nn.Module) -> str | None:
    """How a convolution mixes its input, where one class covers kinds of layer that differ by design: the
    kernel ("3x3"), and "depthwise" (one filter per channel) or "groups G". A depthwise-separable chain written as
    one Sequential (or Hugging Face's MobileNet-v1, layer.#.convolution for both halves) names its depthwise and
    pointwise convolutions alike, yet they see different signals: a depthwise 3x3 sums 9 inputs, a pointwise
    1x1 as many as there are channels. None for other modules."""
    if not isinstance(module, nn.modules.conv._ConvNd):
        return None
    kernel = "x".join(str(size) for size in module.kernel_size)
    if module.groups == 1:
        return kernel
    return f"{kernel} depthwise" if module.groups == module.in_channels else f"{kernel} groups {module.groups}"


def discover_layers(model: nn.Module) -> list[LayerSpec]:
    """Every module that directly owns parameters, in named_modules() order.

    A tensor shared by several modules (tied weights) is listed under each; its qualified name is the one
    named_parameters() reports (the first place it is registered). A parametrized module (weight_norm,
    spectral_norm, orthogonal: torch.nn.utils.parametrize) owns the tensors behind its parametrizations
    (`parametrizations.weight.original*`): it is one layer with its real weight, and the parametrizations are
    not layers of their own (what passes through them is dL/dW, not a signal).
    """
    from torch.nn.utils import parametrize

    canonical: dict[int, str] = {}
    for name, param in model.named_parameters():
        canonical.setdefault(id(param), name)
    layers: list[LayerSpec] = []
    for name, module in model.named_modules():
        if ".parametrizations." in f".{name}.":
            continue  # a parametrization (or its list) of the module above: part of that layer
        tensors = list(module.parameters(recurse=False))
        if parametrize.is_parametrized(module):
            tensors += list(module.parametrizations.parameters())
        own = [(canonical[id(p)], p) for p in tensors if id(p) in canonical]
        apart = _applied_by_others(module, module is model, own)
        for qualified, param in apart:
            layers.append(LayerSpec(len(layers), qualified, module, "other", ((qualified, param),), functional=True))
        own = [pair for pair in own if not any(pair[1] is param for _, param in apart)]
        if own:
            layers.append(LayerSpec(len(layers), name, module, category_of(module), tuple(own)))
    return layers


def _applied_by_others(
    module: nn.Module, root: bool, own: list[tuple[str, nn.Parameter]]
) -> list[tuple[str, nn.Parameter]]:
    """The matrices a module owns but does not apply itself, each a layer of its own: those of a container
    (ParameterList, ParameterDict: never called) and those of the model itself when it is not a layer type torch
    knows (a network written as `h @ self.W1`: the model's own forward hook sees only its input and output)."""
    if isinstance(module, nn.ParameterList | nn.ParameterDict) or (root and category_of(module) == "other"):
        return [(qualified, param) for qualified, param in own if param.dim() >= 2 and is_matrix(param)]
    return []


def has_units(spec: LayerSpec) -> bool:
    """Layers whose weight rows (dim 0) are output units: a zero-gradient row is a unit that cannot learn.
    Only torch's own classes are known to lay their weight out so (Conv1D's rows are its inputs)."""
    if spec.category == "conv":
        return not getattr(spec.module, "transposed", False)
    if spec.category == "linear":
        return isinstance(spec.module, LINEAR_TYPES)
    return spec.category == "recurrent"


def is_matrix(tensor: torch.Tensor | tuple[int, ...]) -> bool:
    """A weight (or a weight's shape) that mixes features: at least two dimensions longer than 1. A per-channel
    scale or shift (a norm's gamma, LayerScale's (C,), ConvNeXt's (C, 1, 1), ReZero's scalar) is not one."""
    shape = tensor.shape if isinstance(tensor, torch.Tensor) else tensor
    return sum(size > 1 for size in shape) >= 2
