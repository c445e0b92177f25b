"""The convolution and pooling primitives: pure functions on NHWC arrays, kernels HWIO.

Every convolution in jaxcnn goes through `conv2d` (layers, fixed filters, models), and every max pool through
`max_pool`. Each validates its arguments, works out the geometry and calls the `lax` operation through
`jaxcnn.backends`, which gives the same values and may run them faster; see docs/architecture.md.

Padding is given the same way everywhere (convolution and pooling):

- ``'valid'``: no padding.
- ``'same'``: XLA/TensorFlow/flax ``'SAME'``: the output has ``ceil(size / stride)`` cells. The total padding
  ``max((out - 1) * stride + k_eff - size, 0)`` is split with the smaller half before and the larger half after
  (``lo = total // 2``). For stride 1 that is ``k_eff - 1`` in total whatever the input size, and the output has
  the input's size; for stride > 1 the split depends on the input size, so resolving it needs ``input_size``.
- ``'full'``: ``k_eff - 1`` on each side (every placement that overlaps the input at least one cell).
- an int ``p``: ``p`` on every side; a pair ``(ph, pw)``: ``ph`` top and bottom, ``pw`` left and right;
  per-side pairs ``((top, bottom), (left, right))``.

``k_eff = dilation * (kernel - 1) + 1`` is the extent of a dilated kernel. The output size along one axis is
``floor((size + lo + hi - k_eff) / stride) + 1`` (`conv_output_size`).
"""

from __future__ import annotations

import functools
import operator
import warnings
from typing import Any, Callable, Literal, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxcnn import backends

PaddingMode = Literal["valid", "same", "full"]
# One axis: a mode, an int for both sides, or (lo, hi).
AxisPadding = Union[PaddingMode, int, tuple[int, int]]
# Two axes: a mode, an int, (ph, pw), or ((top, bottom), (left, right)).
Padding = Union[PaddingMode, int, tuple[int, int], tuple[tuple[int, int], tuple[int, int]], Sequence]
IntPair = Union[int, tuple[int, int]]
Dtype = Any

PADDING_MODES = ("valid", "same", "full")
_CONV_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


# ---------------------------------------------------------------------------------------------------------
# Sizes and padding
# ---------------------------------------------------------------------------------------------------------


def _as_int(value) -> int | None:
    """value as a Python int when it is an integer (Python or NumPy, not bool), else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _int_pair(value) -> tuple[int, int] | None:
    """An int -> (v, v); a pair of ints -> (h, w); anything else -> None."""
    if _as_int(value) is not None:
        return (_as_int(value), _as_int(value))
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        h, w = _as_int(value[0]), _as_int(value[1])
        if h is not None and w is not None:
            return (h, w)
    return None


def _pair(value: IntPair, what: str) -> tuple[int, int]:
    """An int or a pair of ints -> (h, w), each a positive int."""
    pair = _int_pair(value)
    if pair is None:
        raise ValueError(f"{what} must be an int or a pair of ints (h, w), got {value!r}")
    if min(pair) < 1:
        raise ValueError(f"{what} must be at least 1, got {value!r}")
    return pair


def deprecated_keywords(**renames: str) -> Callable[[Callable], Callable]:
    """Lets a function take the old names of renamed keyword arguments, with a DeprecationWarning naming the new
    one (``@deprecated_keywords(window="window_shape")``)."""
    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            for old, new in renames.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{fn.__name__}() got {old}= and {new}=, two names of one argument; "
                                        f"pass {new}=")
                    warnings.warn(f"{fn.__name__}(): {old}= is a deprecated name of {new}=; pass {new}=",
                                  DeprecationWarning, stacklevel=2)
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        return call

    return wrap


def effective_kernel_size(kernel: int, dilation: int = 1) -> int:
    """The extent of a dilated kernel along one axis: ``dilation * (kernel - 1) + 1``."""
    return dilation * (kernel - 1) + 1


def _axis_padding(
    padding: AxisPadding, kernel: int, dilation: int, stride: int, input_size: int | None
) -> tuple[int, int]:
    """Resolve the padding of one axis to (lo, hi)."""
    k_eff = effective_kernel_size(kernel, dilation)
    if isinstance(padding, str):
        mode = padding.lower()
        if mode == "valid":
            return (0, 0)
        if mode == "full":
            return (k_eff - 1, k_eff - 1)
        if mode == "same":
            if stride == 1:
                total = k_eff - 1
            elif input_size is None:
                raise ValueError(
                    f"'same' padding with stride {stride} depends on the input size; pass input_size "
                    "(or use stride 1, or explicit padding)"
                )
            else:
                out = -(-input_size // stride)
                total = max((out - 1) * stride + k_eff - input_size, 0)
            return (total // 2, total - total // 2)
        raise ValueError(f"unknown padding mode {padding!r}; use one of {PADDING_MODES}, an int or pairs")
    pair = _int_pair(padding)
    if pair is None:
        raise ValueError(f"padding of one axis must be a mode, an int or (lo, hi), got {padding!r}")
    lo, hi = pair
    if lo < 0 or hi < 0:
        raise ValueError(f"padding must not be negative, got {padding!r}")
    return (lo, hi)


def resolve_padding(
    padding: Padding,
    kernel_size: IntPair,
    dilation: IntPair = 1,
    *,
    strides: IntPair = 1,
    input_size: IntPair | None = None,
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Padding of a 2-D window as ``((top, bottom), (left, right))``.

    Args:
      padding: ``'valid'``, ``'same'``, ``'full'``, an int, ``(ph, pw)`` or ``((top, bottom), (left, right))``
        (see the module docstring for what each mode means).
      kernel_size: window size, an int or ``(kh, kw)``.
      dilation: kernel dilation, an int or a pair.
      strides: only needed for ``'same'`` with stride > 1 (XLA 'SAME' semantics), then with ``input_size``.
      input_size: ``(H, W)`` of the input, only needed for ``'same'`` with stride > 1.
    """
    kh, kw = _pair(kernel_size, "kernel_size")
    dh, dw = _pair(dilation, "dilation")
    sh, sw = _pair(strides, "strides")
    ih, iw = (None, None) if input_size is None else _pair(input_size, "input_size")
    if isinstance(padding, str) or _as_int(padding) is not None:
        per_axis: tuple = (padding, padding)
    elif isinstance(padding, Sequence) and len(padding) == 2:
        per_axis = tuple(padding)
    else:
        raise ValueError(
            f"padding must be one of {PADDING_MODES}, an int, (ph, pw) or ((top, bottom), (left, right)); "
            f"got {padding!r}"
        )
    return (_axis_padding(per_axis[0], kh, dh, sh, ih), _axis_padding(per_axis[1], kw, dw, sw, iw))


@deprecated_keywords(kernel="kernel_size", stride="strides")
def conv_output_size(
    size: int, kernel_size: int, strides: int = 1, padding: AxisPadding = 0, dilation: int = 1
) -> int:
    """Output size along one axis: ``floor((size + lo + hi - dilation * (kernel_size - 1) - 1) / strides) + 1``.

    For dilation 1 and symmetric padding P that is the familiar ``floor((size + 2P - kernel_size) / strides) + 1``.
    ``strides`` and ``padding`` are those of one axis (an int; a mode or ``(lo, hi)`` for the padding). Raises
    ValueError when the (dilated) kernel does not fit in the padded input.
    """
    for name, value in (("size", size), ("kernel_size", kernel_size), ("strides", strides), ("dilation", dilation)):
        if _as_int(value) is None or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    size, kernel, stride, dilation = (operator.index(v) for v in (size, kernel_size, strides, dilation))
    lo, hi = _axis_padding(padding, kernel, dilation, stride, size)
    k_eff = effective_kernel_size(kernel, dilation)
    padded = size + lo + hi
    if k_eff > padded:
        raise ValueError(
            f"kernel {kernel} with dilation {dilation} (extent {k_eff}) is larger than the padded input "
            f"{padded} (size {size} + padding {lo + hi}); use a smaller kernel, more padding or a larger input"
        )
    return (padded - k_eff) // stride + 1


# ---------------------------------------------------------------------------------------------------------
# Convolution
# ---------------------------------------------------------------------------------------------------------


def _check_nhwc(x: jax.Array, what: str = "x") -> None:
    if getattr(x, "ndim", None) != 4:
        raise ValueError(
            f"expected {what} of shape [N, H, W, C], got {tuple(jnp.shape(x))}; add the missing axes "
            "(e.g. x[None, ..., None] for one grey image)"
        )


def _window_output_hw(
    x_shape: Sequence[int],
    window: tuple[int, int],
    strides: tuple[int, int],
    pads: tuple[tuple[int, int], tuple[int, int]],
    dilation: tuple[int, int],
    what: str,
) -> tuple[int, int]:
    """(out_h, out_w) of a window op, with an error naming the axis when the window does not fit."""
    out = []
    for axis, size, k, s, (lo, hi), d in zip(("height", "width"), x_shape[1:3], window, strides, pads, dilation):
        try:
            out.append(conv_output_size(int(size), k, s, (lo, hi), d))
        except ValueError as error:
            raise ValueError(f"{what} does not fit the input's {axis} (input shape {tuple(x_shape)}): {error}") \
                from None
    return out[0], out[1]


def conv2d(
    x: jax.Array,
    kernel: jax.Array,
    *,
    strides: IntPair = 1,
    padding: Padding = "valid",
    dilation: IntPair = 1,
    groups: int = 1,
) -> jax.Array:
    """2-D cross-correlation (what deep learning calls convolution), the one funnel for every conv in jaxcnn.

    ``y[n, i, j, o] = sum_{a, b, c} x_pad[n, i*sh + a*dh, j*sw + b*dw, g*Cin/G + c] * kernel[a, b, c, o]``
    where ``g = o // (Cout / G)`` is the group of output channel ``o``.

    Args:
      x: ``[N, H, W, Cin]``.
      kernel: ``[KH, KW, Cin / groups, Cout]`` (HWIO); ``Cout`` must be divisible by ``groups``.
      strides, dilation: ints or ``(h, w)`` pairs.
      padding: see the module docstring (``'same'`` follows XLA 'SAME' for any stride).
      groups: feature groups; ``groups == Cin`` with ``kernel [KH, KW, 1, Cin * m]`` is a depthwise conv.
    Returns:
      ``[N, H_out, W_out, Cout]`` with ``H_out = conv_output_size(H, KH, sh, (top, bottom), dh)``.
    """
    _check_nhwc(x)
    if getattr(kernel, "ndim", None) != 4:
        raise ValueError(f"expected kernel of shape [KH, KW, Cin / groups, Cout], got {tuple(jnp.shape(kernel))}")
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    cin, (kh, kw, kin, cout) = x.shape[-1], kernel.shape
    if cin % groups:
        raise ValueError(f"input channels {cin} are not divisible by groups={groups} (x shape {tuple(x.shape)})")
    if cout % groups:
        raise ValueError(f"output channels {cout} are not divisible by groups={groups} (kernel {tuple(kernel.shape)})")
    if kin * groups != cin:
        raise ValueError(
            f"kernel {tuple(kernel.shape)} expects {kin * groups} input channels ({kin} per group x {groups} "
            f"groups) but x has {cin} (x shape {tuple(x.shape)}); the kernel's third axis must be Cin / groups"
        )
    strides_hw, dilation_hw = _pair(strides, "strides"), _pair(dilation, "dilation")
    pads = resolve_padding(padding, (kh, kw), dilation_hw, strides=strides_hw, input_size=tuple(x.shape[1:3]))
    _window_output_hw(x.shape, (kh, kw), strides_hw, pads, dilation_hw, f"conv kernel {kh}x{kw}")
    return backends.conv_general_dilated(
        x, kernel, window_strides=strides_hw, padding=pads, rhs_dilation=dilation_hw,
        dimension_numbers=_CONV_DIMENSION_NUMBERS, feature_group_count=groups,
    )


def true_conv2d(
    x: jax.Array,
    kernel: jax.Array,
    *,
    strides: IntPair = 1,
    padding: Padding = "valid",
    dilation: IntPair = 1,
    groups: int = 1,
) -> jax.Array:
    """The mathematical convolution ``sum x[i - a, j - b] k[a, b]``: `conv2d` with the kernel turned 180°.

    Same arguments and shapes as `conv2d`. With ``'full'``/``'valid'`` padding it equals
    ``scipy.signal.convolve2d(..., mode='full'/'valid')`` per channel; with ``'same'`` and odd kernels too.
    """
    return conv2d(x, kernel[::-1, ::-1], strides=strides, padding=padding, dilation=dilation, groups=groups)


# ---------------------------------------------------------------------------------------------------------
# Pooling
# ---------------------------------------------------------------------------------------------------------


def _pool_geometry(
    x: jax.Array, window_shape: IntPair, strides: IntPair | None, padding: Padding, kind: str
) -> tuple[tuple[int, int], tuple[int, int], tuple[tuple[int, int], tuple[int, int]]]:
    """Validated (window_shape, strides, pads) of a pooling op on x: [N, H, W, C]."""
    _check_nhwc(x)
    window_hw = _pair(window_shape, "window_shape")
    strides_hw = window_hw if strides is None else _pair(strides, "strides")
    pads = resolve_padding(padding, window_hw, strides=strides_hw, input_size=tuple(x.shape[1:3]))
    for (lo, hi), k in zip(pads, window_hw):
        # A window lying wholly in the padding would pool nothing (max -> -inf, average -> 0).
        if lo >= k or hi >= k:
            raise ValueError(
                f"{kind} pooling padding {pads} is too large for window {window_hw}: each side must be smaller "
                "than the window so every window covers at least one input cell"
            )
    _window_output_hw(x.shape, window_hw, strides_hw, pads, (1, 1), f"{kind} pooling window {window_hw}")
    return window_hw, strides_hw, pads


def _reduce_window(x, init, op, window_hw, strides_hw, pads):
    return lax.reduce_window(
        x, init, op, (1, *window_hw, 1), (1, *strides_hw, 1), ((0, 0), *pads, (0, 0))
    )


def _sum_dtypes(x: jax.Array) -> tuple[Dtype, jax.Array]:
    """(output dtype, x to sum in): half-precision inputs are summed in float32 and the result cast back;
    integer inputs give float32."""
    out_dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
    return out_dtype, x.astype(jnp.promote_types(out_dtype, jnp.float32))


@deprecated_keywords(window="window_shape")
def max_pool(
    x: jax.Array, window_shape: IntPair, strides: IntPair | None = None, padding: Padding = "valid"
) -> jax.Array:
    """Max over each window. x: ``[N, H, W, C]`` -> ``[N, H_out, W_out, C]``; ``strides`` default to ``window_shape``.

    Padded cells hold -inf (the lowest value for integer inputs), so they never win.
    """
    window_hw, strides_hw, pads = _pool_geometry(x, window_shape, strides, padding, "max")
    return backends.max_pool(x, window_hw, strides_hw, pads)  # lax.reduce_window(x, -inf, lax.max, ...)


@deprecated_keywords(window="window_shape")
def avg_pool(
    x: jax.Array,
    window_shape: IntPair,
    strides: IntPair | None = None,
    padding: Padding = "valid",
    count_include_pad: bool = True,
) -> jax.Array:
    """Mean over each window. x: ``[N, H, W, C]`` -> ``[N, H_out, W_out, C]``; ``strides`` default to ``window_shape``.

    Padded cells hold 0. ``count_include_pad=True`` divides every window's sum by the full window size
    ``KH * KW`` (PyTorch's default: border averages are pulled towards 0); ``False`` divides by the number of
    real input cells in the window (TensorFlow/flax 'SAME' average pooling). Sums are taken in at least float32.
    """
    window_hw, strides_hw, pads = _pool_geometry(x, window_shape, strides, padding, "average")
    out_dtype, acc = _sum_dtypes(x)
    zero = np.array(0, acc.dtype)
    sums = _reduce_window(acc, zero, lax.add, window_hw, strides_hw, pads)
    no_padding = all(p == 0 for side in pads for p in side)
    if count_include_pad or no_padding:
        return (sums / (window_hw[0] * window_hw[1])).astype(out_dtype)
    ones = jnp.ones((1, *x.shape[1:3], 1), acc.dtype)
    counts = _reduce_window(ones, zero, lax.add, window_hw, strides_hw, pads)
    return (sums / counts).astype(out_dtype)


@deprecated_keywords(window="window_shape")
def l2_pool(
    x: jax.Array, window_shape: IntPair, strides: IntPair | None = None, padding: Padding = "valid"
) -> jax.Array:
    """Square root of the sum of squares over each window (padded cells are 0; all-zero windows get gradient 0).

    x: ``[N, H, W, C]`` -> ``[N, H_out, W_out, C]``; ``strides`` default to ``window_shape``.
    """
    window_hw, strides_hw, pads = _pool_geometry(x, window_shape, strides, padding, "L2")
    out_dtype, acc = _sum_dtypes(x)
    sums = _reduce_window(jnp.square(acc), np.array(0, acc.dtype), lax.add, window_hw, strides_hw, pads)
    # sqrt has an infinite slope at 0: an all-zero window (after a ReLU, or in the padding) would give NaN
    # gradients. The double `where` gives such windows the value 0 and the gradient 0 instead.
    positive = sums > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sums, 1)), 0).astype(out_dtype)


def global_avg_pool(x: jax.Array) -> jax.Array:
    """Mean over height and width: ``[N, H, W, C]`` -> ``[N, C]``."""
    _check_nhwc(x)
    return jnp.mean(x, axis=(1, 2))


def global_max_pool(x: jax.Array) -> jax.Array:
    """Max over height and width: ``[N, H, W, C]`` -> ``[N, C]``."""
    _check_nhwc(x)
    return jnp.max(x, axis=(1, 2))


# ---------------------------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------------------------


def batch_norm(
    x: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    *,
    mean: jax.Array | None = None,
    var: jax.Array | None = None,
    epsilon: float = 1e-5,
    relu: bool = False,
    pool_follows: bool = False,
    axis_name: str | None = None,
    dtype: Any = jnp.float32,
    residual: jax.Array | None = None,
    x_bias: jax.Array | None = None,
    max_pool_window: IntPair | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Batch normalisation per channel (the last axis): ``y = (x - mean) / sqrt(var + epsilon) * scale + bias``.

    x: ``[N, ..., C]``; scale, bias: ``[C]``. Without ``mean`` and ``var`` (training) the statistics are the
    batch's, over every axis but the last: the mean and the biased variance ``mean((x - mean)**2)``, in float32.
    With them (evaluation: the running statistics) those are used. ``residual`` (x's shape) is added to y, and
    ``relu=True`` returns ``relu(y + residual)``: a post-activation residual block's last norm, sum and ReLU, which
    the backend runs as one kernel.
    ``pool_follows`` changes no values (see `jaxcnn.nn.make_norm`). ``axis_name`` (a pmap / shard_map axis, training
    only): x is this device's slice and the statistics are the whole batch's. y is computed in float32 and returned in
    ``dtype`` (a bfloat16 model asks for bfloat16, which lets the CPU backend run the whole layer in bfloat16).

    ``x_bias`` ``[C]`` (the bias of the conv before the norm) normalises ``x + x_bias`` without adding it to every
    value: a per-channel constant moves the batch mean by itself and leaves the variance, so in training
    ``BatchNorm(x + x_bias) = BatchNorm(x)`` and the batch mean returned is ``mean(x) + x_bias``; with running
    statistics ``x + x_bias - mean = x - (mean - x_bias)``. Its gradient through y is therefore exactly zero in
    training (it reaches the bias only through the batch mean), as for the sum it stands for. The same values to
    float32 rounding as normalising ``x + x_bias``, without writing and re-reading the sum (and summing its
    gradient): 10% of a VGG-BN training step on the CPU.

    ``max_pool_window`` (kh x kw) then max-pools y over non-overlapping windows (`max_pool` with its default
    strides): y is ``[N, H // kh, W // kw, C]``. In training on the CPU, float32 BatchNorm, ReLU and pool are then
    one kernel each way, which never writes the full-size normalised map (a VGG stage's end).

    Returns ``(y [N, ..., C] in dtype, mean [C], var [C])``: the output and the statistics it was normalised with
    (`jaxcnn.nn.BatchNorm` moves its running statistics towards them).
    """
    if getattr(x, "ndim", 0) < 2:
        raise ValueError(f"batch_norm: expected x of shape [N, ..., C], got {tuple(jnp.shape(x))}")
    c = x.shape[-1]
    for name, value in (("scale", scale), ("bias", bias), ("mean", mean), ("var", var), ("x_bias", x_bias)):
        if value is not None and tuple(jnp.shape(value)) != (c,):
            raise ValueError(f"batch_norm: {name} must have shape ({c},) for x of shape {tuple(x.shape)}, "
                             f"got {tuple(jnp.shape(value))}")
    if residual is not None and tuple(jnp.shape(residual)) != tuple(x.shape):
        raise ValueError(f"batch_norm: residual must have x's shape {tuple(x.shape)}, got {tuple(jnp.shape(residual))}")
    if (mean is None) != (var is None):
        raise ValueError("batch_norm: give both mean and var (evaluation) or neither (batch statistics)")
    window = None
    if max_pool_window is not None:
        if x.ndim != 4:
            raise ValueError(f"batch_norm: max_pool_window needs x of shape [N, H, W, C], got {tuple(x.shape)}")
        window = _pair(max_pool_window, "max_pool_window")
        if min(window) < 1 or window[0] > x.shape[1] or window[1] > x.shape[2]:
            raise ValueError(f"batch_norm: max_pool_window {window} must be at least 1 and fit x's "
                             f"{x.shape[1]}x{x.shape[2]} map (x of shape {tuple(x.shape)})")
    if mean is None:
        y, mean, var = backends.batch_norm(x, scale, bias, epsilon=epsilon, relu=relu, pool_follows=pool_follows,
                                           axis_name=axis_name, dtype=dtype, residual=residual, pool_window=window)
        if x_bias is not None:
            mean = mean + x_bias.astype(jnp.float32)
        return y, mean, var
    mean, var = jnp.asarray(mean, jnp.float32), jnp.asarray(var, jnp.float32)
    centre = mean if x_bias is None else mean - x_bias.astype(jnp.float32)
    y = (x.astype(jnp.float32) - centre) * (lax.rsqrt(var + epsilon) * scale.astype(jnp.float32))
    y = y + bias.astype(jnp.float32)
    if residual is not None:
        y = y + residual.astype(jnp.float32)
    y = (jax.nn.relu(y) if relu else y).astype(dtype)
    return (y if window is None else max_pool(y, window)), mean, var


# ---------------------------------------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------------------------------------


def fan_out(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(x, x)``: x for the two paths that read it (a residual block's branch and its shortcut). In reverse-mode
    differentiation x's gradient is the sum of the two paths' gradients, as for any reused value; the CPU backend
    adds them in one native call (the same bits as XLA's add, faster).
    """
    return backends.fan_out(x)


__all__ = [
    "PADDING_MODES",
    "Padding",
    "avg_pool",
    "batch_norm",
    "conv2d",
    "conv_output_size",
    "effective_kernel_size",
    "fan_out",
    "global_avg_pool",
    "global_max_pool",
    "l2_pool",
    "max_pool",
    "resolve_padding",
    "true_conv2d",
]
