"""2-D convolution with a hand-written VJP that XLA's CPU backend runs faster; the same mathematics.

`jaxcnn.backends.conv_general_dilated` (which `jaxcnn.nn.functional.conv2d`, the funnel every jaxcnn convolution
goes through, calls) runs `conv2d` here, so every layer and model gets it by default. Forward, input gradient and
filter gradient are the same XLA convolutions JAX's automatic differentiation of `lax.conv_general_dilated` emits;
what changes is how their operands reach them, and the filter gradient of grouped and depthwise convolutions:

- **The filter gradient reads a stored activation.** The filter gradient is a convolution whose contraction runs
  over the batch, so XLA feeds it the input transposed to ``[C, H, W, N]``. Left alone, XLA recomputes the
  input's producer (BatchNorm's affine map and the ReLU) inside that transpose, which turns a fast blocked copy
  into a strided loop several times slower (in a CIFAR ResNet-20 step those transposes took a third of the time
  on 2 CPU cores). Here the forward pass routes the input through `materialized`, an identity that XLA cannot fuse
  across, so the transpose copies the activation the forward pass already wrote.
- **Grouped and depthwise filter gradients** (jax-ml/jax#13800, jax-ml/jax#23713): XLA expands ``batch_group_count``
  convolutions into a dense convolution ``groups`` times larger. Depthwise convolutions (one input channel per
  group) get their filter gradient here as ``KH * KW`` fused multiply-reductions over ``(N, H_out, W_out)``;
  other grouped convolutions as one dense filter gradient per group.
- **Two shapes XLA's CPU convolution handles badly** get another formulation of the same sums: dense
  convolutions of inputs smaller than the kernel (2x2 maps under a 3x3 kernel in the last VGG stages on 32x32
  images ran at 3 GFLOP/s) become one matrix product over explicit patches (`_conv_patches`, forward and both
  gradients), and the forward pass of one-channel inputs (the first layer of MNIST-sized nets) becomes
  ``KH * KW`` fused broadcast multiply-adds (`_conv_one_channel`).

Shapes follow `jaxcnn.nn.functional.conv2d`: ``x: [N, H, W, Cin]``, ``kernel: [KH, KW, Cin / groups, Cout]`` (HWIO),
output ``[N, H_out, W_out, Cout]``. The function composes with `jax.jit`, `jax.vmap`, `jax.grad` and
higher-order derivatives (the backward pass is made of differentiable JAX operations).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

from jaxcnn.backends.cpu import kernels
from jaxcnn.backends.cpu.materialize import materialized

DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")
Pairs = tuple[tuple[int, int], tuple[int, int]]


def _smaller_than_kernel(x_shape: Sequence[int], kernel_shape: Sequence[int], dilation: tuple[int, int]) -> bool:
    """True when the unpadded input is smaller than the (dilated) kernel along H or W (e.g. 2x2 maps, 3x3 kernel)."""
    kh, kw = kernel_shape[0], kernel_shape[1]
    return x_shape[1] < (kh - 1) * dilation[0] + 1 or x_shape[2] < (kw - 1) * dilation[1] + 1


def _out_size(size: int, pad: tuple[int, int], k: int, stride: int, dil: int) -> int:
    """Output length along one axis: floor((size + pads - dilated kernel) / stride) + 1."""
    return (size + pad[0] + pad[1] - (k - 1) * dil - 1) // stride + 1


def _window(xp: jax.Array, a: int, b: int, out_hw: tuple[int, int], strides: tuple[int, int],
            dilation: tuple[int, int]) -> jax.Array:
    """The input values kernel tap (a, b) meets: xp (padded) [N, Hp, Wp, C] -> [N, Ho, Wo, C]."""
    (ho, wo), (sh, sw), (dh, dw) = out_hw, strides, dilation
    n, _, _, c = xp.shape
    return lax.slice(xp, (0, a * dh, b * dw, 0), (n, a * dh + (ho - 1) * sh + 1, b * dw + (wo - 1) * sw + 1, c),
                     (1, sh, sw, 1))


def _taps(size: int, pad: tuple[int, int], k: int, stride: int, dil: int) -> tuple[int, list[int]]:
    """(output size, the kernel offsets along one axis whose window rows touch the input, not only padding)."""
    out = _out_size(size, pad, k, stride, dil)
    live = [a for a in range(k) if any(pad[0] <= a * dil + i * stride < pad[0] + size for i in range(out))]
    return out, live


def _conv_patches(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: Pairs,
                  dilation: tuple[int, int]) -> jax.Array:
    """Dense convolution as one matrix product over explicit patches: [N, Ho, Wo, T * Cin] @ [T * Cin, Cout].

    For inputs smaller than the kernel (the last stages of VGG on 32x32 images: 2x2 maps, 3x3 kernels), where
    XLA's CPU convolution runs at about 3 GFLOP/s against 150-250 for the same layer at 4x4 (benchmarks/README.md).
    T counts the kernel taps whose windows touch the input; taps that only ever read zero padding add nothing and
    are left out. The patches are small because the maps are.
    """
    n, h, w, _ = x.shape
    cout = kernel.shape[3]
    ho, rows = _taps(h, padding[0], kernel.shape[0], strides[0], dilation[0])
    wo, cols = _taps(w, padding[1], kernel.shape[1], strides[1], dilation[1])
    xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
    patches, weights = [], []
    for a in rows:
        for b in cols:
            patches.append(_window(xp, a, b, (ho, wo), strides, dilation))
            weights.append(kernel[a, b])
    if not patches:  # every window reads padding only
        return jnp.zeros((n, ho, wo, cout), jnp.result_type(x, kernel))
    lhs = jnp.concatenate(patches, axis=3)  # [N, Ho, Wo, T * Cin], tap-major like `rhs`
    rhs = jnp.concatenate(weights, axis=0)  # [T * Cin, Cout]
    return lax.dot_general(lhs, rhs, (((3,), (0,)), ((), ())))


def _conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: Pairs, dilation: tuple[int, int],
          groups: int) -> jax.Array:
    """The plain XLA convolution: x [N, H, W, Cin] * kernel [KH, KW, Cin / G, Cout] -> [N, Ho, Wo, Cout].

    Dense convolutions of inputs smaller than the kernel go through `_conv_patches` (same sums, one dot).
    """
    if groups == 1 and _smaller_than_kernel(x.shape, kernel.shape, dilation):
        return _conv_patches(x, kernel, strides, padding, dilation)
    return lax.conv_general_dilated(
        x, kernel, window_strides=strides, padding=padding, rhs_dilation=dilation,
        dimension_numbers=DIMENSION_NUMBERS, feature_group_count=groups,
    )


def _conv_one_channel(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: Pairs,
                      dilation: tuple[int, int]) -> jax.Array:
    """Forward convolution of a one-channel input (groups 1): ``sum over taps of window(x) * kernel[a, b, 0, :]``.

    x: [N, H, W, 1], kernel: [KH, KW, 1, Cout] -> [N, Ho, Wo, Cout]. XLA fuses the KH * KW broadcast multiply-adds
    into one loop, which ran 3-20x faster than its CPU convolution for the first layer of MNIST-sized nets
    (28x28x1 -> 6..32 channels, 3x3 and 5x5 kernels; benchmarks/README.md). The result is materialised
    (`materialized`) so that consumers read it instead of recomputing the sum.
    """
    _, h, w, _ = x.shape
    kh, kw, _, _ = kernel.shape
    out_hw = (_out_size(h, padding[0], kh, strides[0], dilation[0]),
              _out_size(w, padding[1], kw, strides[1], dilation[1]))
    dtype = jnp.result_type(x, kernel)
    acc = jnp.promote_types(dtype, jnp.float32)  # bfloat16 / float16 products are summed in float32
    xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0))).astype(acc)
    weights = kernel.astype(acc)
    out = None
    for a in range(kh):
        for b in range(kw):
            term = _window(xp, a, b, out_hw, strides, dilation) * weights[a, b, 0]
            out = term if out is None else out + term
    # Materialised: left fusible, XLA recomputes the whole sum inside each consumer (the max-pool gradient read it
    # four times per window: LeNet-5's step ran 1.7x slower).
    return materialized(out.astype(dtype), kernel.reshape(-1)[0])


def _conv_forward(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: Pairs,
                  dilation: tuple[int, int], groups: int) -> jax.Array:
    """The forward pass: `_conv`, except one-channel inputs (`_conv_one_channel`). Gradients still use `_conv`."""
    if groups == 1 and x.shape[3] == 1 and not _smaller_than_kernel(x.shape, kernel.shape, dilation):
        return _conv_one_channel(x, kernel, strides, padding, dilation)
    return _conv(x, kernel, strides, padding, dilation, groups)


def _depthwise_filter_grad(x: jax.Array, dy: jax.Array, kernel_shape: Sequence[int], strides: tuple[int, int],
                           padding: Pairs, dilation: tuple[int, int]) -> jax.Array:
    """Filter gradient of a depthwise convolution (groups == Cin, Cout = Cin * multiplier).

    x: [N, H, W, Cin], dy: [N, Ho, Wo, Cin * m] -> [KH, KW, 1, Cin * m], with
    ``dk[a, b, 0, c * m + j] = sum_{n, i, k} x_pad[n, i * sh + a * dh, k * sw + b * dw, c] * dy[n, i, k, c * m + j]``.
    """
    kh, kw, _, cout = kernel_shape
    n, _, _, cin = x.shape
    _, ho, wo, _ = dy.shape
    m = cout // cin
    xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
    dy = dy.reshape(n, ho, wo, cin, m)
    taps = []
    for a in range(kh):
        for b in range(kw):
            window = _window(xp, a, b, (ho, wo), strides, dilation)
            taps.append(jnp.sum(window[..., None] * dy, axis=(0, 1, 2), dtype=jnp.float32))  # [Cin, m]
    return jnp.stack(taps).reshape(kh, kw, 1, cout).astype(x.dtype)


def _filter_grad(x: jax.Array, dy: jax.Array, kernel_shape: Sequence[int], strides: tuple[int, int],
                 padding: Pairs, dilation: tuple[int, int], groups: int, dtype: jnp.dtype) -> jax.Array:
    """d(loss)/d(kernel) from the input x [N, H, W, Cin] and the output cotangent dy [N, Ho, Wo, Cout]."""
    kh, kw, cin_g, cout = kernel_shape
    probe = jax.ShapeDtypeStruct(tuple(kernel_shape), dtype)
    if groups == 1:
        return jax.linear_transpose(lambda k: _conv(x, k, strides, padding, dilation, 1), probe)(dy)[0]
    if cin_g == 1:
        return _depthwise_filter_grad(x, dy, kernel_shape, strides, padding, dilation).astype(dtype)
    # General groups: one dense filter gradient per group, concatenated along the output channels.
    cout_g = cout // groups
    group_probe = jax.ShapeDtypeStruct((kh, kw, cin_g, cout_g), dtype)
    parts = []
    for g in range(groups):
        xg = lax.slice_in_dim(x, g * cin_g, (g + 1) * cin_g, axis=3)
        dyg = lax.slice_in_dim(dy, g * cout_g, (g + 1) * cout_g, axis=3)
        parts.append(jax.linear_transpose(lambda k, xg=xg: _conv(xg, k, strides, padding, dilation, 1),
                                          group_probe)(dyg)[0])
    return jnp.concatenate(parts, axis=3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv_fast(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: Pairs,
               dilation: tuple[int, int], groups: int) -> jax.Array:
    return _conv_forward(x, kernel, strides, padding, dilation, groups)


def _conv_fast_fwd(x, kernel, strides, padding, dilation, groups):
    x = materialized(x, kernel.reshape(-1)[0])
    return _conv_forward(x, kernel, strides, padding, dilation, groups), (x, kernel)


def _conv_fast_bwd(strides, padding, dilation, groups, residuals, dy):
    x, kernel = residuals
    dx = jax.linear_transpose(
        lambda v: _conv(v, kernel, strides, padding, dilation, groups), jax.ShapeDtypeStruct(x.shape, x.dtype)
    )(dy)[0]
    dkernel = _filter_grad(x, dy, kernel.shape, strides, padding, dilation, groups, kernel.dtype)
    return dx, dkernel


_conv_fast.defvjp(_conv_fast_fwd, _conv_fast_bwd)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4, 5))
def _one_channel_onednn(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: Pairs,
                        dilation: tuple[int, int], geometry: kernels.Geometry) -> jax.Array:
    """A one-channel input's convolution: the value as `_conv_one_channel`, the derivatives through oneDNN.

    The fused multiply-adds beat oneDNN's forward kernel for one input channel (128x32x32x1 -> 6 channels, 5x5:
    0.67 against 0.77 ms alone; LeNet-5's step 3-9% faster in an in-process A/B). The tangent is oneDNN's
    bilinear convolution, so reverse mode runs oneDNN's filter (and, when needed, input) gradients, and forward
    mode, vmap and higher derivatives work as for every oneDNN convolution. Symbolic zeros: a tangent of an input
    that is not differentiated (the images) costs nothing.
    """
    return _conv_one_channel(x, kernel, strides, padding, dilation)


def _one_channel_onednn_jvp(strides, padding, dilation, geometry, primals, tangents):
    x, kernel = primals
    dx, dkernel = tangents
    y = _one_channel_onednn(x, kernel, strides, padding, dilation, geometry)
    parts = []
    if not isinstance(dx, SymbolicZero):
        parts.append(kernels.conv2d(dx, kernel, geometry))
    if not isinstance(dkernel, SymbolicZero):
        parts.append(kernels.conv2d(x, dkernel, geometry))
    dy = functools.reduce(jnp.add, parts) if parts else jnp.zeros_like(y)
    return y, dy


_one_channel_onednn.defjvp(_one_channel_onednn_jvp, symbolic_zeros=True)


def conv2d(x: jax.Array, kernel: jax.Array, *, strides: tuple[int, int], padding: Pairs,
           dilation: tuple[int, int], groups: int) -> jax.Array:
    """2-D cross-correlation, NHWC / HWIO, with the faster gradients described in the module docstring.

    Args:
      x: ``[N, H, W, Cin]``.
      kernel: ``[KH, KW, Cin / groups, Cout]``.
      strides, dilation: ``(h, w)`` int pairs.
      padding: resolved per-side padding ``((top, bottom), (left, right))``
        (see `jaxcnn.nn.functional.resolve_padding`).
      groups: feature groups (``Cin`` for a depthwise convolution).
    Returns:
      ``[N, H_out, W_out, Cout]``, equal to ``lax.conv_general_dilated`` with the same arguments.
    """
    strides = (int(strides[0]), int(strides[1]))
    dilation = (int(dilation[0]), int(dilation[1]))
    padding = ((int(padding[0][0]), int(padding[0][1])), (int(padding[1][0]), int(padding[1][1])))
    groups = int(groups)
    if x.ndim == 4 and kernel.ndim == 4:
        n, h, w, _ = x.shape
        kh, kw, _, cout = kernel.shape
        y_shape = (n, _out_size(h, padding[0], kh, strides[0], dilation[0]),
                   _out_size(w, padding[1], kw, strides[1], dilation[1]), cout)
        geometry = kernels.Geometry(tuple(x.shape), tuple(kernel.shape), y_shape, strides, padding, dilation, groups,
                                   kernels.threads_per_device())
        if kernels.usable(geometry, x.dtype, kernel.dtype):
            if groups == 1 and x.shape[3] == 1 and not _smaller_than_kernel(x.shape, kernel.shape, dilation):
                return _one_channel_onednn(x, kernel, strides, padding, dilation, geometry)
            return kernels.conv2d(x, kernel, geometry)
    if jnp.bfloat16 in (x.dtype, kernel.dtype) and kernels.enabled() and jax.default_backend() == "cpu":
        kernels.warn_slow_bfloat16(_why_xla_bfloat16(x, kernel))
    return _conv_fast(x, kernel, strides, padding, dilation, groups)


def _why_xla_bfloat16(x: jax.Array, kernel: jax.Array) -> str:
    """Why a bfloat16 convolution on the CPU is not oneDNN's (for the warning `conv2d` gives)."""
    if not kernels.cpu_has_fast_bfloat16():
        return "its convolutions (this CPU has neither AMX nor AVX512-BF16)"
    if not kernels.available():
        return "its convolutions (the native kernels are not built)"
    return (f"the convolution of {x.dtype} {tuple(x.shape)} with a {kernel.dtype} {tuple(kernel.shape)} kernel "
            "(oneDNN has no bfloat16 kernel for it here)")


__all__ = ["DIMENSION_NUMBERS", "conv2d"]
