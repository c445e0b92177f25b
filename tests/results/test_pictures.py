"""jaxcnn.analysis.pictures: fixed filters through a conv layer (against a NumPy loop), filter and feature pictures."""

import numpy as np
import pytest
from PIL import Image

from jaxcnn.analysis.pictures import (
    first_conv_kernel,
    fixed_filter_responses,
    save_feature_maps,
    save_filters,
    save_fixed_filter_responses,
)
from reference_numpy import np_conv2d


def _valid_png(path):
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.verify()
    with Image.open(path) as im:
        return im.size


def _gaussian_np(size, sigma):
    r = np.arange(size) - (size - 1) / 2
    g = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * sigma**2))
    return g / g.sum()


def test_fixed_filters_through_the_conv_layer_match_a_numpy_loop():
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, size=(2, 9, 11, 1)).astype(np.float32)
    out = fixed_filter_responses(images, size=5, sigma=1.2)
    sobel_x = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], np.float32)
    lap = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], np.float32)
    refs = {
        "gaussian": np_conv2d(images, _gaussian_np(5, 1.2)[:, :, None, None], padding=((2, 2), (2, 2))),
        "sobel_x": np_conv2d(images, sobel_x[:, :, None, None], padding=((1, 1), (1, 1))),
        "sobel_y": np_conv2d(images, sobel_x.T[:, :, None, None], padding=((1, 1), (1, 1))),
        "laplacian": np_conv2d(images, lap[:, :, None, None], padding=((1, 1), (1, 1))),
    }
    for name, ref in refs.items():
        np.testing.assert_allclose(np.asarray(out[name]), ref[..., 0], rtol=1e-5, atol=1e-3, err_msg=name)
    mag = np.sqrt(refs["sobel_x"] ** 2 + refs["sobel_y"] ** 2)[..., 0]
    np.testing.assert_allclose(np.asarray(out["gradient_magnitude"]), mag, rtol=1e-5, atol=1e-3)


def test_sobel_x_sees_a_vertical_edge_and_sobel_y_does_not():
    img = np.zeros((1, 8, 8, 1), np.float32)
    img[:, :, 4:] = 1.0  # dark left half, bright right half
    out = fixed_filter_responses(img)
    # Away from the zero-padded border, only the columns next to the edge respond, positively (dark → bright).
    assert np.asarray(out["sobel_x"])[0, 2:6, 3:5].min() == pytest.approx(4.0)
    assert np.abs(np.asarray(out["sobel_x"])[0, 2:6, 1:3]).max() == 0.0
    assert np.abs(np.asarray(out["sobel_y"])[0, 2:6, 1:7]).max() == 0.0


def test_first_conv_kernel_is_the_first_four_dimensional_leaf_in_creation_order():
    params = {"block1_conv": {"kernel": np.ones((5, 5, 1, 6)), "bias": np.zeros(6)},
              "block2_conv": {"kernel": np.ones((5, 5, 6, 16))}, "head": {"kernel": np.ones((400, 10))}}
    name, k = first_conv_kernel(params)
    assert name == "block1_conv/kernel" and k.shape == (5, 5, 1, 6)
    with pytest.raises(ValueError, match="no 4-D"):
        first_conv_kernel({"dense": {"kernel": np.ones((3, 4))}})


def test_pictures_are_written_as_png(tmp_path):
    rng = np.random.default_rng(1)
    w, h = _valid_png(save_filters(rng.normal(size=(5, 5, 1, 6)), tmp_path / "filters.png", title="conv1"))
    assert w > 100 and h > 50
    _valid_png(save_filters(rng.normal(size=(3, 3, 3, 16)), tmp_path / "rgb_filters.png"))
    images = rng.uniform(size=(3, 28, 28, 1))
    feats = {"block1": rng.normal(size=(3, 14, 14, 6)), "block2": rng.normal(size=(3, 5, 5, 16)),
             "logits": rng.normal(size=(3, 10))}
    _valid_png(save_feature_maps(images, feats, tmp_path / "features.png", max_channels=4))
    _valid_png(save_fixed_filter_responses(images, tmp_path / "sub" / "fixed.png"))
    with pytest.raises(ValueError, match="no 4-D feature maps"):
        save_feature_maps(images, {"logits": feats["logits"]}, tmp_path / "x.png")
