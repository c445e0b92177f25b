"""jaxcnn.nn.functional against the from-scratch NumPy loops in tests/reference_numpy.py."""

import itertools
import math

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.signal
from hypothesis import given, settings

from jaxcnn.nn import functional as F
from reference_numpy import np_avg_pool, np_conv2d, np_l2_pool, np_max_pool, same_padding

# Paddings as the API takes them, and a function giving the per-side padding the reference needs, written out
# independently from the definitions (valid: none; same: TF's rule; full: extent - 1 each side).
PADDINGS = {
    "valid": lambda k, s, d, size: ((0, 0), (0, 0)),
    "same": lambda k, s, d, size: tuple(same_padding(size[a], k[a], s[a], d[a]) for a in range(2)),
    "full": lambda k, s, d, size: tuple((d[a] * (k[a] - 1),) * 2 for a in range(2)),
    1: lambda k, s, d, size: ((1, 1), (1, 1)),
    (2, 0): lambda k, s, d, size: ((2, 2), (0, 0)),
    ((0, 2), (1, 0)): lambda k, s, d, size: ((0, 2), (1, 0)),
}


def _rand(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def _out_size(size, lo, hi, k, s, d):
    """The textbook rule, written out here rather than taken from the code under test."""
    return math.floor((size + lo + hi - d * (k - 1) - 1) / s) + 1


def _check_conv(x, w, stride, padding, dilation, groups):
    k, s, d = w.shape[:2], (stride, stride), (dilation, dilation)
    per_side = PADDINGS[padding](k, s, d, x.shape[1:3])
    fits = all(_out_size(x.shape[1 + a], *per_side[a], k[a], s[a], d[a]) >= 1 for a in range(2))
    if not fits:
        with pytest.raises(ValueError, match="larger than the padded input"):
            F.conv2d(x, w, strides=stride, padding=padding, dilation=dilation, groups=groups)
        return
    y = F.conv2d(jnp.asarray(x), jnp.asarray(w), strides=stride, padding=padding, dilation=dilation, groups=groups)
    ref = np_conv2d(x, w, stride, per_side, dilation, groups)
    assert y.shape == ref.shape, (padding, stride, dilation, groups, w.shape)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("padding", list(PADDINGS), ids=str)
@pytest.mark.parametrize("stride", [1, 2, 3])
def test_conv2d_matches_numpy_loops_groups_1(padding, stride):
    rng = np.random.default_rng(0)
    x = _rand(rng, 2, 7, 9, 3)  # non-square input
    for (kh, kw), dilation in itertools.product([(1, 1), (3, 3), (5, 5), (3, 2)], [1, 2]):
        _check_conv(x, _rand(rng, kh, kw, 3, 4), stride, padding, dilation, groups=1)


@pytest.mark.parametrize("padding", ["valid", "same", ((0, 2), (1, 0))], ids=str)
@pytest.mark.parametrize("stride", [1, 2])
def test_conv2d_grouped_and_depthwise_match_numpy_loops(padding, stride):
    rng = np.random.default_rng(1)
    x = _rand(rng, 1, 6, 8, 4)
    for (kh, kw), dilation in itertools.product([(1, 1), (3, 3), (2, 3)], [1, 2]):
        _check_conv(x, _rand(rng, kh, kw, 2, 6), stride, padding, dilation, groups=2)
        # Depthwise: one input channel per group, here with a channel multiplier of 2.
        _check_conv(x, _rand(rng, kh, kw, 1, 8), stride, padding, dilation, groups=4)


def test_conv2d_non_square_strides_and_dilation():
    rng = np.random.default_rng(2)
    x, w = _rand(rng, 1, 9, 8, 2), _rand(rng, 3, 2, 2, 3)
    y = F.conv2d(x, w, strides=(2, 1), padding=((1, 0), (0, 2)), dilation=(1, 2))
    ref = np_conv2d(x, w, (2, 1), ((1, 0), (0, 2)), (1, 2))
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-4, atol=1e-4)


def test_conv2d_with_same_padding_keeps_size_for_stride_1_and_gives_ceil_for_stride_2():
    x = jnp.ones((1, 7, 10, 1))
    for k in (1, 2, 3, 4, 5):
        assert F.conv2d(x, jnp.ones((k, k, 1, 1)), padding="same").shape == (1, 7, 10, 1)
        assert F.conv2d(x, jnp.ones((k, k, 1, 1)), padding="same", strides=2).shape == (1, 4, 5, 1)


# --------------------------------------------------------------------------------------------------------
# Output size and padding
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size, kernel, stride, padding, dilation, expected",
    [
        (28, 5, 1, 0, 1, 24),  # LeNet-5 C1
        (32, 3, 1, 1, 1, 32),  # VGG / ResNet 3x3 'same'
        (224, 7, 2, 3, 1, 112),  # ResNet stem
        (227, 11, 4, 0, 1, 55),  # AlexNet conv1
        (13, 3, 2, 0, 1, 6),  # AlexNet pool5
        (10, 3, 1, 0, 2, 6),  # dilation 2: extent 5
        (5, 3, 2, "same", 1, 3),
        (5, 3, 1, "full", 1, 7),
        (5, 3, 1, (2, 0), 1, 5),
        (1, 1, 5, "valid", 1, 1),
    ],
)
def test_conv_output_size_known_values(size, kernel, stride, padding, dilation, expected):
    assert F.conv_output_size(size, kernel, stride, padding, dilation) == expected


@settings(max_examples=150, deadline=None)
@given(
    size=st.integers(1, 40),
    kernel=st.integers(1, 7),
    stride=st.integers(1, 5),
    dilation=st.integers(1, 3),
    lo=st.integers(0, 4),
    hi=st.integers(0, 4),
    mode=st.sampled_from(["explicit", "valid", "same", "full"]),
)
def test_conv_output_size_is_the_rule_and_the_actual_shape(size, kernel, stride, dilation, lo, hi, mode):
    k_eff = dilation * (kernel - 1) + 1
    if mode == "valid":
        lo = hi = 0
    elif mode == "full":
        lo = hi = k_eff - 1
    elif mode == "same":
        lo, hi = same_padding(size, kernel, stride, dilation)
    padding = (lo, hi) if mode == "explicit" else mode
    expected = _out_size(size, lo, hi, kernel, stride, dilation)
    if expected < 1:
        with pytest.raises(ValueError, match="larger than the padded input"):
            F.conv_output_size(size, kernel, stride, padding, dilation)
        return
    assert F.conv_output_size(size, kernel, stride, padding, dilation) == expected
    if mode == "same":
        assert expected == math.ceil(size / stride)
    # The shape XLA actually produces (abstract evaluation: no compilation), on a non-square input.
    x = jax.ShapeDtypeStruct((1, size, 3, 1), jnp.float32)
    w = jax.ShapeDtypeStruct((kernel, 1, 1, 2), jnp.float32)
    shape = jax.eval_shape(
        lambda a, b: F.conv2d(a, b, strides=(stride, 1), padding=(padding, 0), dilation=(dilation, 1)), x, w
    ).shape
    assert shape == (1, expected, 3, 2)


@settings(max_examples=100, deadline=None)
@given(
    size=st.integers(1, 30),
    window=st.integers(1, 5),
    stride=st.one_of(st.none(), st.integers(1, 4)),
    pad=st.integers(0, 4),
    mode=st.sampled_from(["explicit", "valid", "same"]),
)
def test_pool_output_shape_is_the_rule(size, window, stride, pad, mode):
    s = window if stride is None else stride
    lo, hi = {"explicit": (pad, pad), "valid": (0, 0), "same": same_padding(size, window, s)}[mode]
    padding = (pad, 0) if mode == "explicit" else mode
    expected = _out_size(size, lo, hi, window, s, 1)
    x = jax.ShapeDtypeStruct((2, size, 4, 3), jnp.float32)
    for pool in (F.max_pool, F.avg_pool, F.l2_pool):
        run = lambda a: pool(a, (window, 1), None if stride is None else (stride, 1), padding)  # noqa: E731
        if max(lo, hi) >= window:
            with pytest.raises(ValueError, match="too large for window"):
                jax.eval_shape(run, x)
        elif expected < 1:
            with pytest.raises(ValueError, match="larger than the padded input"):
                jax.eval_shape(run, x)
        else:
            assert jax.eval_shape(run, x).shape == (2, expected, 4, 3)


def test_numpy_integers_are_accepted_as_sizes():
    assert F.conv_output_size(np.int64(28), np.int32(5)) == 24
    assert F.resolve_padding(np.int64(1), (np.int64(3), 3)) == ((1, 1), (1, 1))
    assert F.conv2d(jnp.ones((1, 5, 5, 1)), jnp.ones((3, 3, 1, 1)), strides=np.int64(2)).shape == (1, 2, 2, 1)
    with pytest.raises(ValueError, match="strides must be an int or a pair"):
        F.conv2d(jnp.ones((1, 5, 5, 1)), jnp.ones((3, 3, 1, 1)), strides=1.5)
    with pytest.raises(ValueError, match="strides must be an int >= 1, got True"):
        F.conv_output_size(5, 3, True)


def test_resolve_padding_modes():
    assert F.resolve_padding("valid", 3) == ((0, 0), (0, 0))
    assert F.resolve_padding("same", 3) == ((1, 1), (1, 1))
    assert F.resolve_padding("same", (4, 2)) == ((1, 2), (0, 1))  # even kernels: the extra cell after
    assert F.resolve_padding("same", 3, 2) == ((2, 2), (2, 2))
    assert F.resolve_padding("full", (3, 2), (2, 1)) == ((4, 4), (1, 1))
    assert F.resolve_padding(2, 5) == ((2, 2), (2, 2))
    assert F.resolve_padding((1, 0), 3) == ((1, 1), (0, 0))
    assert F.resolve_padding(((0, 1), (2, 3)), 3) == ((0, 1), (2, 3))
    assert F.resolve_padding("same", 3, strides=2, input_size=(6, 7)) == ((0, 1), (1, 1))


def test_resolve_padding_errors():
    with pytest.raises(ValueError, match="depends on the input size"):
        F.resolve_padding("same", 3, strides=2)
    with pytest.raises(ValueError, match="unknown padding mode 'sam'"):
        F.resolve_padding("sam", 3)
    with pytest.raises(ValueError, match="must not be negative"):
        F.resolve_padding(-1, 3)
    with pytest.raises(ValueError, match="padding must be one of"):
        F.resolve_padding((1, 2, 3), 3)
    with pytest.raises(ValueError, match="kernel_size must be an int or a pair"):
        F.resolve_padding("valid", (1, 2, 3))


# --------------------------------------------------------------------------------------------------------
# Errors a user can act on
# --------------------------------------------------------------------------------------------------------


def test_conv2d_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"expected x of shape \[N, H, W, C\], got \(28, 28\)"):
        F.conv2d(jnp.ones((28, 28)), jnp.ones((3, 3, 1, 1)))
    with pytest.raises(ValueError, match=r"expected kernel of shape \[KH, KW, Cin / groups, Cout\]"):
        F.conv2d(jnp.ones((1, 8, 8, 1)), jnp.ones((3, 3, 1)))
    with pytest.raises(ValueError, match="input channels 6 are not divisible by groups=4"):
        F.conv2d(jnp.ones((1, 8, 8, 6)), jnp.ones((3, 3, 1, 8)), groups=4)
    with pytest.raises(ValueError, match="output channels 6 are not divisible by groups=4"):
        F.conv2d(jnp.ones((1, 8, 8, 8)), jnp.ones((3, 3, 2, 6)), groups=4)
    with pytest.raises(ValueError, match="expects 6 input channels .* but x has 4"):
        F.conv2d(jnp.ones((1, 8, 8, 4)), jnp.ones((3, 3, 3, 4)), groups=2)
    with pytest.raises(ValueError, match=r"kernel 5 with dilation 1 \(extent 5\) is larger than the padded input 3 "
                       r"\(size 3 \+ padding 0\)"):
        F.conv2d(jnp.ones((1, 3, 8, 1)), jnp.ones((5, 5, 1, 1)))
    with pytest.raises(ValueError, match="input's width"):
        F.conv2d(jnp.ones((1, 8, 4, 1)), jnp.ones((3, 3, 1, 1)), dilation=2)


def test_shrinking_below_one_pixel_is_reported():
    x = jnp.ones((1, 5, 5, 2))
    x = F.max_pool(x, 2)  # 2x2
    x = F.max_pool(x, 2)  # 1x1
    assert x.shape == (1, 1, 1, 2)
    with pytest.raises(ValueError, match="larger than the padded input 1"):
        F.max_pool(x, 2)
    with pytest.raises(ValueError, match="larger than the padded input 1"):
        F.conv2d(x, jnp.ones((3, 3, 2, 2)))


# --------------------------------------------------------------------------------------------------------
# The mathematical convolution and the symmetries
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["full", "valid", "same"])
def test_true_conv2d_matches_scipy_convolve2d(mode):
    rng = np.random.default_rng(3)
    image, kernel = _rand(rng, 6, 9), _rand(rng, 3, 5)  # odd kernel sizes so 'same' centres agree
    y = F.true_conv2d(image[None, :, :, None], kernel[:, :, None, None], padding=mode)
    np.testing.assert_allclose(np.asarray(y)[0, :, :, 0], scipy.signal.convolve2d(image, kernel, mode=mode),
                               rtol=1e-4, atol=1e-4)


def test_true_conv2d_depthwise_is_scipy_per_channel():
    rng = np.random.default_rng(4)
    images, kernels = _rand(rng, 2, 7, 6, 3), _rand(rng, 2, 4, 1, 3)
    y = np.asarray(F.true_conv2d(images, kernels, padding="full", groups=3))
    for n, c in itertools.product(range(2), range(3)):
        expected = scipy.signal.convolve2d(images[n, :, :, c], kernels[:, :, 0, c], mode="full")
        np.testing.assert_allclose(y[n, :, :, c], expected, rtol=1e-4, atol=1e-4)


def test_true_conv2d_is_commutative_unlike_cross_correlation():
    rng = np.random.default_rng(5)
    a, b = _rand(rng, 4, 4), _rand(rng, 4, 4)
    ab = F.true_conv2d(a[None, :, :, None], b[:, :, None, None], padding="full")
    ba = F.true_conv2d(b[None, :, :, None], a[:, :, None, None], padding="full")
    np.testing.assert_allclose(np.asarray(ab), np.asarray(ba), rtol=1e-4, atol=1e-5)


def test_conv_is_translation_equivariant_away_from_borders():
    rng = np.random.default_rng(6)
    x, w = _rand(rng, 1, 16, 16, 2), _rand(rng, 3, 3, 2, 4)
    dy, dx = 2, 3
    shifted = np.roll(x, (dy, dx), axis=(1, 2))
    y = np.asarray(F.conv2d(x, w, padding="same"))
    y_shifted = np.asarray(F.conv2d(shifted, w, padding="same"))
    # Shifting the input shifts the output by the same amount; rows/cols touched by the wrap-around or the
    # zero padding (one kernel radius) are left out.
    interior = (slice(None), slice(dy + 1, 16 - 1), slice(dx + 1, 16 - 1))
    np.testing.assert_allclose(y_shifted[interior], np.roll(y, (dy, dx), axis=(1, 2))[interior], rtol=1e-5,
                               atol=1e-5)
    assert not np.allclose(y_shifted[interior], y[interior])  # the output did move


def test_max_pooling_is_nearly_invariant_to_small_shifts():
    # One bright dot: moving it anywhere inside its pooling window does not change the max-pooled map at all.
    base = np.zeros((1, 8, 8, 1), np.float32)
    outputs = []
    for r, c in itertools.product((4, 5, 6, 7), (0, 1, 2, 3)):
        x = base.copy()
        x[0, r, c, 0] = 1.0
        outputs.append(np.asarray(F.max_pool(x, 4)))
    for out in outputs:
        np.testing.assert_array_equal(out, outputs[0])
    # Random iid input, 2x2/2 max pooling, input shifted one pixel: an output is unchanged exactly when the
    # largest of the 6 cells of the old and new window lies in the 2 they share, probability 2/6 = 1/3.
    # Average pooling changes every output.
    x = np.random.default_rng(7).standard_normal((8, 64, 65, 4)).astype(np.float32)
    pooled = np.asarray(F.max_pool(x[:, :, :-1], 2))
    pooled_shifted = np.asarray(F.max_pool(x[:, :, 1:], 2))
    assert abs(np.mean(pooled == pooled_shifted) - 1 / 3) < 0.02
    assert np.mean(np.asarray(F.avg_pool(x[:, :, :-1], 2)) == np.asarray(F.avg_pool(x[:, :, 1:], 2))) < 0.01


# --------------------------------------------------------------------------------------------------------
# Pooling
# --------------------------------------------------------------------------------------------------------

POOL_PADDINGS = {
    "valid": lambda k, s, size: ((0, 0), (0, 0)),
    "same": lambda k, s, size: tuple(same_padding(size[a], k[a], s[a]) for a in range(2)),
    1: lambda k, s, size: ((1, 1), (1, 1)),
    ((0, 1), (1, 0)): lambda k, s, size: ((0, 1), (1, 0)),
}


@pytest.mark.parametrize("padding", list(POOL_PADDINGS), ids=str)
@pytest.mark.parametrize("window", [2, 3, (2, 3)], ids=str)
@pytest.mark.parametrize("strides", [None, 1, 2])
def test_pooling_matches_numpy_loops(padding, window, strides):
    rng = np.random.default_rng(8)
    x = _rand(rng, 2, 7, 8, 3)
    k = (window, window) if isinstance(window, int) else window
    s = k if strides is None else (strides, strides)
    if padding == 1 and min(k) < 2:
        pytest.skip("padding must be smaller than the window")
    per_side = POOL_PADDINGS[padding](k, s, x.shape[1:3])

    @jax.jit  # one compilation for the four ops instead of one per eager op
    def pools(x):
        return (F.max_pool(x, window, strides, padding), F.avg_pool(x, window, strides, padding),
                F.avg_pool(x, window, strides, padding, count_include_pad=False), F.l2_pool(x, window, strides, padding))

    refs = (np_max_pool(x, k, s, per_side), np_avg_pool(x, k, s, per_side, count_include_pad=True),
            np_avg_pool(x, k, s, per_side, count_include_pad=False), np_l2_pool(x, k, s, per_side))
    for got, ref in zip(pools(x), refs):
        assert got.shape == ref.shape
        np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5)


def test_average_pooling_counts_padding_as_documented():
    x = jnp.ones((1, 2, 2, 1))
    # 'same' 3x3 stride 1 around a 2x2 block of ones: each window holds 4 real cells out of 9.
    np.testing.assert_allclose(np.asarray(F.avg_pool(x, 3, 1, "same")), np.full((1, 2, 2, 1), 4 / 9), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(F.avg_pool(x, 3, 1, "same", count_include_pad=False)),
                               np.ones((1, 2, 2, 1)), rtol=1e-6)


def test_max_pool_padding_never_wins_over_negative_values():
    x = -jnp.ones((1, 3, 3, 1))
    np.testing.assert_array_equal(np.asarray(F.max_pool(x, 3, 1, "same")), -np.ones((1, 3, 3, 1)))
    assert F.max_pool(jnp.full((1, 4, 4, 1), -5, jnp.int32), 2, padding=1).dtype == jnp.int32
    assert int(F.max_pool(jnp.full((1, 4, 4, 1), -5, jnp.int32), 2, padding=1).max()) == -5


def test_global_pools():
    x = _rand(np.random.default_rng(9), 3, 5, 4, 6)
    np.testing.assert_allclose(np.asarray(F.global_avg_pool(x)), x.mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(F.global_max_pool(x)), x.max(axis=(1, 2)))
    with pytest.raises(ValueError, match=r"got \(5, 4, 6\)"):
        F.global_avg_pool(x[0])


def test_pooling_errors():
    with pytest.raises(ValueError, match="too large for window"):
        F.max_pool(jnp.ones((1, 6, 6, 1)), 2, padding=2)
    with pytest.raises(ValueError, match=r"got \(6, 6\)"):
        F.avg_pool(jnp.ones((6, 6)), 2)
    with pytest.raises(ValueError, match="window_shape must be at least 1"):
        F.l2_pool(jnp.ones((1, 6, 6, 1)), 0)
    with pytest.raises(ValueError, match="larger than the padded input 2"):
        F.avg_pool(jnp.ones((1, 2, 9, 1)), 3)


def test_conv2d_is_differentiable_and_jittable():
    rng = np.random.default_rng(10)
    x, w = _rand(rng, 2, 6, 6, 4), _rand(rng, 3, 3, 2, 4)

    def loss(w):
        return jnp.sum(F.conv2d(x, w, strides=2, padding="same", groups=2) ** 2)

    g = jax.jit(jax.grad(loss))(w)
    eps = 1e-2
    for idx in [(0, 0, 0, 0), (2, 1, 1, 3), (1, 2, 0, 2)]:
        e = np.zeros_like(w)
        e[idx] = eps
        numeric = (loss(w + e) - loss(w - e)) / (2 * eps)
        np.testing.assert_allclose(float(g[idx]), float(numeric), rtol=2e-2, atol=1e-2)


@pytest.mark.parametrize("pool", [F.max_pool, F.avg_pool, F.l2_pool], ids=lambda f: f.__name__)
def test_pooling_gradients_under_jit_match_finite_differences(pool):
    x = _rand(np.random.default_rng(11), 1, 5, 6, 2)

    def loss(x):
        return jnp.sum(pool(x, 3, 2, "same") ** 2)

    g = np.asarray(jax.jit(jax.grad(loss))(x))
    eps = 1e-2
    for idx in [(0, 0, 0, 0), (0, 2, 3, 1), (0, 4, 5, 0), (0, 1, 4, 1)]:
        e = np.zeros_like(x)
        e[idx] = eps
        numeric = (float(loss(x + e)) - float(loss(x - e))) / (2 * eps)
        np.testing.assert_allclose(g[idx], numeric, rtol=2e-2, atol=2e-2)


def test_l2_pool_of_zero_windows_has_value_and_gradient_zero():
    x = jnp.zeros((1, 4, 4, 1)).at[0, 0, 0, 0].set(3.0)
    y = F.l2_pool(x, 2)
    np.testing.assert_array_equal(np.asarray(y)[0, :, :, 0], [[3, 0], [0, 0]])
    g = jax.grad(lambda x: jnp.sum(F.l2_pool(x, 2, padding="same")))(x)
    assert np.all(np.isfinite(np.asarray(g)))
    assert float(g[0, 0, 0, 0]) == 1.0  # d/dx sqrt(x^2) at x = 3


def test_pooling_keeps_bfloat16_and_sums_in_float32():
    # 256 and 63 ones: summed in bfloat16 (8 significant bits, spacing 2 above 256) every 1 is lost and the
    # mean comes out 4.0; summed in float32 it is 319 / 64 = 4.98, which bfloat16 holds to within 0.03.
    x = jnp.ones((1, 8, 8, 1), jnp.bfloat16).at[0, 0, 0, 0].set(256)
    y = F.avg_pool(x, 8)
    assert y.dtype == jnp.bfloat16
    assert abs(float(y[0, 0, 0, 0]) - 319 / 64) < 0.04
    assert abs(float(F.l2_pool(x, 8)[0, 0, 0, 0]) - math.sqrt(256**2 + 63)) < 1.0
    assert F.l2_pool(x, 2).dtype == jnp.bfloat16 and F.max_pool(x, 2).dtype == jnp.bfloat16
    assert F.avg_pool(jnp.ones((1, 4, 4, 1), jnp.uint8), 2).dtype == jnp.float32


def test_batch_norm_x_bias_is_the_norm_of_the_sum():
    """x_bias normalises x + x_bias: the values of the written-out sum (NumPy, float64), the batch mean moved by it,
    a zero gradient through y in training, and the running-statistics form in evaluation."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(8, 5, 5, 4)).astype(np.float32)
    scale, bias = rng.normal(size=4).astype(np.float32), rng.normal(size=4).astype(np.float32)
    x_bias = np.float32([5.0, -3.0, 0.25, 40.0])
    z = x.astype(np.float64) + x_bias
    mean, var = z.mean(axis=(0, 1, 2)), z.var(axis=(0, 1, 2))
    y, m, v = F.batch_norm(jnp.asarray(x), scale, bias, x_bias=jnp.asarray(x_bias))
    np.testing.assert_allclose(y, (z - mean) / np.sqrt(var + 1e-5) * scale + bias, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(m, mean, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(v, var, rtol=1e-4)
    dy = jax.grad(lambda b: jnp.sum(F.batch_norm(jnp.asarray(x), scale, bias, x_bias=b)[0] ** 2))(x_bias)
    np.testing.assert_array_equal(dy, np.zeros(4, np.float32))
    dm = jax.grad(lambda b: jnp.sum(F.batch_norm(jnp.asarray(x), scale, bias, x_bias=b)[1]))(x_bias)
    np.testing.assert_allclose(dm, np.ones(4))
    run_mean, run_var = rng.normal(size=4).astype(np.float32), rng.uniform(0.5, 2, 4).astype(np.float32)
    y_eval, _, _ = F.batch_norm(jnp.asarray(x), scale, bias, mean=run_mean, var=run_var, x_bias=jnp.asarray(x_bias))
    np.testing.assert_allclose(y_eval, (z - run_mean) / np.sqrt(run_var + 1e-5) * scale + bias, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="x_bias must have shape"):
        F.batch_norm(jnp.asarray(x), scale, bias, x_bias=jnp.zeros(3))


@pytest.mark.parametrize("train", [True, False], ids=["batch-statistics", "running-statistics"])
def test_batch_norm_max_pool_window_is_the_pool_of_the_norm(train):
    """max_pool_window pools the normalised (and ReLU'd) map: the same as max_pool afterwards; bad windows say so."""
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(4, 7, 6, 16)).astype(np.float32))
    scale, bias = rng.normal(size=16).astype(np.float32), rng.normal(size=16).astype(np.float32)
    stats = {} if train else {"mean": rng.normal(size=16).astype(np.float32),
                              "var": rng.uniform(0.5, 2, 16).astype(np.float32)}
    y, m, v = F.batch_norm(x, scale, bias, relu=True, max_pool_window=2, **stats)
    y_full, m_full, v_full = F.batch_norm(x, scale, bias, relu=True, **stats)
    assert y.shape == (4, 3, 3, 16)
    np.testing.assert_allclose(y, F.max_pool(y_full, 2), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(m, m_full)
    np.testing.assert_array_equal(v, v_full)
    with pytest.raises(ValueError, match="max_pool_window"):
        F.batch_norm(x, scale, bias, max_pool_window=8, **stats)
    with pytest.raises(ValueError, match="max_pool_window"):
        F.batch_norm(x[:, :, 0], scale, bias, max_pool_window=2, **stats)
