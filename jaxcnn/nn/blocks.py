"""Building blocks of the model zoo: conv-norm-act, residual blocks, Inception and NiN blocks (the classifier head is
`jaxcnn.models.heads`).

Following Flax's examples, a block does not choose its convolution, normalisation or activation: they are
injected as ``conv`` (a `layers.Conv2d` partial with the dtypes set), ``norm`` (a `layers.make_norm` partial,
called as ``norm(name=..., zero_init=...)``) and ``act`` (an elementwise function). Swapping one of them is the
whole ablation. All blocks take and return NHWC arrays: ``x: [N, H, W, C]``.

Convolutions with an odd kernel ``k`` pad ``k // 2`` on every side, PyTorch's convention: the output has
``ceil(H / stride)`` rows like ``'same'``, with the windows centred the same way as torchvision's models.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxcnn.nn import functional as F
from jaxcnn.nn import layers

ModuleDef = Any
ShortcutKind = Literal["A", "B"]


def _no_norm(name: str | None = None, zero_init: bool = False) -> Callable[[jax.Array], jax.Array]:
    """The 'none' norm as a norm factory (the default of every block's ``norm``)."""
    return layers.make_norm("none", train=False, name=name, zero_init=zero_init)


_HOW_TO_CALL = {
    "norm": "a norm factory called as norm(name=..., zero_init=...), e.g. functools.partial(make_norm, 'batch', "
            "train=True)",
    "conv": "a convolution module called as conv(features, kernel_size=..., strides=..., padding=..., groups=..., "
            "use_bias=..., name=...), e.g. functools.partial(Conv2d, dtype=jnp.bfloat16)",
}


def _label(block: nn.Module | None) -> str:
    return "norm_act" if block is None else layers._layer_label(block)


def build(block: nn.Module | None, argument: str, factory: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``factory(*args, **kwargs)``, the block's `argument` (its ``conv`` or ``norm``); a factory that cannot be
    called that way raises a TypeError naming the block, the argument and what it must accept."""
    try:
        return factory(*args, **kwargs)
    except TypeError as error:
        raise TypeError(f"{_label(block)}: its {argument}={factory!r} cannot be called with "
                        f"{', '.join([*map(repr, args), *(f'{k}={v!r}' for k, v in kwargs.items())])} ({error}); "
                        f"pass {_HOW_TO_CALL[argument]}") from None


def norm_act(norm: ModuleDef, act: Callable[[jax.Array], jax.Array] | None, *, name: str, pool_follows: bool = False,
             block: nn.Module | None = None, **kwargs: Any) -> Callable[[jax.Array], jax.Array]:
    """``act(norm(name=name, **kwargs)(x))`` as one callable (``act=None``: the norm alone); `block` (the module
    that calls it) names the culprit in errors.

    A `layers.make_norm` factory (what the models pass) gets the activation itself, so that BatchNorm-then-ReLU
    runs as one fused kernel where there is one, and `pool_follows` (a pooling layer comes next, see
    `layers.make_norm`); any other norm factory is called and the activation applied after.
    """
    if act is not None and not callable(act):
        raise TypeError(f"{_label(block)}: act={act!r} is not a function; pass an elementwise function "
                        f"such as jax.nn.relu or jaxcnn.nn.activation({act!r})")
    takes_activation = norm is layers.make_norm or (isinstance(norm, functools.partial)
                                                    and norm.func is layers.make_norm)
    if takes_activation:
        return build(block, "norm", norm, name=name, activation=act, pool_follows=pool_follows, **kwargs)
    layer = build(block, "norm", norm, name=name, **kwargs)
    if act is None:
        return layer
    return lambda x: act(layer(x))


def is_no_norm(norm: ModuleDef) -> bool:
    """Whether the norm factory `norm` builds no normalisation (the blocks' default, or make_norm's 'none')."""
    if norm is _no_norm:
        return True
    if isinstance(norm, functools.partial) and norm.func is layers.make_norm:
        kind = norm.args[0] if norm.args else norm.keywords.get("kind")
        return kind == "none"
    return False


def conv_padding(kernel_size: int) -> int | str:
    """Padding of a conv with this kernel: ``k // 2`` per side for odd ``k`` (torchvision's), 'same' for even."""
    return kernel_size // 2 if kernel_size % 2 else "same"


def check_downsample(x: jax.Array, strides: int, where: str) -> None:
    """Raises ValueError when a stride-`strides` layer would shrink ``x: [N, H, W, C]`` below 1x1.

    A padded stride-2 layer maps 1x1 to 1x1 without complaint; a network that does so has run out of
    resolution, which is nearly always an input that is too small for the model.
    """
    h, w = x.shape[1:3]
    if strides > 1 and (h < strides or w < strides):
        raise ValueError(
            f"{where}: cannot downsample a {h}x{w} feature map (shape {tuple(x.shape)}) by {strides}: it would "
            "shrink below 1x1. The input is too small for this network's downsamplings; use a larger input "
            "(or fewer stages / downsamplings)"
        )


def adaptive_avg_pool(x: jax.Array, output_size: tuple[int, int]) -> jax.Array:
    """PyTorch's ``AdaptiveAvgPool2d``: ``x: [N, H, W, C] -> [N, oh, ow, C]``.

    Output cell ``i`` averages input rows ``floor(i H / oh) .. ceil((i + 1) H / oh) - 1`` (likewise for columns),
    so a smaller input is repeated (1x1 -> 7x7 copies the cell) and an input of the output size is unchanged.
    """
    h, w = x.shape[1:3]
    oh, ow = output_size
    if (h, w) == (oh, ow):
        return x

    def bins(n_in: int, n_out: int) -> np.ndarray:
        m = np.zeros((n_out, n_in), np.float32)
        for i in range(n_out):
            lo, hi = (i * n_in) // n_out, -(-((i + 1) * n_in) // n_out)
            m[i, lo:hi] = 1.0 / (hi - lo)
        return m

    x = jnp.einsum("oh,nhwc->nowc", jnp.asarray(bins(h, oh), x.dtype), x)
    return jnp.einsum("pw,nowc->nopc", jnp.asarray(bins(w, ow), x.dtype), x)


# ---------------------------------------------------------------------------------------------------------
# Conv - norm - activation
# ---------------------------------------------------------------------------------------------------------


class ConvNormAct(nn.Module):
    """``act(norm(conv(x)))``, or with ``preact=True`` ``conv(act(norm(x)))`` (He et al., 2016b).

    x: ``[N, H, W, Cin]`` -> ``[N, ceil(H / strides), ceil(W / strides), features]`` (with the default padding).
    Submodules: ``conv`` and ``norm``. ``act=None`` leaves the activation out; ``zero_init`` starts the norm's
    scale at 0. ``use_bias=None`` gives the conv a bias only where no norm follows it (a norm's shift makes it
    redundant), unless the ``conv`` factory sets ``use_bias`` itself. ``max_pool_window=k`` ends the block with a
    max pool over non-overlapping k x k windows (a VGG stage's last block); a BatchNorm then runs norm, ReLU and pool
    as one kernel on the CPU.
    """

    features: int
    kernel_size: int = 3
    strides: int = 1
    padding: Any = None  # None: conv_padding(kernel_size)
    groups: int = 1
    preact: bool = False
    zero_init: bool = False
    use_bias: bool | None = None
    conv: ModuleDef = layers.Conv2d
    norm: ModuleDef = _no_norm
    act: Callable[[jax.Array], jax.Array] | None = jax.nn.relu
    pool_follows: bool = False  # a pooling layer comes next (see layers.make_norm; changes no values)
    max_pool_window: int | None = None  # then a max pool over non-overlapping windows of this size

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        padding = conv_padding(self.kernel_size) if self.padding is None else self.padding
        bias = {}
        if self.use_bias is not None:
            bias["use_bias"] = self.use_bias
        elif not (isinstance(self.conv, functools.partial) and "use_bias" in self.conv.keywords):
            bias["use_bias"] = self.preact or is_no_norm(self.norm)
        conv = build(self, "conv", self.conv, self.features, kernel_size=self.kernel_size, strides=self.strides,
                     padding=padding, groups=self.groups, name="conv", **bias)
        window = self.max_pool_window

        def pooled(y: jax.Array) -> jax.Array:  # a Pool2d module, so that summaries list it
            return y if window is None else layers.Pool2d("max", window_shape=window, strides=window, name="pool")(y)

        if self.preact:
            return pooled(conv(norm_act(self.norm, self.act, block=self, name="norm")(x)))
        norm = norm_act(self.norm, self.act, block=self, name="norm", zero_init=self.zero_init,
                        pool_follows=self.pool_follows)
        if isinstance(norm, layers.BatchNorm):
            # The conv's bias goes into the BatchNorm, where it only moves the batch mean (functional.batch_norm):
            # the sum conv(x) + bias is never written out; the pool runs in the norm's kernel.
            y, bias = conv(x, split_bias=True) if isinstance(conv, layers.Conv2d) else (conv(x), None)
            return norm(y, x_bias=bias, max_pool_window=window)
        return pooled(norm(conv(x)))


# ---------------------------------------------------------------------------------------------------------
# Residual blocks
# ---------------------------------------------------------------------------------------------------------


class Shortcut(nn.Module):
    """The identity path of a residual block, when the block changes the shape.

    x: ``[N, H, W, Cin]`` -> ``[N, ceil(H / strides), ceil(W / strides), features]``; the identity when nothing
    changes. Option 'A' (He et al., 2015, CIFAR): take every `strides`-th cell and append zero channels (no
    parameters). Option 'B': a 1x1 projection conv with that stride, then ``norm`` (None: no norm, as in the
    pre-activation and wide ResNets).
    """

    features: int
    strides: int = 1
    kind: ShortcutKind = "B"
    conv: ModuleDef = layers.Conv2d
    norm: ModuleDef | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cin = x.shape[-1]
        if cin == self.features and self.strides == 1:
            return x
        if self.kind == "A":
            if self.features < cin:
                raise ValueError(
                    f"option-A shortcut at '{'/'.join(self.path)}' cannot reduce {cin} channels to "
                    f"{self.features}; use shortcut='B' (a projection)"
                )
            y = x[:, :: self.strides, :: self.strides, :]
            return jnp.pad(y, ((0, 0), (0, 0), (0, 0), (0, self.features - cin)))
        if self.kind != "B":
            raise ValueError(f"unknown shortcut {self.kind!r}; use 'A' (zero-pad) or 'B' (projection)")
        y = build(self, "conv", self.conv, self.features, kernel_size=1, strides=self.strides, padding=0,
                  name="conv")(x)
        return y if self.norm is None else build(self, "norm", self.norm, name="norm")(y)


class _ResidualBase(nn.Module):
    """Fields shared by the basic and bottleneck blocks."""

    features: int  # the block's width ("planes"); it outputs features * expansion channels
    strides: int = 1
    kernel_size: int = 3
    groups: int = 1
    shortcut: ShortcutKind = "B"
    residual: bool = True  # False: no shortcut at all (a plain network, for the degradation ablation)
    preact: bool = False
    zero_init_residual: bool = False  # start the last norm's scale at 0 (non-preact blocks)
    dropout: float = 0.0  # between the convolutions (wide ResNets)
    conv: ModuleDef = layers.Conv2d
    norm: ModuleDef = _no_norm
    act: Callable[[jax.Array], jax.Array] = jax.nn.relu

    expansion: ClassVar[int] = 1

    def _shortcut(self, source: jax.Array) -> jax.Array:
        """The shortcut of its source: the block's input, or the pre-activated input for a preact projection."""
        norm = None if self.preact else self.norm
        return Shortcut(self.features * self.expansion, self.strides, self.shortcut, self.conv, norm,
                        name="shortcut")(source)

    def _paths(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x for the branch and x for the shortcut (`F.fan_out`: one sum of their gradients); x twice when the
        block has no shortcut."""
        return F.fan_out(x) if self.residual else (x, x)

    def _preact_start(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """A pre-activation block's start: (``act(norm1(x))`` for the branch, the shortcut's source). A projection
        shortcut (the shape changes, option 'B') reads the pre-activated x, as in He et al. (2016b); the identity
        and option 'A' read x itself."""
        changes = x.shape[-1] != self.features * self.expansion or self.strides != 1
        norm1 = norm_act(self.norm, self.act, block=self, name="norm1")
        if changes and self.shortcut == "B":
            return self._paths(norm1(x))
        x, skip = self._paths(x)
        return norm1(x), skip

    def _preact_join(self, y: jax.Array, skip: jax.Array) -> jax.Array:
        """A pre-activation block's end: the branch output y plus the shortcut (no norm, no activation after)."""
        return y + self._shortcut(skip) if self.residual else y

    def _norm_join(self, y: jax.Array, skip: jax.Array, name: str) -> jax.Array:
        """A post-activation block's end: ``act(norm(y) + shortcut(skip))`` (``act(norm(y))`` without a shortcut).

        The last norm starts at zero scale with ``zero_init_residual``. Where that norm is a `layers.BatchNorm` and
        the activation the ReLU, the norm, the sum and the ReLU are one call (`layers.BatchNorm` with a residual),
        which the backend runs as one kernel.
        """
        norm = build(self, "norm", self.norm, name=name, zero_init=self.zero_init_residual)
        if not self.residual:
            return self.act(norm(y))
        shortcut = self._shortcut(skip)
        if isinstance(norm, layers.BatchNorm) and self.act is jax.nn.relu:
            return norm(y, shortcut, relu=True)
        return self.act(norm(y) + shortcut)

    def _drop(self, y: jax.Array, train: bool) -> jax.Array:
        return nn.Dropout(self.dropout)(y, deterministic=not train) if self.dropout else y


class BasicBlock(_ResidualBase):
    """Two kxk convolutions (He et al., 2015); ``preact=True``: BN-ReLU before each conv (He et al., 2016b).

    x: ``[N, H, W, Cin]`` -> ``[N, ceil(H / strides), ceil(W / strides), features]``. Submodules ``conv1``,
    ``norm1``, ``conv2``, ``norm2`` and ``shortcut`` (when the shape changes).
    """

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        conv = functools.partial(
            build, self, "conv", self.conv, self.features, kernel_size=self.kernel_size,
            padding=conv_padding(self.kernel_size), groups=self.groups,
        )
        if self.preact:
            pre, skip = self._preact_start(x)
            y = conv(strides=self.strides, name="conv1")(pre)
            y = self._drop(norm_act(self.norm, self.act, block=self, name="norm2")(y), train)
            y = conv(name="conv2")(y)
            return self._preact_join(y, skip)
        x, skip = self._paths(x)
        y = norm_act(self.norm, self.act, block=self, name="norm1")(conv(strides=self.strides, name="conv1")(x))
        y = self._drop(y, train)
        return self._norm_join(conv(name="conv2")(y), skip, "norm2")


class BottleneckBlock(_ResidualBase):
    """1x1 reduce, kxk (grouped for ResNeXt), 1x1 expand to ``4 * features`` (torchvision's "ResNet v1.5": the
    stride sits on the kxk conv). ``preact=True``: BN-ReLU before each conv.

    The inner width is ``int(features * base_width / 64) * groups`` (torchvision: ResNeXt-50 32x4d has groups=32,
    base_width=4; Wide ResNet-50-2 has base_width=128). x: ``[N, H, W, Cin]`` ->
    ``[N, ceil(H / strides), ceil(W / strides), 4 * features]``.
    """

    base_width: int = 64

    expansion: ClassVar[int] = 4

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        width = int(self.features * self.base_width / 64) * self.groups
        out = self.features * self.expansion
        k = self.kernel_size
        conv1 = build(self, "conv", self.conv, width, kernel_size=1, padding=0, name="conv1")
        conv2 = build(self, "conv", self.conv, width, kernel_size=k, strides=self.strides, padding=conv_padding(k),
                      groups=self.groups, name="conv2")
        conv3 = build(self, "conv", self.conv, out, kernel_size=1, padding=0, name="conv3")
        if self.preact:
            pre, skip = self._preact_start(x)
            y = conv1(pre)
            y = conv2(norm_act(self.norm, self.act, block=self, name="norm2")(y))
            y = self._drop(norm_act(self.norm, self.act, block=self, name="norm3")(y), train)
            return self._preact_join(conv3(y), skip)
        x, skip = self._paths(x)
        y = norm_act(self.norm, self.act, block=self, name="norm1")(conv1(x))
        y = norm_act(self.norm, self.act, block=self, name="norm2")(conv2(y))
        y = self._drop(y, train)
        return self._norm_join(conv3(y), skip, "norm3")


# ---------------------------------------------------------------------------------------------------------
# Inception (v1) and Network-in-Network
# ---------------------------------------------------------------------------------------------------------


class InceptionBlock(nn.Module):
    """GoogLeNet's Inception module (Szegedy et al., 2014), four branches concatenated on channels:

    1x1 | 1x1 reduce -> 3x3 | 1x1 reduce -> "5x5" | 3x3 max pool (stride 1) -> 1x1 projection.

    ``kernel5`` is the kernel of the third branch: 5 as in the paper; torchvision's GoogLeNet uses 3 (a bug it
    keeps for its pretrained weights). ``conv_block`` is a `ConvNormAct` partial. x: ``[N, H, W, Cin]`` ->
    ``[N, H, W, ch1x1 + ch3x3 + ch5x5 + pool_proj]``.
    """

    ch1x1: int
    ch3x3red: int
    ch3x3: int
    ch5x5red: int
    ch5x5: int
    pool_proj: int
    kernel5: int = 5
    pool: layers.PoolKind = "max"
    conv_block: ModuleDef = ConvNormAct

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cb = self.conv_block
        b1 = cb(self.ch1x1, kernel_size=1, name="branch1")(x)
        b2 = cb(self.ch3x3red, kernel_size=1, name="branch2_reduce")(x)
        b2 = cb(self.ch3x3, kernel_size=3, name="branch2")(b2)
        b3 = cb(self.ch5x5red, kernel_size=1, name="branch3_reduce")(x)
        b3 = cb(self.ch5x5, kernel_size=self.kernel5, name="branch3")(b3)
        b4 = layers.Pool2d(self.pool, window_shape=3, strides=1, padding=1, name="branch4_pool")(x)
        b4 = cb(self.pool_proj, kernel_size=1, name="branch4")(b4)
        return jnp.concatenate([b1, b2, b3, b4], axis=-1)


class NiNBlock(nn.Module):
    """Network-in-Network's "mlpconv" (Lin et al., 2013): a kxk conv then 1x1 convs, each with norm and act.

    ``features = (conv, mlp1, mlp2, ...)`` channels (the paper's blocks have two 1x1 convs). Submodules ``conv``,
    ``mlp1``, ``mlp2``, ... x: ``[N, H, W, Cin]`` -> ``[N, ceil(H / strides), ceil(W / strides), features[-1]]``.
    ``last_act=False`` leaves the activation off the last layer (for a block that outputs class maps).
    """

    features: tuple[int, ...]
    kernel_size: int = 3
    strides: int = 1
    last_act: bool = True
    conv: ModuleDef = layers.Conv2d
    norm: ModuleDef = _no_norm
    act: Callable[[jax.Array], jax.Array] = jax.nn.relu

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        block = functools.partial(ConvNormAct, conv=self.conv, norm=self.norm)
        last = len(self.features) - 1
        for i, channels in enumerate(self.features):
            act = self.act if (i < last or self.last_act) else None
            k, s = (self.kernel_size, self.strides) if i == 0 else (1, 1)
            x = block(channels, kernel_size=k, strides=s, act=act, name="conv" if i == 0 else f"mlp{i}")(x)
        return x


__all__ = [
    "BasicBlock",
    "BottleneckBlock",
    "ConvNormAct",
    "InceptionBlock",
    "NiNBlock",
    "Shortcut",
    "adaptive_avg_pool",
    "check_downsample",
    "conv_padding",
]
