"""jaxcnn.nn.filters: the fixed kernels and running them channel by channel."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from jaxcnn.nn import filters
from reference_numpy import np_conv2d


@pytest.mark.parametrize("size, sigma", [(3, 0.8), (5, 1.0), (7, 2.5), (4, 1.0)])
def test_gaussian_kernel_sums_to_one_is_symmetric_and_peaks_in_the_middle(size, sigma):
    k = np.asarray(filters.gaussian_kernel(size, sigma), np.float64)
    assert k.shape == (size, size)
    assert abs(k.sum() - 1) < 1e-6
    np.testing.assert_allclose(k, k.T, atol=1e-7)
    np.testing.assert_allclose(k, k[::-1, ::-1], atol=1e-7)
    centre = (size - 1) / 2
    expected = np.array([[math.exp(-((i - centre) ** 2 + (j - centre) ** 2) / (2 * sigma**2)) for j in range(size)]
                         for i in range(size)])
    np.testing.assert_allclose(k, expected / expected.sum(), rtol=1e-5)
    assert k.max() == k[size // 2, size // 2] or size % 2 == 0


def test_fixed_kernels():
    np.testing.assert_array_equal(np.asarray(filters.sobel_x()), [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]])
    np.testing.assert_array_equal(np.asarray(filters.sobel_y()), [[-1, -2, -1], [0, 0, 0], [1, 2, 1]])
    assert float(filters.laplacian().sum()) == 0
    np.testing.assert_allclose(np.asarray(filters.box(3)), np.full((3, 3), 1 / 9))
    with pytest.raises(ValueError, match="sigma must be positive"):
        filters.gaussian_kernel(3, 0.0)
    with pytest.raises(ValueError, match="size must be a positive int"):
        filters.box(0)


def test_sobel_on_a_vertical_step_edge_responds_only_in_x():
    image = np.zeros((1, 8, 10, 1), np.float32)
    image[:, :, 5:, :] = 1.0  # dark left half, bright right half: a vertical edge between columns 4 and 5
    gx = np.asarray(filters.apply_filter(image, filters.sobel_x(), padding="valid"))[0, :, :, 0]
    gy = np.asarray(filters.apply_filter(image, filters.sobel_y(), padding="valid"))[0, :, :, 0]
    np.testing.assert_array_equal(gy, 0)
    # Valid output column j covers input columns j..j+2: the edge is seen at j = 3 and 4, positive (dark -> bright).
    np.testing.assert_array_equal(gx[:, [3, 4]], 4)
    np.testing.assert_array_equal(np.delete(gx, [3, 4], axis=1), 0)


def test_laplacian_ignores_linear_ramps():
    ramp = np.add.outer(np.arange(6.0), 2 * np.arange(7.0)).astype(np.float32)[None, :, :, None]
    np.testing.assert_allclose(np.asarray(filters.apply_filter(ramp, filters.laplacian(), "valid")), 0, atol=1e-5)


def test_apply_filter_runs_on_each_channel_like_the_reference():
    x = np.random.default_rng(0).standard_normal((2, 6, 7, 3)).astype(np.float32)
    k = filters.gaussian_kernel(3, 1.0)
    y = np.asarray(filters.apply_filter(x, k))
    assert y.shape == x.shape
    for c in range(3):
        ref = np_conv2d(x[..., c : c + 1], np.asarray(k)[:, :, None, None], 1, ((1, 1), (1, 1)))
        np.testing.assert_allclose(y[..., c : c + 1], ref, rtol=1e-5, atol=1e-5)
    # Integer images (uint8 pixels) are converted to float; a box blur of a constant image is the constant inside.
    const = np.full((1, 5, 5, 1), 200, np.uint8)
    np.testing.assert_allclose(np.asarray(filters.apply_filter(const, filters.box(3), "valid")), 200, rtol=1e-6)
    with pytest.raises(ValueError, match=r"expected a 2-D filter \[KH, KW\]"):
        filters.apply_filter(x, jnp.ones((3, 3, 1)))
    with pytest.raises(ValueError, match=r"expected images of shape \[N, H, W, C\], got \(6, 7\)"):
        filters.apply_filter(x[0, :, :, 0], k)


def test_filters_demo_writes_a_png_from_real_digits(tmp_path):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "examples" / "filters_demo.py"
    spec = importlib.util.spec_from_file_location("filters_demo", script)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    if not Path(demo.DEFAULT_IMAGES).exists():
        pytest.skip(f"{demo.DEFAULT_IMAGES} not present")
    images = demo.read_idx_images(demo.DEFAULT_IMAGES, 2)
    assert images.shape == (2, 28, 28) and images.dtype == np.uint8 and images.max() > 200
    out = demo.main(["--count", "2", "--out", str(tmp_path / "demo.png")])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
