"""PyTorch state dicts (torchvision's and timm's key names) to jaxcnn variables.

    variables = convert_state_dict(state_dict, "resnet50")    # {'params': ..., 'batch_stats': ...}, numpy
    model = create_model("resnet50", num_classes=num_classes(state_dict, "resnet50"))
    logits = model.apply(variables, x)                         # the PyTorch model's logits, x: [N, H, W, 3]

**Names.** `name_map(arch)` lists every key of the PyTorch model's state dict with the jaxcnn variable it fills,
built from the registered model's stage sizes (`jaxcnn.models.model_defaults`): torchvision's ``conv1``, ``bn1``,
``layerI.J.convK``, ``layerI.J.downsample.{0,1}`` and ``fc`` (timm names its ResNets' layers the same way) become
``stem``, ``stageI_block{J+1}/convK``, ``.../shortcut`` and ``head/logits``; VGG's and AlexNet's numbered
``features.N`` / ``classifier.N`` become their jaxcnn stage and head layers. BatchNorm's ``num_batches_tracked``
is dropped.

**Layouts.** Convolution weights go from PyTorch's ``[out, in / groups, kh, kw]`` to ``[kh, kw, in / groups, out]``,
linear weights from ``[out, in]`` to ``[in, out]``; BatchNorm's weight, bias, running mean and running variance
become scale, bias (``params``) and mean, var (``batch_stats``). PyTorch flattens VGG's and AlexNet's pooled
``[C, 7, 7]`` (``[C, 6, 6]``) maps channel-first, jaxcnn's NHWC maps flatten channel-last: the rows of the first
hidden layer's kernel are permuted to match, so the same function comes out without changing the model.

The jaxcnn models follow torchvision's arithmetic where it matters in evaluation: convolutions and the stem's
3x3 stride-2 max pool pad the same number of cells on each side (``k // 2``, as PyTorch does; XLA's ``'SAME'``
would pad 0 before and 1 after an even-sized input), BatchNorm's epsilon is PyTorch's 1e-5, the stride of a
bottleneck sits on its 3x3 conv ("ResNet v1.5", as in torchvision and timm), and VGG and AlexNet pool adaptively
to 7x7 and 6x6 before the classifier.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

Layout = Literal["conv", "linear", "flat_linear", "vector"]

# Architectures by the key names their state dicts use. torchvision's and timm's ResNets share their names.
TORCHVISION_ARCHS: tuple[str, ...] = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "wide_resnet50_2",
    "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn", "alexnet",
)
TIMM_ARCHS: tuple[str, ...] = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "wide_resnet50_2",
)


class WeightsMismatchError(ValueError):
    """A state dict does not fit the model: keys without a place, places without a key, shapes that differ."""


class MissingPackageError(ImportError):
    """An optional package (safetensors, torch, huggingface_hub) is needed; the message says which extra installs it."""

    jaxcnn_user_error = True  # the CLI prints the message alone (jaxcnn.errors.is_user_error)


@dataclass(frozen=True)
class Target:
    """Where one PyTorch tensor goes: ``collection`` ('params' / 'batch_stats'), the jaxcnn path, the layout rule.

    ``flat_chw``: for 'flat_linear', the ``(channels, height, width)`` of the map PyTorch flattened.
    """

    collection: str
    path: tuple[str, ...]
    layout: Layout
    flat_chw: tuple[int, int, int] | None = None

    @property
    def name(self) -> str:
        return "/".join((self.collection, *self.path))


# ---------------------------------------------------------------------------------------------------------
# Name maps
# ---------------------------------------------------------------------------------------------------------


def _conv(out: dict[str, Target], torch_name: str, path: tuple[str, ...], bias: bool = False) -> None:
    out[f"{torch_name}.weight"] = Target("params", (*path, "kernel"), "conv")
    if bias:
        out[f"{torch_name}.bias"] = Target("params", (*path, "bias"), "vector")


def _batch_norm(out: dict[str, Target], torch_name: str, path: tuple[str, ...]) -> None:
    out[f"{torch_name}.weight"] = Target("params", (*path, "scale"), "vector")
    out[f"{torch_name}.bias"] = Target("params", (*path, "bias"), "vector")
    out[f"{torch_name}.running_mean"] = Target("batch_stats", (*path, "mean"), "vector")
    out[f"{torch_name}.running_var"] = Target("batch_stats", (*path, "var"), "vector")


def _linear(out: dict[str, Target], torch_name: str, path: tuple[str, ...],
            flat_chw: tuple[int, int, int] | None = None) -> None:
    layout: Layout = "linear" if flat_chw is None else "flat_linear"
    out[f"{torch_name}.weight"] = Target("params", (*path, "kernel"), layout, flat_chw)
    out[f"{torch_name}.bias"] = Target("params", (*path, "bias"), "vector")


def _resnet_map(knobs: Mapping[str, Any]) -> dict[str, Target]:
    out: dict[str, Target] = {}
    _conv(out, "conv1", ("stem", "conv"))
    _batch_norm(out, "bn1", ("stem", "norm"))
    convs = 3 if knobs["block"] == "bottleneck" else 2
    for i, size in enumerate(knobs["stage_sizes"]):
        for j in range(size):
            torch_block, block = f"layer{i + 1}.{j}", f"stage{i + 1}_block{j + 1}"
            for k in range(1, convs + 1):
                _conv(out, f"{torch_block}.conv{k}", (block, f"conv{k}"))
                _batch_norm(out, f"{torch_block}.bn{k}", (block, f"norm{k}"))
            if j == 0 and (i > 0 or convs == 3):  # the first block of a stage that changes the shape
                _conv(out, f"{torch_block}.downsample.0", (block, "shortcut", "conv"))
                _batch_norm(out, f"{torch_block}.downsample.1", (block, "shortcut", "norm"))
    _linear(out, "fc", ("head", "logits"))
    return out


def _classifier_map(out: dict[str, Target], first: int, step: int, flat_chw: tuple[int, int, int]) -> None:
    """torchvision's 3-layer classifier: Linear layers at classifier.{first, first + step, 6}."""
    _linear(out, f"classifier.{first}", ("head", "fc1"), flat_chw)
    _linear(out, f"classifier.{first + step}", ("head", "fc2"))
    _linear(out, "classifier.6", ("head", "logits"))


def _vgg_map(knobs: Mapping[str, Any]) -> dict[str, Target]:
    out: dict[str, Target] = {}
    batch_norm = knobs["norm"] == "batch"
    index = 0  # torchvision's features: conv, [bn], relu per conv; a max pool after each stage
    for i, size in enumerate(knobs["stage_sizes"]):
        for j in range(size):
            layer = f"stage{i + 1}_conv{j + 1}"
            _conv(out, f"features.{index}", (layer, "conv"), bias=True)
            if batch_norm:
                _batch_norm(out, f"features.{index + 1}", (layer, "norm"))
            index += 3 if batch_norm else 2
        index += 1
    pool = knobs["head_pool_size"]
    _classifier_map(out, 0, 3, (knobs["stage_widths"][-1], pool, pool))
    return out


def _alexnet_map(knobs: Mapping[str, Any]) -> dict[str, Target]:
    out: dict[str, Target] = {}
    index = 0  # torchvision's features: conv, relu, [max pool]
    for i in range(len(knobs["conv_channels"])):
        _conv(out, f"features.{index}", (f"block{i + 1}_conv", "conv"), bias=True)
        index += 3 if i + 1 in knobs["pool_after"] else 2
    pool = knobs["head_pool_size"]
    _classifier_map(out, 1, 3, (knobs["conv_channels"][-1], pool, pool))
    return out


_FAMILIES: dict[str, Callable[[Mapping[str, Any]], dict[str, Target]]] = {
    "resnet": _resnet_map, "resnext": _resnet_map, "wide_resnet": _resnet_map, "vgg": _vgg_map, "alexnet": _alexnet_map,
}


def check_arch(arch: str, source: str = "torchvision") -> None:
    """Raises ValueError unless `arch` is a name whose `source` ('torchvision' or 'timm') key names are mapped."""
    names = TIMM_ARCHS if source == "timm" else TORCHVISION_ARCHS
    if arch not in names:
        raise ValueError(
            f"{source}:{arch}: no name map for this architecture; {source} weights load for {', '.join(names)}"
        )


def name_map(arch: str, source: str = "torchvision") -> dict[str, Target]:
    """{PyTorch state-dict key: Target} for every key of the `arch` model (without ``num_batches_tracked``)."""
    from jaxcnn.models import model_defaults

    check_arch(arch, source)
    family = next(f for f in sorted(_FAMILIES, key=len, reverse=True) if arch.startswith(f))
    return _FAMILIES[family](model_defaults(arch))


# ---------------------------------------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------------------------------------


def _converted_shape(target: Target, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The jaxcnn shape of a PyTorch tensor of `shape`, or None when its rank does not fit the layout."""
    if target.layout == "conv":
        return (shape[2], shape[3], shape[1], shape[0]) if len(shape) == 4 else None
    if target.layout in ("linear", "flat_linear"):
        return (shape[1], shape[0]) if len(shape) == 2 else None
    return tuple(shape) if len(shape) == 1 else None


def _linear_kernel(weight: np.ndarray, flat_chw: tuple[int, int, int] | None, block: int = 256) -> np.ndarray:
    """``[out, in]`` -> ``[in, out]``, with the inputs reordered from PyTorch's ``[C, H, W]`` flatten to ``[H, W, C]``
    when `flat_chw` is given. Copied `block` output units at a time: 4x faster than one strided copy for VGG's
    25088 x 4096 layer, whose transposed rows do not fit the caches."""
    units, fan_in = weight.shape
    c, h, w = flat_chw or (fan_in, 1, 1)
    out = np.empty((fan_in, units), np.float32)
    view = out.reshape(h, w, c, units)
    for start in range(0, units, block):
        view[..., start:start + block] = weight[start:start + block].reshape(-1, c, h, w).transpose(2, 3, 1, 0)
    return out


def _convert(target: Target, value: np.ndarray) -> np.ndarray:
    value = np.asarray(value, np.float32)
    if target.layout == "conv":
        return np.ascontiguousarray(value.transpose(2, 3, 1, 0))
    if target.layout in ("linear", "flat_linear"):  # flat_linear: inputs flattened [C, H, W] in PyTorch, [H, W, C] here
        return _linear_kernel(value, target.flat_chw)
    return value


# ---------------------------------------------------------------------------------------------------------
# Checking and converting
# ---------------------------------------------------------------------------------------------------------


def _drop_counters(keys: Any) -> list[str]:
    return [k for k in keys if not k.endswith("num_batches_tracked")]


def num_classes(shapes: Mapping[str, Any], arch: str, source: str = "torchvision") -> int:
    """The number of classes of a state dict (its logits layer's rows); 1000 when that key is absent."""
    logits = next(k for k, t in name_map(arch, source).items() if t.path == ("head", "logits", "bias"))
    value = shapes.get(logits)
    if value is None:
        return 1000
    shape = value if isinstance(value, tuple) else tuple(np.shape(value))
    return int(shape[0]) if shape else 1000


def model_shapes(arch: str, classes: int) -> dict[str, tuple[int, ...]]:
    """{'params/stem/conv/kernel': shape, ...} of the registered jaxcnn model `arch` (shapes only, nothing computed)."""
    import jax
    import jax.numpy as jnp
    from flax.traverse_util import flatten_dict

    from jaxcnn.models import create_model

    model = create_model(arch, num_classes=classes)
    # 64x64 reaches every supported model's head (VGG and AlexNet pool adaptively): the same shapes as 224x224
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3), jnp.float32)))
    return {name: tuple(leaf.shape) for name, leaf in flatten_dict(dict(variables), sep="/").items()}


def check_state_dict(shapes: Mapping[str, Any], arch: str, source: str = "torchvision", *, where: str = "") -> None:
    """Raises WeightsMismatchError listing every key without a place in the jaxcnn model `arch`, every model variable
    no key fills, and every shape that differs. `shapes`: {key: shape tuple or array} (``num_batches_tracked``
    ignored)."""
    mapping = name_map(arch, source)
    given = {k: (v if isinstance(v, tuple) else tuple(np.shape(v))) for k, v in shapes.items()}
    keys = _drop_counters(given)
    unexpected = [k for k in keys if k not in mapping]
    missing = [k for k in mapping if k not in given]
    expected = model_shapes(arch, num_classes(given, arch, source))
    mismatched, filled = [], set()
    for key in keys:
        if key not in mapping:
            continue
        target = mapping[key]
        filled.add(target.name)
        got = _converted_shape(target, given[key])
        want = expected.get(target.name)
        if want is None:
            unexpected.append(f"{key} (maps to {target.name}, which the model does not have)")
        elif got != want:
            mismatched.append(f"{key}: shape {given[key]} ({target.layout} layout -> {got}), the model's "
                              f"{target.name} is {want}")
    unfilled = [name for name in expected if name not in filled and name not in {mapping[k].name for k in missing}]
    problems = []
    for title, items in (("keys with no place in the model", unexpected), ("keys the model needs, missing", missing),
                         ("shape mismatches", mismatched), ("model variables no key fills", unfilled)):
        if items:
            shown = items if len(items) <= 20 else [*items[:20], f"... and {len(items) - 20} more"]
            problems.append(f"  {title} ({len(items)}):\n" + "\n".join(f"    {s}" for s in shown))
    if problems:
        raise WeightsMismatchError(
            f"{where or 'state dict'} does not fit jaxcnn's {arch} ({source} key names):\n" + "\n".join(problems)
            + f"\nIs it a {arch} state dict? Give the architecture it was saved from (e.g. {source}:NAME=PATH)."
        )


def convert_state_dict(state_dict: Mapping[str, Any], arch: str, source: str = "torchvision", *,
                       where: str = "") -> dict[str, Any]:
    """{'params': ..., 'batch_stats': ...} nested dicts of float32 numpy arrays for the jaxcnn model `arch`, from a
    PyTorch state dict {key: numpy array} with torchvision's (``source='torchvision'``) or timm's key names.

    Raises WeightsMismatchError (one message listing every problem) unless every key maps and every shape fits.
    The model to apply them to: ``create_model(arch, num_classes=num_classes(state_dict, arch))``.
    """
    check_state_dict(state_dict, arch, source, where=where)
    mapping = name_map(arch, source)
    variables: dict[str, Any] = {}
    for key in _drop_counters(state_dict):
        target = mapping[key]
        node = variables.setdefault(target.collection, {})
        for part in target.path[:-1]:
            node = node.setdefault(part, {})
        node[target.path[-1]] = _convert(target, state_dict[key])
    return variables


__all__ = [
    "TIMM_ARCHS",
    "TORCHVISION_ARCHS",
    "MissingPackageError",
    "Target",
    "WeightsMismatchError",
    "check_arch",
    "check_state_dict",
    "convert_state_dict",
    "model_shapes",
    "name_map",
    "num_classes",
]
