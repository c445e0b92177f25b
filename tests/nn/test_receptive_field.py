"""jaxcnn.analysis.receptive_field against hand-computed and published values, and against gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcnn.analysis.receptive_field import receptive_field_of_layers
from jaxcnn.nn import functional as F


def _conv(name, k=3, s=1, d=1, p=1):
    return (name, k, s, d, p)


def test_three_3x3_convs_see_7x7():
    rows = receptive_field_of_layers([_conv("c1"), _conv("c2"), _conv("c3")])
    assert [r["size"] for r in rows] == [3, 5, 7]
    assert [r["jump"] for r in rows] == [1, 1, 1]
    assert [r["start"] for r in rows] == [0, 0, 0]  # 'same' padding keeps the first cell centred on pixel 0
    assert [r["name"] for r in rows] == ["c1", "c2", "c3"]


def test_vgg16_receptive_field_is_212_at_pool5():
    layers = []
    for stage, convs in enumerate([2, 2, 3, 3, 3], start=1):
        layers += [_conv(f"conv{stage}_{i}") for i in range(1, convs + 1)]
        layers.append((f"pool{stage}", 2, 2, 1, 0))
    rows = {r["name"]: r for r in receptive_field_of_layers(layers)}
    # By hand: 3, 5, pool 6 (jump 2), 10, 14, pool 16 (jump 4), 24, 32, 40, pool 44 (jump 8), 60, 76, 92,
    # pool 100 (jump 16), 132, 164, 196, pool 212 (jump 32).
    assert [rows[n]["size"] for n in ("conv1_2", "pool1", "pool2", "pool3", "pool4", "conv5_3", "pool5")] == \
        [5, 6, 16, 44, 100, 196, 212]
    assert rows["pool5"]["jump"] == 32
    assert rows["pool5"]["start"] == 15.5  # the first 2x2 pooling windows are centred between pixels


def test_alexnet_receptive_field_is_195():
    layers = [("conv1", 11, 4, 1, 0), ("pool1", 3, 2, 1, 0), ("conv2", 5, 1, 1, 2), ("pool2", 3, 2, 1, 0),
              ("conv3", 3, 1, 1, 1), ("conv4", 3, 1, 1, 1), ("conv5", 3, 1, 1, 1), ("pool5", 3, 2, 1, 0)]
    sizes = [r["size"] for r in receptive_field_of_layers(layers)]
    assert sizes == [11, 19, 51, 67, 99, 131, 163, 195]


def test_dilated_stack_grows_exponentially():
    # Yu & Koltun (2016): 3x3 convs with dilation 1, 2, 4 see 3, 7, 15.
    rows = receptive_field_of_layers([_conv("a", d=1), _conv("b", d=2, p=2), _conv("c", d=4, p=4)])
    assert [r["size"] for r in rows] == [3, 7, 15]


def test_non_square_layers_give_pairs():
    rows = receptive_field_of_layers([("a", (3, 1), 1, 1, (1, 0)), ("b", 3, (2, 1), 1, 0)])
    assert rows[-1]["size"] == (5, 3) and rows[-1]["jump"] == (2, 1) and rows[-1]["start"] == (1.0, 1.0)


def test_bad_specs():
    with pytest.raises(ValueError, match="each layer must be"):
        receptive_field_of_layers([("a", 3, 1)])
    with pytest.raises(ValueError, match="layer 'a': stride must be an int >= 1"):
        receptive_field_of_layers([("a", 3, 0, 1, 0)])


def test_size_and_start_agree_with_the_gradient_of_a_real_stack():
    """The input pixels that influence the first output cell, found by differentiation, are the predicted ones."""
    spec = [("c1", 3, 1, 1, 1), ("p1", 2, 2, 1, 0), ("c2", 3, 2, 2, 2), ("c3", 5, 1, 1, 0)]

    def net(x):
        x = F.conv2d(x, jnp.ones((3, 3, 1, 1)), padding=1)
        x = F.avg_pool(x, 2)
        x = F.conv2d(x, jnp.ones((3, 3, 1, 1)), strides=2, padding=2, dilation=2)
        return F.conv2d(x, jnp.ones((5, 5, 1, 1)), padding=0)

    size = 64
    x = jnp.ones((1, size, size, 1))
    out = net(x)
    assert out.shape == (1, 12, 12, 1)  # 64 -> 64 -> 32 -> 16 -> 12
    row, col = 3, 4  # output cells whose fields lie inside the image (centres 20.5 and 24.5, size 28)
    grad = jax.grad(lambda x: net(x)[0, row, col, 0])(x)[0, :, :, 0]
    rows_hit, cols_hit = np.nonzero(np.asarray(grad))
    rf = receptive_field_of_layers(spec)[-1]
    assert (rf["size"], rf["jump"], rf["start"]) == (28, 4, 8.5)  # by hand
    assert rows_hit.max() - rows_hit.min() + 1 == rf["size"]
    assert cols_hit.max() - cols_hit.min() + 1 == rf["size"]
    # Centre of the field of output cell (row, col) = start + index * jump.
    assert (rows_hit.max() + rows_hit.min()) / 2 == rf["start"] + row * rf["jump"]
    assert (cols_hit.max() + cols_hit.min()) / 2 == rf["start"] + col * rf["jump"]
