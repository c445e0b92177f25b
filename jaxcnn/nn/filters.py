"""Fixed (hand-designed) image filters, run as depthwise convolutions through `functional.conv2d`.

The kernels are cross-correlation kernels ``[K, K]``, like every kernel in jaxcnn: ``sobel_x`` responds
positively where intensity increases to the right.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxcnn.nn import functional as F


def gaussian_kernel(size: int, sigma: float) -> jax.Array:
    """``[size, size]`` samples of a 2-D Gaussian centred on the middle cell, normalised to sum to 1."""
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma!r}")
    offsets = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(offsets**2) / (2.0 * sigma**2))
    kernel = np.outer(g, g)
    return jnp.asarray(kernel / kernel.sum(), jnp.float32)


def sobel_x() -> jax.Array:
    """``[3, 3]`` Sobel derivative along x (width): positive for intensity increasing to the right."""
    return jnp.array([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], jnp.float32)


def sobel_y() -> jax.Array:
    """``[3, 3]`` Sobel derivative along y (height): positive for intensity increasing downwards."""
    return sobel_x().T


def laplacian() -> jax.Array:
    """``[3, 3]`` 4-neighbour Laplacian (sums to 0: no response on constant or linear ramps)."""
    return jnp.array([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], jnp.float32)


def box(size: int) -> jax.Array:
    """``[size, size]`` mean filter (every weight ``1 / size**2``)."""
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    return jnp.full((size, size), 1.0 / (size * size), jnp.float32)


def apply_filter(images: jax.Array, kernel2d: jax.Array, padding: F.Padding = "same") -> jax.Array:
    """Run one 2-D filter on every channel separately (a depthwise conv with ``groups = C``).

    images: ``[N, H, W, C]`` (integers are converted to float32); kernel2d: ``[KH, KW]``.
    Returns ``[N, H_out, W_out, C]`` (``H_out = H`` for ``'same'``), zero padding at the borders.
    """
    kernel2d = jnp.asarray(kernel2d)
    if kernel2d.ndim != 2:
        raise ValueError(f"expected a 2-D filter [KH, KW], got shape {tuple(kernel2d.shape)}")
    images = jnp.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"expected images of shape [N, H, W, C], got {tuple(images.shape)}")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        images = images.astype(jnp.float32)
    c = images.shape[-1]
    kernel = jnp.broadcast_to(kernel2d.astype(images.dtype)[:, :, None, None], (*kernel2d.shape, 1, c))
    return F.conv2d(images, kernel, padding=padding, groups=c)


__all__ = ["apply_filter", "box", "gaussian_kernel", "laplacian", "sobel_x", "sobel_y"]
