"""Max pooling over non-overlapping windows with a hand-written VJP; the same mathematics as XLA's.

`jaxcnn.backends.max_pool` (what `jaxcnn.nn.functional.max_pool` calls) runs `max_pool_tiled` when the windows tile
the input (strides equal to the window, no padding), which is what LeNet, VGG and most CIFAR networks use. XLA
differentiates ``lax.reduce_window(max)`` with a select-and-scatter, which its CPU backend expands into index arrays
and a scatter (a third of a LeNet-5 train step on 2 cores). Here the forward pass is a reshape and a max over the
window axes, and the backward pass gives each window's gradient to the element XLA's select-and-scatter picks:
scanning the window row by row, the first element, replaced by each later one that the current choice is not ``>=``
to. That is the first maximum for ordinary numbers, and the same choice as XLA around NaN and -inf.

On the CPU, float32 windows run in jaxcnn's own kernels (`kernels.max_pool_forward` / `max_pool_backward`,
``csrc/max_pool.cc``): one pass forward writing the max and the choice, one pass backward, AVX-512 on XLA's thread
pool. XLA's loop fusions read the input twice forward (the max, then the choice) and, with few channels in the
minor dimension (LeNet-5's 6), ran unvectorised. Same values and the same choice; elsewhere (and for functions
exported for a GPU, through `lax.platform_dependent`) the XLA formulation below runs.

x: ``[N, H, W, C]`` -> ``[N, H // kh, W // kw, C]``; rows and columns beyond the last whole window are dropped
(as 'valid' pooling does) and get zero gradient.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxcnn.backends.cpu import kernels
from jaxcnn.backends.cpu.materialize import materialized


def tiles(window: tuple[int, int], strides: tuple[int, int], padding: tuple[tuple[int, int], tuple[int, int]]) -> bool:
    """True when pooling windows of this geometry tile the input: strides == window and no padding."""
    return tuple(window) == tuple(strides) and all(p == 0 for side in padding for p in side)


def _windows(x: jax.Array, window: tuple[int, int]) -> jax.Array:
    """x [N, H, W, C] -> [N, Ho, kh, Wo, kw, C] (the whole windows only)."""
    kh, kw = window
    n, h, w, c = x.shape
    ho, wo = h // kh, w // kw
    return x[:, : ho * kh, : wo * kw, :].reshape(n, ho, kh, wo, kw, c)


def _pool(x: jax.Array, window: tuple[int, int]) -> jax.Array:
    return jnp.max(_windows(x, window), axis=(2, 4))


def _choice_dtype(window: tuple[int, int]) -> jnp.dtype:
    return jnp.dtype(jnp.int8 if window[0] * window[1] <= 127 else jnp.int32)


def _pool_and_choice(x: jax.Array, window: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
    """(max over each window [N, Ho, Wo, C], the position XLA's select-and-scatter picks: int8 [N, Ho, Wo, C]
    (int32 for windows of more than 127 elements)).

    XLA's select-and-scatter with `ge`: start with the first element, move to a later one when not current >= it.
    """
    kh, kw = window
    xw = _windows(x, window)
    best = y = xw[:, :, 0, :, 0, :]
    choice = jnp.zeros(best.shape, _choice_dtype(window))
    for k in range(1, kh * kw):
        candidate = xw[:, :, k // kw, :, k % kw, :]
        move = ~(best >= candidate)
        best = jnp.where(move, candidate, best)
        choice = jnp.where(move, jnp.asarray(k, choice.dtype), choice)
        y = jnp.maximum(y, candidate)  # NaN-propagating, as the max reduction; one fusion with the choice
    # `best` differs from the max around NaN: it is the element XLA's gradient picks, not the output.
    return y, choice


def _scatter(g: jax.Array, choice: jax.Array, x_hw: tuple[int, int], window: tuple[int, int]) -> jax.Array:
    """Each window's gradient g ``[N, Ho, Wo, C]`` at the element `choice` names; dx ``[N, H, W, C]``."""
    kh, kw = window
    position = jnp.arange(kh * kw, dtype=choice.dtype).reshape(1, 1, kh, 1, kw, 1)  # row-major index in the window
    chosen = choice[:, :, None, :, None, :] == position
    dxw = jnp.where(chosen, g[:, :, None, :, None, :], jnp.zeros((), g.dtype))  # [N, Ho, kh, Wo, kw, C]
    n, ho, wo, c = g.shape
    dx = dxw.reshape(n, ho * kh, wo * kw, c)
    h, w = x_hw
    return jnp.pad(dx, ((0, 0), (0, h - ho * kh), (0, w - wo * kw), (0, 0)))


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _native_scatter(g, choice, x_hw, window):
    """`_scatter` in the native kernel. It is linear in g, and its tangent is `_scatter` of g's tangent (XLA
    operations, which JAX can transpose), so forward mode and second derivatives work."""
    n, _, _, c = g.shape
    return kernels.max_pool_backward(g, choice, (n, *x_hw, c), window)


@_native_scatter.defjvp
def _native_scatter_jvp(x_hw, window, primals, tangents):
    g, choice = primals
    return _native_scatter(g, choice, x_hw, window), _scatter(tangents[0], choice, x_hw, window)


def _gather(x: jax.Array, choice: jax.Array, window: tuple[int, int]) -> jax.Array:
    """The element `choice` names in each window of x ``[N, H, W, C]``: ``[N, Ho, Wo, C]`` (`_scatter`'s
    transpose)."""
    kh, kw = window
    xw = _windows(x, window)
    out = jnp.zeros(choice.shape, x.dtype)
    for k in range(kh * kw):
        out = jnp.where(choice == k, xw[:, :, k // kw, :, k % kw, :], out)
    return out


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _native_pool_and_choice(x, window):
    """`_pool_and_choice` in the native kernel; y's tangent is x's tangent at the chosen element (XLA operations),
    as for `lax.reduce_window`'s max, so forward mode and second derivatives work."""
    return kernels.max_pool_forward(x, window)


@_native_pool_and_choice.defjvp
def _native_pool_and_choice_jvp(window, primals, tangents):
    y, choice = _native_pool_and_choice(primals[0], window)
    return (y, choice), (_gather(tangents[0], choice, window), np.zeros(choice.shape, jax.dtypes.float0))


def _pool_and_choice_on_platform(x: jax.Array, window: tuple[int, int], native: bool):
    """`_pool_and_choice`, in the native kernel on the CPU when `native`."""
    if not native:
        return _pool_and_choice(x, window)
    return lax.platform_dependent(x, cpu=lambda x: _native_pool_and_choice(x, window),
                                  default=lambda x: _pool_and_choice(x, window))


def _scatter_on_platform(g, choice, x_hw, window, native: bool):
    if not native:
        return _scatter(g, choice, x_hw, window)
    return lax.platform_dependent(g, choice, cpu=lambda g, c: _native_scatter(g, c, x_hw, window),
                                  default=lambda g, c: _scatter(g, c, x_hw, window))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _max_pool_tiled(x: jax.Array, window: tuple[int, int], native: bool) -> jax.Array:
    return _pool(x, window)


def _fwd(x, window, native):
    # The choice is made once per window here and kept (1 byte per output), instead of being recomputed in the
    # backward pass, where XLA fused it into the per-input-element loop (4x the work for 2x2 windows) and, with
    # few channels (LeNet-5's 6) in the minor dimension, ran it unvectorised: 2.75 ms of an 11.7 ms LeNet-5 step.
    y, choice = _pool_and_choice_on_platform(x, window, native)
    if not native:  # the native kernel's output is a custom call's: nothing for XLA to fuse into the backward pass
        choice = materialized(choice, x.reshape(-1)[0])
    # x's height and width travel as the shape of an empty array (residuals must be arrays; it costs nothing).
    return y, (choice, jnp.zeros((0, *x.shape[1:3]), jnp.int8))


def _bwd(window, native, residuals, g):
    choice, hw = residuals
    return (_scatter_on_platform(g, choice, hw.shape[1:], window, native),)


_max_pool_tiled.defvjp(_fwd, _bwd)


def max_pool_tiled(x: jax.Array, window: tuple[int, int]) -> jax.Array:
    """Max over each non-overlapping ``kh x kw`` window. x: ``[N, H, W, C]`` -> ``[N, H // kh, W // kw, C]``.

    Integer inputs take the plain reduction (they have no gradient).
    """
    window = (int(window[0]), int(window[1]))
    if not jnp.issubdtype(x.dtype, jnp.floating):
        return _pool(x, window)
    native = x.ndim == 4 and kernels.pool_usable(tuple(x.shape), x.dtype, window)
    return _max_pool_tiled(x, window, native)


__all__ = ["max_pool_tiled", "tiles"]
