"""From-scratch NumPy convolution and pooling, written with plain loops as a course would: pad, then for each
output pixel sum (or max) over the window. Slow and obvious on purpose: the tests compare jaxcnn against it.

Shapes: x ``[N, H, W, C]``, kernels ``[KH, KW, Cin / groups, Cout]``. Padding is per side:
``((top, bottom), (left, right))``. Everything is computed in float64.
"""

from __future__ import annotations

import math

import numpy as np


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow's 'SAME' rule for one axis: output ceil(size / stride), the extra cell after."""
    extent = dilation * (kernel - 1) + 1
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + extent - size, 0)
    return total // 2, total - total // 2


def pad(x: np.ndarray, padding, value: float = 0.0) -> np.ndarray:
    """Pad height and width of x [N, H, W, C] with ``value``."""
    (t, b), (l, r) = padding
    n, h, w, c = x.shape
    out = np.full((n, h + t + b, w + l + r, c), value, dtype=np.float64)
    out[:, t : t + h, l : l + w, :] = x
    return out


def np_conv2d(x, w, stride=1, padding=((0, 0), (0, 0)), dilation=1, groups=1) -> np.ndarray:
    """Cross-correlation: y[n, i, j, o] = sum_{a, b, c} xpad[n, i*sh + a*dh, j*sw + b*dw, g*cin_g + c] w[a, b, c, o]."""
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    sh, sw = _pair(stride)
    dh, dw = _pair(dilation)
    kh, kw, cin_g, cout = w.shape
    cout_g = cout // groups
    xp = pad(x, padding)
    n, hp, wp, _ = xp.shape
    out_h = (hp - (dh * (kh - 1) + 1)) // sh + 1
    out_w = (wp - (dw * (kw - 1) + 1)) // sw + 1
    y = np.zeros((n, out_h, out_w, cout))
    for b in range(n):
        for i in range(out_h):
            for j in range(out_w):
                for o in range(cout):
                    g = o // cout_g
                    total = 0.0
                    for a in range(kh):
                        for q in range(kw):
                            for c in range(cin_g):
                                total += xp[b, i * sh + a * dh, j * sw + q * dw, g * cin_g + c] * w[a, q, c, o]
                    y[b, i, j, o] = total
    return y


def _windows(x, window, stride, padding, value):
    """Yield (i, j, patch [N, KH, KW, C]) over the output grid of a pooling op."""
    kh, kw = _pair(window)
    sh, sw = _pair(stride if stride is not None else window)
    xp = pad(x, padding, value)
    out_h = (xp.shape[1] - kh) // sh + 1
    out_w = (xp.shape[2] - kw) // sw + 1
    for i in range(out_h):
        for j in range(out_w):
            yield i, j, out_h, out_w, xp[:, i * sh : i * sh + kh, j * sw : j * sw + kw, :]


def _pool(x, window, stride, padding, value, reduce):
    x = np.asarray(x, np.float64)
    y = None
    for i, j, out_h, out_w, patch in _windows(x, window, stride, padding, value):
        if y is None:
            y = np.zeros((x.shape[0], out_h, out_w, x.shape[3]))
        y[:, i, j, :] = reduce(patch, i, j)
    return y


def np_max_pool(x, window, stride=None, padding=((0, 0), (0, 0))) -> np.ndarray:
    """Max over each window; padded cells are -inf."""
    return _pool(x, window, stride, padding, -np.inf, lambda p, i, j: p.max(axis=(1, 2)))


def np_avg_pool(x, window, stride=None, padding=((0, 0), (0, 0)), count_include_pad=True) -> np.ndarray:
    """Mean over each window: divided by KH*KW, or by the number of real (unpadded) cells."""
    kh, kw = _pair(window)
    if count_include_pad:
        return _pool(x, window, stride, padding, 0.0, lambda p, i, j: p.sum(axis=(1, 2)) / (kh * kw))
    # Mark the real cells with a mask padded the same way, and count them per window.
    mask = pad(np.ones((1, *np.shape(x)[1:3], 1)), padding)
    sh, sw = _pair(stride if stride is not None else window)

    def mean_of_real(p, i, j):
        real = mask[0, i * sh : i * sh + kh, j * sw : j * sw + kw, 0].sum()
        return p.sum(axis=(1, 2)) / real

    return _pool(x, window, stride, padding, 0.0, mean_of_real)


def np_l2_pool(x, window, stride=None, padding=((0, 0), (0, 0))) -> np.ndarray:
    """sqrt(sum of squares) over each window; padded cells are 0."""
    return _pool(x, window, stride, padding, 0.0, lambda p, i, j: np.sqrt((p**2).sum(axis=(1, 2))))
