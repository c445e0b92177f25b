"""The seam between jaxcnn's layers and the kernels that run them: one dispatch function per primitive.

`jaxcnn.nn`, `jaxcnn.train` and `jaxcnn.analysis` call these functions and nothing below them. Each takes the
arguments of the `jax.lax` / flax / optax operation it stands for and gives the same values; where the CPU
backend (`jaxcnn.backends.cpu`) has a faster implementation for the call it runs that, else the plain `lax` one.

    conv_general_dilated   lax.conv_general_dilated for NHWC inputs and HWIO kernels
    dot_general            lax.dot_general (what flax's ``nn.Dense(dot_general=...)`` takes)
    max_pool               lax.reduce_window(max) with explicit padding
    batch_norm             a training-mode batch normalisation (then a ReLU when asked): (y, mean, var)
    add_bias               y + bias over the last axis
    fan_out                (x, x) for two paths (a residual block's branch and shortcut)
    sgd, apply_gradients   optax's SGD chain, and one optimizer step with it or any optax transformation
    configure_process      XLA's CPU flags and malloc settings, before JAX starts its backend
    concurrent_devices     how many devices of this process run the steps traced inside (their thread share)

The setting: the environment variable ``JAXCNN_ONEDNN`` (read whenever a layer is traced). Unset or 1: on the
CPU, float32 convolutions, dense products, BatchNorm, non-overlapping max pools and the SGD update run in
jaxcnn's native kernels (oneDNN and AVX-512 loops through XLA FFI, compiled on first use). 0 / false / no / off:
XLA's kernels. `xla_kernels()` switches them off for the code traced inside it (to read XLA's cost analysis,
which cannot see into the native kernels). A program lowered for a GPU or TPU never holds a native kernel: the
choice is made per platform when the program is lowered. docs/architecture.md draws the seam.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxcnn.backends.cpu import conv as _conv
from jaxcnn.backends.cpu import dense as _dense
from jaxcnn.backends.cpu import fan_out as _fan_out
from jaxcnn.backends.cpu import kernels as _kernels
from jaxcnn.backends.cpu import norm as _norm
from jaxcnn.backends.cpu import pool as _pool
from jaxcnn.backends.cpu import reductions as _reductions
from jaxcnn.backends.cpu import sgd as _sgd
from jaxcnn.backends.cpu import xla_flags as _xla_flags

NHWC_HWIO = ("NHWC", "HWIO", "NHWC")


# ------------------------------------------------------------------------------------------------- the setting

def enabled() -> bool:
    """Whether layers traced now may use the native CPU kernels: JAXCNN_ONEDNN is not 0 / false / no / off and no
    `xla_kernels()` block is active."""
    return _kernels.enabled()


def native_kernels_available() -> bool:
    """Whether the native kernels are enabled, built and registered with XLA (builds them on first call)."""
    return _kernels.available()


@contextlib.contextmanager
def xla_kernels() -> Iterator[None]:
    """Within this block, the layers traced use XLA's kernels only (the same values)."""
    with _kernels.xla_convolutions():
        yield


@contextlib.contextmanager
def concurrent_devices(n: int) -> Iterator[None]:
    """Steps traced inside run on `n` CPU devices of this process at once: each native kernel gets its share of
    the cores (`jaxcnn.train.parallel` traces every strategy's steps inside this)."""
    with _kernels.concurrent_devices(n):
        yield


def configure_process(flags: dict[str, str] | None = None) -> bool:
    """Adds jaxcnn's XLA CPU flags (or `flags`) to ``XLA_FLAGS`` and applies the opt-in host malloc settings
    (``JAXCNN_HOST_MALLOC=1``). Call it before the first JAX array or jit; returns False (with a warning) when JAX's
    backend already started, where they cannot take effect. A flag already in ``XLA_FLAGS`` is kept."""
    return _xla_flags.configure_xla_cpu(flags)


def eval_compiler_options() -> dict[str, str] | None:
    """XLA compiler options for an evaluation step (``jax.jit(eval_step, compiler_options=...)``), or None for
    XLA's defaults: on the CPU, YNNPACK for dots only, which runs inference-mode BatchNorm, ReLU and pooling about
    2x as fast (docs/cpu_backend.md); None on other backends."""
    return _xla_flags.eval_compiler_options()


# ------------------------------------------------------------------------------------------------- primitives

def _pairs(padding: Any) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """Explicit 2-D padding ((top, bottom), (left, right)) as ints, or None (a string, or another rank)."""
    if isinstance(padding, str) or len(padding) != 2:
        return None
    (top, bottom), (left, right) = padding
    return (int(top), int(bottom)), (int(left), int(right))


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                         padding: str | Sequence[tuple[int, int]], lhs_dilation: Sequence[int] | None = None,
                         rhs_dilation: Sequence[int] | None = None, dimension_numbers: Any = None,
                         feature_group_count: int = 1, batch_group_count: int = 1, precision: Any = None,
                         preferred_element_type: Any = None) -> jax.Array:
    """`lax.conv_general_dilated` with the same arguments and values.

    2-D convolutions of NHWC inputs with HWIO kernels (``dimension_numbers=("NHWC", "HWIO", "NHWC")``), explicit
    padding, no input dilation, ``batch_group_count=1`` and default precision run in the CPU backend
    (`jaxcnn.backends.cpu.conv`: oneDNN for float32 on the CPU, XLA formulations with faster gradients otherwise);
    every other call is `lax.conv_general_dilated` itself.
    """
    pads = _pairs(padding)
    native = (tuple(dimension_numbers or ()) == NHWC_HWIO and pads is not None and lhs.ndim == 4 and rhs.ndim == 4
              and all(d == 1 for d in (lhs_dilation or (1, 1))) and batch_group_count == 1
              and precision is None and preferred_element_type is None)
    if native:
        return _conv.conv2d(lhs, rhs, strides=tuple(window_strides), padding=pads,
                            dilation=tuple(rhs_dilation or (1, 1)), groups=feature_group_count)
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                    rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                    feature_group_count=feature_group_count, batch_group_count=batch_group_count,
                                    precision=precision, preferred_element_type=preferred_element_type)


def dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any, precision: Any = None,
                preferred_element_type: Any = None, **kwargs: Any) -> jax.Array:
    """`lax.dot_general` with the same signature and values; a dense layer's product (lhs ``[..., K]`` @ rhs
    ``[K, N]``) of float32 operands runs in oneDNN's sgemm on the CPU."""
    return _dense.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                              preferred_element_type=preferred_element_type, **kwargs)


def max_pool(x: jax.Array, window_shape: tuple[int, int], strides: tuple[int, int],
             padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
    """Max over windows of x ``[N, H, W, C]``: ``lax.reduce_window(x, -inf, lax.max, (1, *window_shape, 1),
    (1, *strides, 1), ((0, 0), *padding, (0, 0)))``, padded cells never winning (the lowest integer for integer x).

    Non-overlapping windows without padding (strides equal to the window) run in the CPU backend
    (`jaxcnn.backends.cpu.pool`): the same values and the same gradient, computed faster.
    """
    window_shape, strides = tuple(window_shape), tuple(strides)
    if _pool.tiles(window_shape, strides, padding):
        return _pool.max_pool_tiled(x, window_shape)
    if jnp.issubdtype(x.dtype, jnp.floating):
        init = np.array(-np.inf, x.dtype)  # a concrete scalar: lax picks the differentiable max reducer
    else:
        init = np.array(np.iinfo(x.dtype).min, x.dtype)
    return lax.reduce_window(x, init, lax.max, (1, *window_shape, 1), (1, *strides, 1), ((0, 0), *padding, (0, 0)))


def batch_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, *, epsilon: float, relu: bool = False,
               pool_follows: bool = False, axis_name: Any = None, dtype: Any = jnp.float32,
               residual: jax.Array | None = None,
               pool_window: tuple[int, int] | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Training-mode batch normalisation of x ``[..., C]`` over every axis but the last, plus `residual` (x's
    shape) when given, then ``jax.nn.relu`` when `relu`: ``(y [..., C] in dtype, mean [C], var [C])`` with the
    batch mean and biased variance, float32.

    ``y = (x - mean) * rsqrt(var + epsilon) * scale + bias``, as flax's BatchNorm computes it. The gradient is the
    closed form (two per-channel sums, one elementwise pass). On the CPU, float32 runs jaxcnn's native kernel (the
    residual's add and the ReLU fused) unless `pool_follows` (a pooling layer that XLA fuses with the normalisation
    comes next), and so does a bfloat16 x with ``dtype=bfloat16`` (computed in float32 inside the kernel, y rounded
    once to bfloat16).

    With `axis_name` (a pmap / shard_map axis) x is this device's slice of the batch and the statistics are the
    whole batch's: the same closed form in JAX with its per-channel sums all-reduced (``lax.psum``) over the axis
    (the native kernel computes its statistics inside itself, over this device's slice only).

    With `pool_window` (kh, kw) y is then max-pooled over non-overlapping windows (`max_pool` with strides equal to the
    window, no padding): ``[N, H // kh, W // kw, C]``. On the CPU, float32 x without a residual runs BatchNorm, the
    ReLU and the pool in one native call each way, the full-size output never written.
    """
    if axis_name is not None or residual is not None or pool_window is None:
        if axis_name is not None:
            y, mean, var = _norm.batch_norm_train_synced(x, scale, bias, epsilon, axis_name)
            if residual is not None:
                y = y + residual.astype(jnp.float32)
            y = (jax.nn.relu(y) if relu else y).astype(dtype)
        else:
            y, mean, var = _norm.batch_norm_act_train(x, scale, bias, epsilon, relu, use_native=not pool_follows,
                                                      dtype=dtype, residual=residual)
        if pool_window is not None:
            y = max_pool(y, tuple(pool_window), tuple(pool_window), ((0, 0), (0, 0)))
        return y, mean, var
    return _norm.batch_norm_act_max_pool_train(x, scale, bias, epsilon, relu, tuple(pool_window),
                                               use_native=not pool_follows, dtype=dtype)


def add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
    """``y [..., C] + bias [C]``; the bias gradient is a per-channel sum laid out for XLA's CPU vector units."""
    return _reductions.add_bias(y, bias)


def fan_out(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(x, x)`` for two paths that read x; x's gradient is the sum of the paths' gradients, as JAX gives it, added
    on the CPU in a native kernel (XLA's CPU add is up to 3x slower for bfloat16; the same bits)."""
    return _fan_out.fan_out(x)


# ------------------------------------------------------------------------------------------------- the optimizer

FusedSGD = _sgd.FusedSGD


def sgd(learning_rate: Any, *, momentum: float, nesterov: bool = False, weight_decay: float = 0.0,
        mask: Any = None) -> FusedSGD:
    """optax's ``chain(add_decayed_weights(weight_decay, mask), sgd(learning_rate, momentum, nesterov))`` (its
    `init` and `update`, so its state and checkpoints), with an `apply` that on the CPU updates float32 parameters
    and momenta in one native pass (the bits optax gives under `jax.jit`). Use it through `apply_gradients`."""
    return _sgd.fused_sgd(learning_rate, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, mask=mask)


def apply_gradients(tx: Any, grads: Any, opt_state: Any, params: Any) -> tuple[Any, Any]:
    """(new params, new opt_state) of one optimizer step: ``tx.update`` and ``optax.apply_updates`` for any optax
    transformation, one native pass for an `sgd` where it applies."""
    return _sgd.apply_gradients(tx, grads, opt_state, params)


__all__ = [
    "FusedSGD",
    "NHWC_HWIO",
    "add_bias",
    "apply_gradients",
    "batch_norm",
    "concurrent_devices",
    "configure_process",
    "conv_general_dilated",
    "dot_general",
    "enabled",
    "eval_compiler_options",
    "fan_out",
    "max_pool",
    "native_kernels_available",
    "sgd",
    "xla_kernels",
]
