"""Flax Linen layers for CNNs: convolution, pooling, normalisation as a choice, activations by name.

All layers take and return NHWC arrays (``x: [N, H, W, C]``). Every convolution goes through
`jaxcnn.nn.functional.conv2d`; the backend may run the layers faster, with the same values (docs/architecture.md).
Parameter names follow flax (``kernel``, ``bias``, ``scale``; batch statistics ``mean``/``var`` in the
``batch_stats`` collection), so parameter counts match flax's and torchvision's models.
"""

from __future__ import annotations

import typing
import warnings
from typing import Any, Callable, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype
from jax import lax

from jaxcnn import backends
from jaxcnn.nn import functional as F

Dtype = Any
Initializer = Callable[..., jax.Array]

class Dense(nn.Dense):
    """flax's ``nn.Dense`` (the same parameters, names and values) with its product through the backend's
    `dot_general`. x: ``[..., K]`` -> ``[..., features]``."""

    dot_general: Any = backends.dot_general


Dropout = nn.Dropout  # flax's own

# He et al. (2015) scaling, fan-in, truncated normal: keeps activation variance through ReLU layers. (torchvision
# ResNets use fan-out normal; the difference does not matter at these depths, and fan-in is what flax examples use.)
default_kernel_init: Initializer = nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")

KernelInit = Literal["he_normal", "he_uniform", "lecun_normal", "torch"]
KERNEL_INITS: dict[str, Initializer] = {
    "he_normal": default_kernel_init,
    "he_uniform": nn.initializers.variance_scaling(2.0, "fan_in", "uniform"),
    "lecun_normal": nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal"),
    # PyTorch's Conv2d default, kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)), variance
    # 1 / (3 fan_in), six times smaller than He. Under BatchNorm the scale does not change the function, but small
    # weights take larger effective steps early in training.
    "torch": nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"),
}


def kernel_init(name: str) -> Initializer:
    """A convolution kernel initializer by name (`KERNEL_INITS`); fan_in counts KH * KW * Cin / groups."""
    if name not in KERNEL_INITS:
        raise ValueError(f"unknown kernel init {name!r}; known: {', '.join(KERNEL_INITS)}")
    return KERNEL_INITS[name]


def _layer_label(module: nn.Module) -> str:
    """'Conv2d at Stage1/Conv2d_0' style name of a module for error messages."""
    path = "/".join(str(p) for p in module.path) if module.scope is not None else ""
    return f"{type(module).__name__} at '{path}'" if path else type(module).__name__


# ---------------------------------------------------------------------------------------------------------
# Convolution and pooling
# ---------------------------------------------------------------------------------------------------------


class Conv2d(nn.Module):
    """2-D convolution (cross-correlation) with optional bias, through `functional.conv2d`.

    x: ``[N, H, W, Cin]`` -> ``[N, H_out, W_out, features]``. Parameters: ``kernel [KH, KW, Cin / groups,
    features]`` and ``bias [features]``. ``dtype`` is the compute dtype (input and kernel are cast to it;
    None = promote input and parameter dtypes); parameters are stored in ``param_dtype``. The default kernel
    init is He/Kaiming: ``variance_scaling(2.0, 'fan_in', 'truncated_normal')``.
    """

    features: int
    kernel_size: int | tuple[int, int] = 3
    strides: int | tuple[int, int] = 1
    padding: F.Padding = "same"
    dilation: int | tuple[int, int] = 1
    groups: int = 1
    use_bias: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array, *, split_bias: bool = False) -> jax.Array | tuple[jax.Array, jax.Array | None]:
        """The conv's output ``[N, H_out, W_out, features]``; with ``split_bias=True`` the pair ``(output without
        the bias, bias [features] or None)``, for a next layer that takes the bias in itself (`BatchNorm`'s
        ``x_bias``: `jaxcnn.nn.ConvNormAct` passes it so)."""
        label = _layer_label(self)
        if x.ndim != 4:
            raise ValueError(f"{label}: expected x of shape [N, H, W, C], got {tuple(x.shape)}")
        try:
            kh, kw = F._pair(self.kernel_size, "kernel_size")
        except ValueError as error:
            raise ValueError(f"{label}: {error}") from None
        cin = x.shape[-1]
        if self.groups < 1 or cin % self.groups or self.features % self.groups:
            raise ValueError(
                f"{label}: groups={self.groups} must divide both the input channels ({cin}, input shape "
                f"{tuple(x.shape)}) and features ({self.features})"
            )
        kernel = self.param(
            "kernel", self.kernel_init, (kh, kw, cin // self.groups, self.features), self.param_dtype
        )
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
        try:
            y = F.conv2d(
                x, kernel, strides=self.strides, padding=self.padding, dilation=self.dilation, groups=self.groups
            )
        except ValueError as error:
            raise ValueError(f"{label}: {error}") from None
        if split_bias:
            return y, bias
        if bias is not None:
            y = backends.add_bias(y, bias)  # y + bias
        return y


PoolKind = Literal["max", "avg", "l2"]
POOL_KINDS: tuple[str, ...] = typing.get_args(PoolKind)


class Pool2d(nn.Module):
    """Windowed pooling: ``kind`` 'max', 'avg' or 'l2'. x: ``[N, H, W, C]`` -> ``[N, H_out, W_out, C]``.

    ``strides`` default to ``window_shape``; ``count_include_pad`` only matters for 'avg' with padding (see
    `functional.avg_pool`). ``window`` is a deprecated name of ``window_shape``.
    """

    kind: PoolKind = "max"
    window_shape: int | tuple[int, int] = 2
    strides: int | tuple[int, int] | None = None
    padding: F.Padding = "valid"
    count_include_pad: bool = True
    window: int | tuple[int, int] | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        label = _layer_label(self)
        window_shape = self.window_shape
        if self.window is not None:
            warnings.warn(f"{label}: window= is a deprecated name of window_shape=; pass window_shape=",
                          DeprecationWarning, stacklevel=2)
            window_shape = self.window
        try:
            if self.kind == "max":
                return F.max_pool(x, window_shape, self.strides, self.padding)
            if self.kind == "avg":
                return F.avg_pool(x, window_shape, self.strides, self.padding, self.count_include_pad)
            if self.kind == "l2":
                return F.l2_pool(x, window_shape, self.strides, self.padding)
        except ValueError as error:
            raise ValueError(f"{label} on input of shape {tuple(jnp.shape(x))}: {error}") from None
        raise ValueError(f"{label}: unknown pooling kind {self.kind!r}; use one of {POOL_KINDS}")


class GlobalPool(nn.Module):
    """Pool over height and width: ``kind`` 'avg' or 'max'. x: ``[N, H, W, C]`` -> ``[N, C]``."""

    kind: Literal["avg", "max"] = "avg"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.kind == "avg":
            return F.global_avg_pool(x)
        if self.kind == "max":
            return F.global_max_pool(x)
        raise ValueError(f"{_layer_label(self)}: unknown global pooling kind {self.kind!r}; use 'avg' or 'max'")


# ---------------------------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------------------------

NormKind = Literal["batch", "group", "layer", "none"]
NORMS: tuple[str, ...] = typing.get_args(NormKind)


def _standardize(x32: jax.Array, axes: tuple[int, ...], epsilon: float) -> tuple[jax.Array, ...]:
    """(x - mean) / sqrt(var + eps) over ``axes`` (biased variance), with the mean and var (kept dims)."""
    mean = jnp.mean(x32, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=axes, keepdims=True)
    return (x32 - mean) * lax.rsqrt(var + epsilon), mean, var


def _scale_and_shift(module: nn.Module, y: jax.Array, x: jax.Array) -> jax.Array:
    """``y * scale + bias`` with per-channel parameters of ``module`` (float32 math), cast to the output dtype:
    ``module.dtype``, or the promotion of the input and parameter dtypes when None."""
    c = x.shape[-1]
    scale = module.param("scale", module.scale_init, (c,), module.param_dtype)
    bias = module.param("bias", module.bias_init, (c,), module.param_dtype)
    y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    out_dtype = module.dtype if module.dtype is not None else jnp.promote_types(x.dtype, module.param_dtype)
    return y.astype(out_dtype)


class BatchNorm(nn.Module):
    """Batch normalisation (Ioffe & Szegedy, 2015) per channel over ``(N, H, W)``, x: ``[N, ..., C]``.

    In training (``use_running_average=False``) the layer normalises with the batch's mean and biased
    variance and moves the running statistics: ``running = momentum * running + (1 - momentum) * batch``
    (PyTorch's momentum 0.1 is 0.9 here); in evaluation it normalises with the running statistics. Then
    ``y * scale + bias`` per channel. Fields and variables mean what they mean for flax's ``nn.BatchNorm``
    (``use_fast_variance=False``, ``force_float32_reductions=True``): ``params: scale, bias``, ``batch_stats: mean,
    var``; ``dtype`` is the output dtype (None: promote the input and parameter dtypes); statistics are float32.
    ``relu=True`` makes the layer ``relu(BatchNorm(x))`` (conv-BN-ReLU's last two steps, which the backend may run
    as one kernel). Called with a ``residual`` (x's shape), the layer gives ``relu?(BatchNorm(x) + residual)``: a
    post-activation residual block's last norm, shortcut sum and ReLU, also one kernel; ``relu`` (the call's
    argument, default the field) says whether the ReLU follows the sum. ``pool_follows=True`` says a pooling layer
    comes next (it changes no values; see `make_norm`). ``x_bias`` ``[C]`` (a conv's bias, `Conv2d`'s
    ``split_bias``) makes the layer normalise ``x + x_bias`` without computing the sum (`functional.batch_norm`), and
    ``max_pool_window`` (kh x kw) max-pools the result over non-overlapping windows (``[N, H // kh, W // kw, C]``; in
    training on the CPU one kernel with the norm and the ReLU).
    ``axis_name`` (a pmap / shard_map axis): each device holds a slice of the batch and training normalises with the
    whole batch's statistics (`jaxcnn.backends.batch_norm` all-reduces its per-channel sums), so the running
    statistics are the same on every device.
    """

    use_running_average: bool = False
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    scale_init: Initializer = nn.initializers.ones
    bias_init: Initializer = nn.initializers.zeros
    relu: bool = False
    pool_follows: bool = False
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, residual: jax.Array | None = None, *, relu: bool | None = None,
                 x_bias: jax.Array | None = None, max_pool_window: int | tuple[int, int] | None = None) -> jax.Array:
        c = x.shape[-1]
        relu = self.relu if relu is None else relu
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        scale = self.param("scale", self.scale_init, (c,), self.param_dtype)
        bias = self.param("bias", self.bias_init, (c,), self.param_dtype)
        out_dtype = self.dtype if self.dtype is not None else jnp.promote_types(x.dtype, self.param_dtype)
        if self.use_running_average:
            y, _, _ = F.batch_norm(x, scale, bias, mean=ra_mean.value, var=ra_var.value, epsilon=self.epsilon,
                                   relu=relu, dtype=out_dtype, residual=residual, x_bias=x_bias,
                                   max_pool_window=max_pool_window)
        else:
            # `init` runs outside pmap / shard_map (no axis to all-reduce over): local statistics, as flax does.
            axis_name = None if self.is_initializing() else self.axis_name
            y, mean, var = F.batch_norm(x, scale, bias, epsilon=self.epsilon, relu=relu,
                                        pool_follows=self.pool_follows, axis_name=axis_name, dtype=out_dtype,
                                        residual=residual, x_bias=x_bias, max_pool_window=max_pool_window)
            if not self.is_initializing():
                mean, var = lax.stop_gradient(mean), lax.stop_gradient(var)
                ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
                ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        return y


class GhostBatchNorm(nn.Module):
    """BatchNorm whose statistics come from slices of ``virtual_batch_size`` examples (Hoffer et al., 2017).

    In training, x: ``[N, H, W, C]`` is seen as ``[N / v, v, H, W, C]``; each slice is normalised with its own
    per-channel mean and (biased) variance over ``(v, H, W)``. The running statistics move towards the mean
    over slices of those statistics. With ``axis_name`` (pmap/shard_map) the slices stay local to a device and
    only the running-statistics update is averaged over the axis, so replicas stay identical. Statistics are
    computed and kept in float32 whatever ``dtype`` is. Variables are named like flax's BatchNorm
    (``params: scale, bias``; ``batch_stats: mean, var``), so checkpoints are interchangeable.
    """

    virtual_batch_size: int
    use_running_average: bool = False
    momentum: float = 0.9
    epsilon: float = 1e-5
    axis_name: str | None = None
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    scale_init: Initializer = nn.initializers.ones
    bias_init: Initializer = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        x32 = x.astype(jnp.float32)
        if self.use_running_average:
            y = (x32 - ra_mean.value) * lax.rsqrt(ra_var.value + self.epsilon)
        else:
            n, v = x.shape[0], self.virtual_batch_size
            if v < 1 or n % v:
                raise ValueError(
                    f"{_layer_label(self)}: batch of {n} examples (input shape {tuple(x.shape)}) is not divisible "
                    f"by virtual_batch_size={v}; choose a batch size (per device) that is a multiple of it"
                )
            slices = x32.reshape(n // v, v, *x.shape[1:])
            y, mean, var = _standardize(slices, tuple(range(1, slices.ndim - 1)), self.epsilon)
            y = y.reshape(x.shape)
            if not self.is_initializing():
                batch_mean = jnp.mean(mean.reshape(-1, c), axis=0)
                batch_var = jnp.mean(var.reshape(-1, c), axis=0)
                if self.axis_name is not None:
                    batch_mean, batch_var = lax.pmean((batch_mean, batch_var), self.axis_name)
                ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * batch_mean
                ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * batch_var
        return _scale_and_shift(self, y, x)


def _largest_divisor_at_most(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


class GroupNorm(nn.Module):
    """Group normalisation (Wu & He, 2018) over ``(H, W, C / G)`` per example and group, per-channel affine.

    x: ``[N, ..., C]``. ``num_groups`` is an upper bound: the layer uses ``G`` = the largest divisor of ``C``
    that is at most ``num_groups`` (32 for C = 64, 24 for C = 48, 6 for C = 6), so one norm setting works for
    every width in a model. Statistics are computed in float32. Parameters: ``scale [C]``, ``bias [C]``.
    """

    num_groups: int = 32
    epsilon: float = 1e-5
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    scale_init: Initializer = nn.initializers.ones
    bias_init: Initializer = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim < 2:
            raise ValueError(f"{_layer_label(self)}: expected x of shape [N, ..., C], got {tuple(x.shape)}")
        if self.num_groups < 1:
            raise ValueError(f"{_layer_label(self)}: num_groups must be at least 1, got {self.num_groups}")
        c = x.shape[-1]
        g = _largest_divisor_at_most(c, self.num_groups)
        grouped = x.astype(jnp.float32).reshape(*x.shape[:-1], g, c // g)
        axes = tuple(range(1, grouped.ndim - 2)) + (grouped.ndim - 1,)
        y, _, _ = _standardize(grouped, axes, self.epsilon)
        return _scale_and_shift(self, y.reshape(x.shape), x)


class LayerNorm(GroupNorm):
    """Layer normalisation for feature maps: one group, statistics over ``(H, W, C)`` of each example, with a
    per-channel affine (GroupNorm with G = 1, as in Wu & He, 2018). For ``[N, C]`` inputs it is the usual
    LayerNorm over C."""

    num_groups: int = 1


def _identity(x: jax.Array) -> jax.Array:
    return x


def make_norm(
    kind: NormKind,
    *,
    train: bool,
    momentum: float = 0.9,
    epsilon: float = 1e-5,
    axis_name: str | None = None,
    virtual_batch_size: int | None = None,
    num_groups: int = 32,
    zero_init: bool = False,
    dtype: Dtype | None = None,
    name: str | None = None,
    activation: Callable[[jax.Array], jax.Array] | None = None,
    pool_follows: bool = False,
) -> Callable[[jax.Array], jax.Array]:
    """A normalisation layer by name, for models that take the norm as a knob. Call the result on ``[N, H, W, C]``.

    - ``'batch'``: flax ``BatchNorm`` per channel over ``(N, H, W)``; in training it normalises with the batch
      statistics and updates the running ones (``mutable=['batch_stats']``), in evaluation (``train=False``) it
      uses the running ones. ``momentum`` is flax's (running = momentum * running + (1 - momentum) * batch;
      PyTorch's momentum 0.1 is 0.9 here). ``axis_name`` takes the statistics over the whole batch of a
      pmap/shard_map axis (synced BatchNorm: the same closed form, its per-channel sums all-reduced); under plain
      ``jax.jit`` with a sharded batch leave it None: the mean is already global. With
      ``virtual_batch_size``, `GhostBatchNorm`. Statistics are float32 even when ``dtype`` is bfloat16 (flax's
      ``force_float32_reductions``). The variance is ``mean((x - mean)**2)`` to float32 precision (XLA: two
      passes; the CPU kernel: one pass about a shift near the mean): flax's default ``mean(x**2) - mean**2`` loses
      most digits in float32 when ``|mean| >> std`` (12% off for mean 300, std 2).
    - ``'group'``: `GroupNorm` with at most ``num_groups`` groups. ``'layer'``: `LayerNorm` (one group).
    - ``'none'``: the identity (no parameters).

    ``zero_init=True`` starts the scale γ at 0, for the last norm of a residual branch (the block starts as the
    identity, Goyal et al., 2017).

    ``activation`` (e.g. ``jax.nn.relu``) is applied to the norm's output: ``make_norm(..., activation=act)(x)``
    is ``act(make_norm(...)(x))`` with the same variables. Blocks pass it so that norm-then-ReLU runs as one fused
    kernel where the backend has one (`BatchNorm` with ``relu=True``). ``pool_follows=True`` says a pooling layer
    that XLA runs comes next (average, L2, overlapping or padded max pools): the backend then leaves the
    normalisation and the activation to XLA, which fuses them with the pool. It changes no values. Max pools of
    non-overlapping windows run in the backend's own kernel, which no fusion reaches, so do not pass it there
    (docs/architecture.md).
    """
    norm = _make_norm(kind, train=train, momentum=momentum, epsilon=epsilon, axis_name=axis_name,
                      virtual_batch_size=virtual_batch_size, num_groups=num_groups, zero_init=zero_init, dtype=dtype,
                      name=name, fused_relu=activation is jax.nn.relu, pool_follows=pool_follows)
    if activation is None or (isinstance(norm, BatchNorm) and norm.relu):
        return norm
    return lambda x: activation(norm(x))


def _make_norm(kind: NormKind, *, train: bool, momentum: float, epsilon: float, axis_name: str | None,
               virtual_batch_size: int | None, num_groups: int, zero_init: bool, dtype: Dtype | None,
               name: str | None, fused_relu: bool, pool_follows: bool) -> Callable[[jax.Array], jax.Array]:
    scale_init = nn.initializers.zeros if zero_init else nn.initializers.ones
    if kind == "batch":
        if virtual_batch_size is not None:
            return GhostBatchNorm(
                virtual_batch_size=virtual_batch_size,
                use_running_average=not train,
                momentum=momentum,
                epsilon=epsilon,
                axis_name=axis_name,
                dtype=dtype,
                scale_init=scale_init,
                name=name,
            )
        return BatchNorm(
            use_running_average=not train, momentum=momentum, epsilon=epsilon, dtype=dtype,
            scale_init=scale_init, name=name, relu=fused_relu, pool_follows=pool_follows, axis_name=axis_name,
        )
    if kind == "group":
        return GroupNorm(num_groups=num_groups, epsilon=epsilon, dtype=dtype, scale_init=scale_init, name=name)
    if kind == "layer":
        return LayerNorm(epsilon=epsilon, dtype=dtype, scale_init=scale_init, name=name)
    if kind == "none":
        return _identity
    raise ValueError(f"unknown norm {kind!r}; use one of {NORMS}")


# ---------------------------------------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------------------------------------

Act = Literal[
    "relu", "relu6", "leaky_relu", "elu", "gelu", "silu", "swish", "tanh", "sigmoid", "softplus", "mish",
    "identity",
]
ACTIVATIONS: tuple[str, ...] = typing.get_args(Act)


def _mish(x: jax.Array) -> jax.Array:
    return x * jnp.tanh(jax.nn.softplus(x))


def _gelu(x: jax.Array) -> jax.Array:
    # The exact erf form, like PyTorch's nn.GELU() default (jax.nn.gelu defaults to the tanh approximation).
    return jax.nn.gelu(x, approximate=False)


_ACTIVATION_FUNCTIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "relu6": jax.nn.relu6,
    "leaky_relu": jax.nn.leaky_relu,  # negative slope 0.01, as PyTorch
    "elu": jax.nn.elu,
    "gelu": _gelu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "softplus": jax.nn.softplus,
    "mish": _mish,
    "identity": _identity,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The elementwise activation function called ``name`` (one of `ACTIVATIONS`)."""
    try:
        return _ACTIVATION_FUNCTIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; use one of {', '.join(ACTIVATIONS)}") from None


__all__ = [
    "ACTIVATIONS",
    "Act",
    "BatchNorm",
    "Conv2d",
    "Dense",
    "Dropout",
    "GhostBatchNorm",
    "GlobalPool",
    "GroupNorm",
    "LayerNorm",
    "NORMS",
    "NormKind",
    "POOL_KINDS",
    "PoolKind",
    "Pool2d",
    "activation",
    "default_kernel_init",
    "KERNEL_INITS",
    "KernelInit",
    "kernel_init",
    "make_norm",
]
