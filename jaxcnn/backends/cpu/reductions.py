"""Per-channel sums over NHWC activations, laid out so that XLA's CPU backend vectorises them, and a bias add
whose gradient uses them.

`channel_sum(x)` sums ``x [..., C]`` over every axis but the last. XLA's CPU reductions (its own and YNNPACK's)
run such a column sum over ``[N·H·W, C]`` slowly when C is small: each row is only C floats, narrower than a
vector register for LeNet-5's 6 or ResNet's 16 channels. Summing ``[N·H·W / k, k·C]`` rows first (a free
reshape; k copies of each channel side by side in a row of about 64-128 floats) and then the k partial sums
gives the same sum in another order, 1.5-10x faster here (128×32×32×16: 233 → 105 µs; 256×28×28×16: 335 →
179 µs; benchmarks/README.md).

`add_bias(y, bias)`: ``y + bias`` over the last axis, with ``channel_sum`` as the bias gradient.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

ROW = 128  # target width in floats of the rows the first pass sums


def _fold(inner: int, channels: int) -> int:
    """The k in [1, ROW // channels] that divides `inner`, largest first (1 when channels >= ROW / 2)."""
    for k in range(max(ROW // max(channels, 1), 1), 1, -1):
        if inner % k == 0:
            return k
    return 1


def channel_sum(x: jax.Array) -> jax.Array:
    """Sum of ``x [N, ..., C]`` over all axes but the last -> ``[C]``.

    The rows are folded within each example (k divides the product of the middle axes), never across the
    leading axis: with the batch sharded over devices the reshape stays local and the sum is XLA's usual
    cross-device reduction.
    """
    axes = tuple(range(x.ndim - 1))
    if x.ndim < 3:
        return jnp.sum(x, axis=axes)
    n, c = x.shape[0], x.shape[-1]
    inner = math.prod(x.shape[1:-1])
    k = _fold(inner, c)
    if k == 1:
        return jnp.sum(x, axis=axes)
    partial = jnp.sum(x.reshape(n, inner // k, k * c), axis=(0, 1))
    return jnp.sum(partial.reshape(k, c), axis=0)


@jax.custom_vjp
def add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
    """``y [..., C] + bias [C]``; the bias gradient is `channel_sum` of the output gradient."""
    return y + bias


def _add_bias_fwd(y, bias):
    return y + bias, (jnp.zeros((0,), y.dtype), jnp.zeros((0,), bias.dtype))  # the dtypes, as residuals must be arrays


def _add_bias_bwd(residuals, g):
    y_like, bias_like = residuals
    return g.astype(y_like.dtype), channel_sum(g).astype(bias_like.dtype).reshape(g.shape[-1:])


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


__all__ = ["add_bias", "channel_sum"]
