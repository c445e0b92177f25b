"""Pictures of what a CNN computes: first-layer filters, feature maps, and fixed filters run through a conv layer.

    kernel = first_conv_kernel(variables["params"])[1]          # [KH, KW, Cin, Cout]
    save_filters(kernel, "filters.png")
    save_feature_maps(images, model.apply(variables, x, return_features=True), "features.png")
    save_fixed_filter_responses(images, "fixed_filters.png")    # Gaussian blur, Sobel x/y, gradient magnitude

Images are written as PNG with matplotlib's Agg canvas. Arrays may be JAX or NumPy; every panel is scaled to
its own range for display, with filters shown on a symmetric scale around zero (grey = 0).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from jaxcnn.nn import filters as fixed
from jaxcnn.nn.layers import Conv2d


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _to_display(img: np.ndarray) -> np.ndarray:
    """[H, W] or [H, W, 3] → float in [0, 1] (min-max over the panel; a constant panel becomes 0.5)."""
    img = np.asarray(img, dtype=np.float32)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    lo, hi = float(img.min()), float(img.max())
    return np.full_like(img, 0.5) if hi - lo < 1e-12 else (img - lo) / (hi - lo)


def first_conv_kernel(params: Mapping[str, Any]) -> tuple[str, np.ndarray]:
    """The first 4-D kernel in the parameter tree ('block1_conv/kernel', [KH, KW, Cin, Cout]).

    Flax keeps submodules in the order they were created, so in a model that builds its layers from the input
    up, the first 4-D leaf is the first convolution's kernel.
    """
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if np.ndim(leaf) == 4:
            name = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
            return name, np.asarray(leaf)
    raise ValueError("no 4-D convolution kernel in these parameters: is this a convolutional model?")


def save_filters(kernel: Any, path: str | Path, title: str = "", max_filters: int = 64) -> Path:
    """One panel per output channel of `kernel: [KH, KW, Cin, Cout]`, on a symmetric scale (grey = 0).

    With Cin == 3 a filter is shown in colour (each channel scaled around 0.5); otherwise the filter of input
    channel 0 is shown in grey (first layers of grey-scale models have Cin == 1).
    """
    k = np.asarray(kernel, dtype=np.float32)
    if k.ndim != 4:
        raise ValueError(f"expected a conv kernel [KH, KW, Cin, Cout], got shape {k.shape}")
    n = min(k.shape[-1], max_filters)
    cols = min(n, 8)
    rows = -(-n // cols)
    fig = Figure(figsize=(1.1 * cols, 1.1 * rows + (0.4 if title else 0.0)))
    scale = float(np.abs(k).max()) or 1.0
    for i in range(n):
        ax = fig.add_subplot(rows, cols, i + 1)
        f = k[..., i]
        if f.shape[-1] == 3:
            ax.imshow(np.clip(0.5 + 0.5 * f / scale, 0.0, 1.0), interpolation="nearest")
        else:
            ax.imshow(f[..., 0], cmap="gray", vmin=-scale, vmax=scale, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(str(i), fontsize=7, pad=2)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def save_feature_maps(images: Any, features: Mapping[str, Any], path: str | Path, max_channels: int = 8,
                      title: str = "") -> Path:
    """For each image (a row group), the input and the first `max_channels` channels of each feature map.

    images: [N, H, W, C] (what the model saw, any scale); features: name → [N, h, w, c] (4-D entries only are
    drawn, e.g. the dict a zoo model returns with return_features=True; 'logits'/'pre_logits' are skipped).
    """
    imgs = np.asarray(images)
    maps = {k: np.asarray(v) for k, v in features.items() if np.ndim(v) == 4}
    if not maps:
        raise ValueError(f"no 4-D feature maps among {sorted(features)}; pass features of shape [N, h, w, c]")
    n = imgs.shape[0]
    cols = 1 + max_channels
    rows = n * len(maps)
    fig = Figure(figsize=(1.0 * cols, 1.05 * rows + (0.4 if title else 0.0)))
    for i in range(n):
        for j, (name, fmap) in enumerate(maps.items()):
            r = i * len(maps) + j
            ax = fig.add_subplot(rows, cols, r * cols + 1)
            ax.imshow(_to_display(imgs[i]), cmap="gray", interpolation="nearest")
            ax.set_ylabel(f"{name}\n{fmap.shape[1]}x{fmap.shape[2]}x{fmap.shape[3]}", fontsize=6)
            ax.set_xticks([])
            ax.set_yticks([])
            for c in range(min(max_channels, fmap.shape[-1])):
                ax = fig.add_subplot(rows, cols, r * cols + 2 + c)
                ax.imshow(_to_display(fmap[i, ..., c]), cmap="viridis", interpolation="nearest")
                ax.set_axis_off()
                if r == 0:
                    ax.set_title(f"ch {c}", fontsize=6, pad=2)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


FIXED_FILTER_NAMES = ("gaussian", "sobel_x", "sobel_y", "laplacian")


def fixed_filter_bank(size: int = 5, sigma: float = 1.0) -> jax.Array:
    """The fixed filters as one conv kernel [size, size, 1, 4]: Gaussian(sigma), Sobel x, Sobel y, Laplacian.

    The 3x3 kernels are zero-padded to `size` around their centre, which leaves their responses unchanged.
    """
    if size < 3 or size % 2 == 0:
        raise ValueError(f"size={size}: the filter bank needs an odd size of at least 3 (the Sobel kernels are 3x3)")

    def centred(k: jax.Array) -> jax.Array:
        p = (size - k.shape[0]) // 2
        return jnp.pad(k, ((p, p), (p, p)))

    kernels = [fixed.gaussian_kernel(size, sigma), centred(fixed.sobel_x()), centred(fixed.sobel_y()),
               centred(fixed.laplacian())]
    return jnp.stack(kernels, axis=-1)[:, :, None, :]


def fixed_filter_responses(images: Any, size: int = 5, sigma: float = 1.0) -> dict[str, jax.Array]:
    """Runs the fixed filter bank through a `jaxcnn.nn.layers.Conv2d` whose kernel is set by hand (no bias).

    images: [N, H, W, C] (colour is averaged to grey first). Returns name → [N, H, W] for 'gaussian',
    'sobel_x', 'sobel_y', 'laplacian', plus 'gradient_magnitude' = sqrt(sobel_x² + sobel_y²). 'same' zero
    padding, so the borders respond to the jump from the image to zero.
    """
    x = jnp.asarray(images, jnp.float32)
    if x.ndim != 4:
        raise ValueError(f"expected images [N, H, W, C], got shape {tuple(x.shape)}")
    x = x.mean(axis=-1, keepdims=True)
    layer = Conv2d(features=len(FIXED_FILTER_NAMES), kernel_size=size, padding="same", use_bias=False)
    y = layer.apply({"params": {"kernel": fixed_filter_bank(size, sigma)}}, x)
    out = {name: y[..., i] for i, name in enumerate(FIXED_FILTER_NAMES)}
    out["gradient_magnitude"] = jnp.sqrt(out["sobel_x"] ** 2 + out["sobel_y"] ** 2)
    return out


def save_fixed_filter_responses(images: Any, path: str | Path, size: int = 5, sigma: float = 1.0,
                                title: str = "") -> Path:
    """Rows: images; columns: the image, then each fixed filter's response (see fixed_filter_responses)."""
    imgs = np.asarray(images)
    responses = {k: np.asarray(v) for k, v in fixed_filter_responses(imgs, size, sigma).items()}
    cols = 1 + len(responses)
    fig = Figure(figsize=(1.3 * cols, 1.35 * imgs.shape[0] + (0.4 if title else 0.0)))
    for i in range(imgs.shape[0]):
        panels: Sequence[tuple[str, np.ndarray, str]] = [("image", imgs[i], "gray")] + [
            (name, r[i], "gray" if name in ("gaussian", "gradient_magnitude") else "RdBu_r")
            for name, r in responses.items()
        ]
        for j, (name, img, cmap) in enumerate(panels):
            ax = fig.add_subplot(imgs.shape[0], cols, i * cols + j + 1)
            if cmap == "RdBu_r":  # signed responses: white = 0
                m = float(np.abs(img).max()) or 1.0
                ax.imshow(img, cmap=cmap, vmin=-m, vmax=m, interpolation="nearest")
            else:
                ax.imshow(_to_display(img), cmap=cmap, interpolation="nearest")
            ax.set_axis_off()
            if i == 0:
                ax.set_title(name.replace("_", " "), fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


__all__ = ["first_conv_kernel", "fixed_filter_bank", "fixed_filter_responses", "save_feature_maps", "save_filters",
           "save_fixed_filter_responses"]
