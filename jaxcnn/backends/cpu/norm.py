"""Training-mode BatchNorm with a hand-written VJP (flax's `nn.BatchNorm` mathematics), and native kernels for it.

`jaxcnn.backends.batch_norm` (what `jaxcnn.nn.BatchNorm` calls in training) is `batch_norm_act_train`: it
normalises with the batch's per-channel mean and (two-pass, biased) variance, computed in float32. Automatic
differentiation of that forward pass walks back through the mean and the variance separately; the hand-written
backward pass needs two per-channel sums and one elementwise pass:

    xhat = (x - mean) * rstd,  dbias = sum(dy),  dscale = sum(dy * xhat)
    dx = scale * rstd * (dy - dbias / M - xhat * dscale / M)          (M = N * H * W values per channel)

which ran 25% faster than flax's on CIFAR ResNet shapes on 2 CPU cores (benchmarks/README.md). Under pmap /
shard_map (a BatchNorm ``axis_name``) `batch_norm_train_synced` is the same closed form with its per-channel sums
(the mean and variance forward, ``sum(dy)`` and ``sum(dy * xhat)`` backward) all-reduced over the devices.

On the CPU backend, training-mode BatchNorm runs in jaxcnn's own kernel instead (`csrc/batch_norm.cc`, XLA FFI calls
built with the convolutions, `jaxcnn.backends.cpu.kernels`), split over XLA's thread pool: one forward call
(statistics, normalisation, and the ReLU after it when ``relu=True``, what `make_norm(..., activation=jax.nn.relu)`
and every conv-BN-ReLU block build) and one backward call, which recomputes the ReLU's mask from x. A residual
block's last BatchNorm, its shortcut sum and the ReLU after it are one call too (``residual``). float32 activations,
and bfloat16 ones whose output is wanted in bfloat16 (a model built with ``dtype=bfloat16``): the kernel computes in
float32 and rounds y (and, backward, dx) once to bfloat16. The derivatives of those calls are these JAX formulas
(second derivatives work); a function traced here and lowered for another platform gets the XLA version
(`lax.platform_dependent`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero

from jaxcnn.backends.cpu import kernels
from jaxcnn.backends.cpu import pool as _pool


def _reduction_axes(x: jax.Array) -> tuple[int, ...]:
    return tuple(range(x.ndim - 1))


def _forward(x, scale, bias, epsilon):
    """(y, mean, var, rstd) in float32 statistics; y = (x - mean) * (rstd * scale) + bias as flax computes it."""
    axes = _reduction_axes(x)
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axes)
    var = jnp.mean(jnp.square(x32 - mean), axes)
    rstd = lax.rsqrt(var + epsilon)
    y = (x32 - mean) * (rstd * scale.astype(jnp.float32)) + bias.astype(jnp.float32)
    return y, mean, var, rstd


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float):
    """Training-mode batch normalisation over all axes but the last.

    x: ``[..., C]``; scale, bias: ``[C]``. Returns ``(y [..., C] float32, mean [C], var [C])`` with the batch
    mean and biased variance (float32).
    """
    y, mean, var, _ = _forward(x, scale, bias, epsilon)
    return y, mean, var


def _bn_fwd(x, scale, bias, epsilon):
    y, mean, var, rstd = _forward(x, scale, bias, epsilon)
    return (y, mean, var), (x, mean, rstd, scale, bias)


def _normalized_grad(xhat, dy, rstd, scale):
    """(dx, dscale, dbias) of y = xhat * scale + bias, xhat = (x - mean) * rstd with the batch statistics, for
    the cotangent dy (float32):

        dbias = sum(dy),  dscale = sum(dy * xhat),  dx = scale * rstd * (dy - dbias / M - xhat * dscale / M)
    """
    axes = _reduction_axes(xhat)
    m = xhat.size // xhat.shape[-1]
    dbias = jnp.sum(dy, axes)
    dscale = jnp.sum(dy * xhat, axes)
    dx = (scale * rstd) * (dy - dbias / m - xhat * (dscale / m))
    return dx, dscale, dbias


def _add_statistics_cotangents(dx, x32, mean, dmean, dvar):
    """dx plus what the batch mean's and variance's own cotangents contribute (None: a symbolic zero). They are
    outputs too (for the running averages), and their cotangents are normally zero."""
    m = x32.size // x32.shape[-1]
    if dmean is not None:
        dx = dx + dmean / m
    if dvar is not None:
        dx = dx + dvar * (2.0 / m) * (x32 - mean)
    return dx


def _bn_bwd(epsilon, residuals, cotangents):
    x, mean, rstd, scale, bias = residuals
    dy, dmean, dvar = cotangents
    x32 = x.astype(jnp.float32)
    dx, dscale, dbias = _normalized_grad((x32 - mean) * rstd, dy, rstd, scale.astype(jnp.float32))
    dx = _add_statistics_cotangents(dx, x32, mean, dmean, dvar)
    return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(bias.dtype)


batch_norm_train.defvjp(_bn_fwd, _bn_bwd)


# ------------------------------------------------------------------------------------------- native kernels (CPU)
#
# Every function here takes an optional `residual` (x's shape and dtype, or None): added to the normalised value
# before the ReLU, ``y = relu?(BatchNorm(x) + residual)``, the last three steps of a post-activation residual block.

def _pre_activation(x, mean, rstd, scale, bias, residual):
    """The float32 value the ReLU sees: BatchNorm(x) (flax's formula), plus the residual."""
    y = (x.astype(jnp.float32) - mean) * (rstd * scale.astype(jnp.float32)) + bias.astype(jnp.float32)
    return y if residual is None else y + residual.astype(jnp.float32)


def _reference_grad(x, dy, mean, var, scale, bias, residual, epsilon, relu):
    """`_native_grad` in JAX operations: (dx, dscale, dbias[, dresidual]) of y = relu?(BatchNorm(x) + residual) for
    the cotangent dy.

    Computed in float32; dx (and dresidual) come back in x's dtype. The ReLU's mask is recomputed from x, as the
    native kernel does. Its derivatives are the second derivatives of the fused layer.
    """
    rstd = lax.rsqrt(var + epsilon)
    xhat = (x.astype(jnp.float32) - mean) * rstd
    dy = dy.astype(jnp.float32)
    if relu:
        dy = jnp.where(_pre_activation(x, mean, rstd, scale, bias, residual) > 0, dy, 0.0)
    dx, dscale, dbias = _normalized_grad(xhat, dy, rstd, scale)
    if residual is None:
        return dx.astype(x.dtype), dscale, dbias
    return dx.astype(x.dtype), dscale, dbias, dy.astype(residual.dtype)


def _reference_forward(x, scale, bias, residual, epsilon, relu, dtype=jnp.float32):
    """`batch_norm_train`'s forward pass, plus the residual, then the ReLU when `relu`: ``(y in dtype, mean, var)``."""
    y, mean, var, _ = _forward(x, scale, bias, epsilon)
    if residual is not None:
        y = y + residual.astype(jnp.float32)
    return (jax.nn.relu(y) if relu else y).astype(dtype), mean, var


@functools.partial(jax.custom_jvp, nondiff_argnums=(4,))
def _native_forward(x, scale, bias, residual, geometry):
    """The native forward pass ``(y, mean, var)``, differentiable (for second derivatives, where the backward pass
    itself is differentiated) through `_reference_forward`'s JAX operations."""
    return kernels.norm_forward(x, scale, bias, geometry, residual)


@_native_forward.defjvp
def _native_forward_jvp(geometry, primals, tangents):
    out = _native_forward(*primals, geometry)
    reference = functools.partial(_reference_forward, epsilon=geometry.epsilon, relu=geometry.relu,
                                  dtype=geometry.dtype)
    _, tangent_out = jax.jvp(reference, primals, tangents)
    return out, tangent_out


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _native_grad(x, dy, mean, var, scale, bias, residual, geometry):
    """The native backward pass, differentiable again through `_reference_grad`."""
    return kernels.norm_backward(x, dy, mean, var, scale, bias, geometry, residual)


def _native_grad_fwd(x, dy, mean, var, scale, bias, residual, geometry):
    out = kernels.norm_backward(x, dy, mean, var, scale, bias, geometry, residual)
    return out, (x, dy, mean, var, scale, bias, residual)


def _native_grad_bwd(geometry, residuals, cotangents):
    _, vjp = jax.vjp(functools.partial(_reference_grad, epsilon=geometry.epsilon, relu=geometry.relu), *residuals)
    return vjp(cotangents)


_native_grad.defvjp(_native_grad_fwd, _native_grad_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _batch_norm_native(x: jax.Array, scale: jax.Array, bias: jax.Array, residual: jax.Array | None,
                       geometry: kernels.NormGeometry):
    """`batch_norm_train` (plus the residual, then the ReLU when ``geometry.relu``) in the native kernels:
    ``(y, mean, var)``, y in ``geometry.dtype``."""
    return _platform_forward(x, scale, bias, residual, geometry)


def _platform_forward(x, scale, bias, residual, geometry):
    """The native forward pass on the CPU; on other platforms (a function traced here, exported for a GPU) its JAX
    operations."""
    def default(x, scale, bias, residual):
        return _reference_forward(x, scale, bias, residual, geometry.epsilon, geometry.relu, geometry.dtype)

    return lax.platform_dependent(x, scale, bias, residual,
                                  cpu=functools.partial(_native_forward, geometry=geometry), default=default)


def _platform_grad(x, dy, mean, var, scale, bias, residual, geometry):
    """`_native_grad` on the CPU, `_reference_grad` elsewhere."""
    def default(x, dy, mean, var, scale, bias, residual):
        return _reference_grad(x, dy, mean, var, scale, bias, residual, geometry.epsilon, geometry.relu)

    return lax.platform_dependent(x, dy, mean, var, scale, bias, residual,
                                  cpu=functools.partial(_native_grad, geometry=geometry), default=default)


def _native_fwd(x, scale, bias, residual, geometry):
    residual = None if residual is None else residual.value
    y, mean, var = _platform_forward(x.value, scale.value, bias.value, residual, geometry)
    return (y, mean, var), (x.value, mean, var, scale.value, bias.value, residual)


def _native_bwd(geometry, saved, cotangents):
    x, mean, var, scale, bias, residual = saved
    dy, dmean, dvar = cotangents
    if isinstance(dy, SymbolicZero):
        dy = jnp.zeros(x.shape, geometry.dtype)
    dx, dscale, dbias, *dresidual = _platform_grad(x, dy, mean, var, scale, bias, residual, geometry)
    dresidual = dresidual[0] if dresidual else None
    # In training the statistics' cotangents are symbolic zeros (they only feed the running averages): skipped.
    def given(ct):
        return None if isinstance(ct, SymbolicZero) else ct

    if given(dmean) is not None or given(dvar) is not None:
        dx = _add_statistics_cotangents(dx.astype(jnp.float32), x.astype(jnp.float32), mean, given(dmean),
                                        given(dvar)).astype(x.dtype)
    return dx, dscale, dbias, dresidual


_batch_norm_native.defvjp(_native_fwd, _native_bwd, symbolic_zeros=True)


# ------------------------------------------------------------------ BatchNorm (+ ReLU) then a max pool, one call

def _reference_norm_pool(x, scale, bias, epsilon, relu, window):
    """pool(relu?(BatchNorm(x))) in JAX operations: ``(y, choice, mean, var)``, the pool's choice as
    `jaxcnn.backends.cpu.pool` makes it."""
    y, mean, var = _reference_forward(x, scale, bias, None, epsilon, relu)
    pooled, choice = _pool._pool_and_choice(y, window)
    return pooled, choice, mean, var


def _reference_norm_pool_grad(x, g, choice, mean, var, scale, bias, epsilon, relu, window):
    """(dx, dscale, dbias) for the pooled cotangent g: the pool's scatter, then `_reference_grad`."""
    dy = _pool._scatter(g, choice, x.shape[1:3], window)
    return _reference_grad(x, dy, mean, var, scale, bias, None, epsilon, relu)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def _native_norm_pool_forward(x, scale, bias, geometry, window):
    """The native forward call ``(y, choice, mean, var)``, differentiable through the JAX operations (for second
    derivatives): y's tangent is the BatchNorm output's tangent at each window's choice."""
    return kernels.norm_pool_forward(x, scale, bias, geometry, window)


@_native_norm_pool_forward.defjvp
def _native_norm_pool_forward_jvp(geometry, window, primals, tangents):
    out = _native_norm_pool_forward(*primals, geometry, window)
    choice = out[1]

    def reference(x, scale, bias):
        y, mean, var = _reference_forward(x, scale, bias, None, geometry.epsilon, geometry.relu)
        return _pool._gather(y, choice, window), mean, var

    _, (dy, dmean, dvar) = jax.jvp(reference, primals, tangents)
    return out, (dy, np.zeros(choice.shape, jax.dtypes.float0), dmean, dvar)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _native_norm_pool_grad(x, g, choice, mean, var, scale, bias, geometry, window):
    """The native backward call, differentiable again through `_reference_norm_pool_grad`."""
    return kernels.norm_pool_backward(x, g, choice, mean, var, scale, bias, geometry, window)


def _native_norm_pool_grad_fwd(x, g, choice, mean, var, scale, bias, geometry, window):
    out = kernels.norm_pool_backward(x, g, choice, mean, var, scale, bias, geometry, window)
    return out, (x, g, choice, mean, var, scale, bias)


def _native_norm_pool_grad_bwd(geometry, window, residuals, cotangents):
    x, g, choice, mean, var, scale, bias = residuals

    def reference(x, g, mean, var, scale, bias):
        return _reference_norm_pool_grad(x, g, choice, mean, var, scale, bias, geometry.epsilon, geometry.relu,
                                         window)

    dx, dg, dmean, dvar, dscale, dbias = jax.vjp(reference, x, g, mean, var, scale, bias)[1](cotangents)
    return dx, dg, None, dmean, dvar, dscale, dbias


_native_norm_pool_grad.defvjp(_native_norm_pool_grad_fwd, _native_norm_pool_grad_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _batch_norm_pool_native(x, scale, bias, geometry, window):
    """pool(relu?(BatchNorm(x))) in one native call each way: ``(y pooled, mean, var)``."""
    y, _, mean, var = _platform_norm_pool_forward(x, scale, bias, geometry, window)
    return y, mean, var


def _platform_norm_pool_forward(x, scale, bias, geometry, window):
    def default(x, scale, bias):
        return _reference_norm_pool(x, scale, bias, geometry.epsilon, geometry.relu, window)

    return lax.platform_dependent(x, scale, bias, default=default,
                                  cpu=lambda x, scale, bias: _native_norm_pool_forward(x, scale, bias, geometry,
                                                                                       window))


def _norm_pool_fwd(x, scale, bias, geometry, window):
    x, scale, bias = x.value, scale.value, bias.value
    y, choice, mean, var = _platform_norm_pool_forward(x, scale, bias, geometry, window)
    return (y, mean, var), (x, choice, mean, var, scale, bias)


def _norm_pool_bwd(geometry, window, saved, cotangents):
    x, choice, mean, var, scale, bias = saved
    g, dmean, dvar = cotangents
    if isinstance(g, SymbolicZero):
        g = jnp.zeros(choice.shape, jnp.float32)

    def default(x, g, choice, mean, var, scale, bias):
        return _reference_norm_pool_grad(x, g, choice, mean, var, scale, bias, geometry.epsilon, geometry.relu,
                                         window)

    def cpu(x, g, choice, mean, var, scale, bias):
        return _native_norm_pool_grad(x, g, choice, mean, var, scale, bias, geometry, window)

    dx, dscale, dbias = lax.platform_dependent(x, g, choice, mean, var, scale, bias, cpu=cpu, default=default)
    dmean = None if isinstance(dmean, SymbolicZero) else dmean
    dvar = None if isinstance(dvar, SymbolicZero) else dvar
    if dmean is not None or dvar is not None:
        dx = _add_statistics_cotangents(dx, x, mean, dmean, dvar)
    return dx, dscale, dbias


_batch_norm_pool_native.defvjp(_norm_pool_fwd, _norm_pool_bwd, symbolic_zeros=True)


def batch_norm_act_max_pool_train(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, relu: bool,
                                  window: tuple[int, int], use_native: bool = True, dtype=jnp.float32):
    """`batch_norm_act_train` then a max pool over non-overlapping `window` (kh, kw) windows (rows and columns past
    the last whole window dropped): ``(y [N, H // kh, W // kw, C] in dtype, mean [C], var [C])``.

    On the CPU backend, for float32 x ``[N, H, W, C]``, float32 parameters and output, both passes run in one native
    call each (`kernels.norm_pool_forward`): the BatchNorm output is pooled as it is computed, never written at
    full size, and the backward pass computes BatchNorm's gradient straight from the pooled cotangent and the
    pool's choices. Elsewhere it is the composition of `batch_norm_act_train` and the tiled max pool.
    """
    window = (int(window[0]), int(window[1]))
    geometry = None
    if (use_native and x.ndim == 4 and np.dtype(dtype) == np.float32 and 1 <= window[0] * window[1] <= 127
            and x.shape[1] >= window[0] and x.shape[2] >= window[1]):
        geometry = kernels.norm_usable(x.shape, (x.dtype, scale.dtype, bias.dtype), relu=relu, epsilon=epsilon)
    if geometry is not None and not geometry.bf16:
        return _batch_norm_pool_native(x, scale, bias, geometry, window)
    y, mean, var = batch_norm_act_train(x, scale, bias, epsilon, relu, use_native=use_native, dtype=dtype)
    return _pool.max_pool_tiled(y, window), mean, var


# ------------------------------------------------------------------------------------ statistics over devices

def _synced_forward(x, scale, bias, epsilon, axis_name):
    """`_forward` with the per-channel sums taken over the devices of `axis_name` too (two passes, like one device)."""
    axes = _reduction_axes(x)
    x32 = x.astype(jnp.float32)
    m = lax.psum(x32.size // x32.shape[-1], axis_name)
    mean = lax.psum(jnp.sum(x32, axes), axis_name) / m
    var = lax.psum(jnp.sum(jnp.square(x32 - mean), axes), axis_name) / m
    rstd = lax.rsqrt(var + epsilon)
    y = (x32 - mean) * (rstd * scale.astype(jnp.float32)) + bias.astype(jnp.float32)
    return y, mean, var, rstd


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm_train_synced(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, axis_name):
    """`batch_norm_train` over the whole batch of the devices of a pmap / shard_map axis: each device holds its
    slice x ``[..., C]`` and gets ``(y, mean, var)`` with the global batch statistics (per-channel sums all-reduced
    with ``lax.psum``).

    The backward pass is the closed form with the global sums ``sum(dy)`` and ``sum(dy * xhat)`` all-reduced; it
    returns this device's own contributions to ``dscale`` and ``dbias`` (the step averages gradients over the
    devices), i.e. the derivatives of the sum of every device's loss, as automatic differentiation of the psum'd
    forward pass under pmap gives.
    """
    y, mean, var, _ = _synced_forward(x, scale, bias, epsilon, axis_name)
    return y, mean, var


def _synced_fwd(x, scale, bias, epsilon, axis_name):
    x, scale, bias = x.value, scale.value, bias.value
    y, mean, var, rstd = _synced_forward(x, scale, bias, epsilon, axis_name)
    return (y, mean, var), (x, mean, rstd, scale, bias)


def _synced_bwd(epsilon, axis_name, residuals, cotangents):
    x, mean, rstd, scale, bias = residuals
    dy, dmean, dvar = cotangents
    axes = _reduction_axes(x)
    x32 = x.astype(jnp.float32)
    if isinstance(dy, SymbolicZero):
        dy = jnp.zeros(x.shape, jnp.float32)
    xhat = (x32 - mean) * rstd
    m = lax.psum(x32.size // x32.shape[-1], axis_name)
    dbias, dscale = jnp.sum(dy, axes), jnp.sum(dy * xhat, axes)
    total_dbias, total_dscale = lax.psum((dbias, dscale), axis_name)
    dx = (scale.astype(jnp.float32) * rstd) * (dy - total_dbias / m - xhat * (total_dscale / m))
    # The statistics' own cotangents (symbolic zeros in training, where they only feed the running averages: no
    # collective), summed over the devices since every device's mean and var depend on every device's x.
    if not isinstance(dmean, SymbolicZero):
        dx = dx + lax.psum(dmean, axis_name) / m
    if not isinstance(dvar, SymbolicZero):
        dx = dx + lax.psum(dvar, axis_name) * (2.0 / m) * (x32 - mean)
    return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(bias.dtype)


batch_norm_train_synced.defvjp(_synced_fwd, _synced_bwd, symbolic_zeros=True)


def batch_norm_act_train(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, relu: bool,
                         use_native: bool = True, dtype=jnp.float32, residual: jax.Array | None = None):
    """`batch_norm_train`, plus `residual` (when given), then ``jax.nn.relu`` when `relu`, then y cast to `dtype`:
    ``(y, mean, var)`` as that composition gives.

    On the CPU backend, with `use_native`, for float32 operands, or a bfloat16 x (float32 scale and bias) with
    ``dtype=bfloat16``, both passes (the residual's add, the ReLU and its mask in the backward pass included) run
    in jaxcnn's native kernels (`jaxcnn.backends.cpu.kernels.norm_forward`), split over XLA's thread pool; a
    residual must then have x's shape and dtype. Elsewhere, and with ``use_native=False`` (for a layer a pool
    follows: XLA fuses the normalisation, the ReLU and the pool, which beat a separate kernel and pool), this is
    the composition itself.
    """
    geometry = None
    if use_native and (residual is None or (residual.shape == x.shape and residual.dtype == x.dtype)):
        geometry = kernels.norm_usable(x.shape, (x.dtype, scale.dtype, bias.dtype), relu=relu, epsilon=epsilon,
                                       bfloat16_output=np.dtype(dtype) == jnp.bfloat16)
    if geometry is not None:
        y, mean, var = _batch_norm_native(x, scale, bias, residual, geometry)
        return y.astype(dtype), mean, var
    y, mean, var = batch_norm_train(x, scale, bias, epsilon)
    if residual is not None:
        y = y + residual.astype(jnp.float32)
    return (jax.nn.relu(y) if relu else y).astype(dtype), mean, var


__all__ = ["batch_norm_act_max_pool_train", "batch_norm_act_train", "batch_norm_train", "batch_norm_train_synced"]
