"""BatchNorm with a hand-written VJP: flax's `nn.BatchNorm` mathematics and variables, a cheaper backward pass.

`jaxcnn.nn.layers.make_norm('batch')` builds this module. In training the layer normalises with the batch's
per-channel mean and (two-pass, biased) variance, computed in float32, and moves the running statistics like
flax; evaluation uses the running statistics. Automatic differentiation of that forward pass walks back through
the mean and the variance separately; the hand-written backward pass needs two per-channel sums and one
elementwise pass:

    xhat = (x - mean) * rstd,  dbias = sum(dy),  dscale = sum(dy * xhat)
    dx = scale * rstd * (dy - dbias / M - xhat * dscale / M)          (M = N * H * W values per channel)

which ran 25% faster than flax's on CIFAR ResNet shapes on 2 CPU cores (benchmarks/README.md). Under pmap /
shard_map (a BatchNorm ``axis_name``) `make_norm` keeps flax's BatchNorm, which averages the statistics over the
devices; under jit with a sharded batch this layer's sums are global already.

Variables are named as flax's (``params: scale, bias``; ``batch_stats: mean, var``), so checkpoints and
parameter trees are interchangeable.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Dtype = Any


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


def _bn_bwd(epsilon, residuals, cotangents):
    x, mean, rstd, scale, bias = residuals
    dy, dmean, dvar = cotangents
    axes = _reduction_axes(x)
    m = x.size // x.shape[-1]
    x32 = x.astype(jnp.float32)
    xhat = (x32 - mean) * rstd
    dbias = jnp.sum(dy, axes)
    dscale = jnp.sum(dy * xhat, axes)
    dx = (scale.astype(jnp.float32) * rstd) * (dy - dbias / m - xhat * (dscale / m))
    # The batch statistics are outputs too (for the running averages); their cotangents are normally zero.
    dx = dx + dmean / m + dvar * (2.0 / m) * (x32 - mean)
    return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(bias.dtype)


batch_norm_train.defvjp(_bn_fwd, _bn_bwd)


class BatchNorm(nn.Module):
    """Batch normalisation over ``(N, H, W)`` per channel (the last axis) for x: ``[N, ..., C]``.

    Fields mean what they mean for flax's ``nn.BatchNorm`` (``use_fast_variance=False``,
    ``force_float32_reductions=True``): ``momentum`` 0.9 is PyTorch's 0.1; ``dtype`` is the output dtype
    (None: promote the input and parameter dtypes); statistics are float32.
    """

    use_running_average: bool = False
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    scale_init: Callable[..., jax.Array] = nn.initializers.ones
    bias_init: Callable[..., jax.Array] = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        scale = self.param("scale", self.scale_init, (c,), self.param_dtype)
        bias = self.param("bias", self.bias_init, (c,), self.param_dtype)
        if self.use_running_average:
            mean, var = ra_mean.value, ra_var.value
            y = (x.astype(jnp.float32) - mean) * (lax.rsqrt(var + self.epsilon) * scale.astype(jnp.float32))
            y = y + bias.astype(jnp.float32)
        else:
            y, mean, var = batch_norm_train(x, scale, bias, self.epsilon)
            if not self.is_initializing():
                mean, var = lax.stop_gradient(mean), lax.stop_gradient(var)
                ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
                ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        out_dtype = self.dtype if self.dtype is not None else jnp.promote_types(x.dtype, self.param_dtype)
        return y.astype(out_dtype)
