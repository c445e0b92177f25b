"""Augmentation and preprocessing: properties checked against plain NumPy."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxcnn.data import augment


def _images(b=16, h=12, w=10, c=3, seed=0):
    return np.random.default_rng(seed).integers(1, 256, (b, h, w, c), dtype=np.uint8)


def _key(seed=0):
    return jax.random.PRNGKey(seed)


# --- preprocess -------------------------------------------------------------------------------------------


def test_preprocess_matches_numpy_per_channel():
    x = _images(c=3)
    mean, std = (125.3, 123.0, 113.9), (63.0, 62.1, 66.7)
    got = np.asarray(augment.preprocess(jnp.asarray(x), mean=mean, std=std))
    want = (x / 255.0 - np.array(mean) / 255.0) / (np.array(std) / 255.0)
    assert got.dtype == np.float32 and got.shape == x.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_preprocess_without_normalize_and_bfloat16():
    x = _images(c=1)
    plain = np.asarray(augment.preprocess(jnp.asarray(x), mean=(10.0,), std=(2.0,), normalize=False))
    np.testing.assert_allclose(plain, x / 255.0, rtol=1e-6)
    half = augment.preprocess(jnp.asarray(x), mean=(33.3,), std=(78.6,), dtype=jnp.bfloat16)
    assert half.dtype == jnp.bfloat16
    full = (x / 255.0 - 33.3 / 255.0) / (78.6 / 255.0)
    np.testing.assert_allclose(np.asarray(half, np.float32), full, rtol=1e-2, atol=1e-2)


def test_preprocess_rejects_wrong_channel_count():
    with pytest.raises(ValueError, match="one value per channel"):
        augment.preprocess(jnp.asarray(_images(c=3)), mean=(1.0, 2.0), std=(1.0, 2.0))


# --- shapes, dtypes, determinism --------------------------------------------------------------------------


AUGMENT_SETTINGS = [
    dict(crop_padding=0, flip="none", cutout=0),
    dict(crop_padding=2, flip="random", cutout=0),
    dict(crop_padding=4, flip="alternating", cutout=5),
    dict(crop_padding=0, flip="none", cutout=3),
]


@pytest.mark.parametrize("kwargs", AUGMENT_SETTINGS)
def test_augment_batch_keeps_shape_and_dtype_under_jit(kwargs):
    x = jnp.asarray(_images())
    fn = jax.jit(partial(augment.augment_batch, **kwargs))
    out = fn(x, _key(), epoch=3, indices=jnp.arange(16))
    assert out.shape == x.shape and out.dtype == jnp.uint8


def test_same_key_same_batch_different_keys_differ():
    x = jnp.asarray(_images(b=32))
    fn = jax.jit(partial(augment.augment_batch, crop_padding=4, flip="random", cutout=4))
    a, b, c = fn(x, _key(1)), fn(x, _key(1)), fn(x, _key(2))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_augment_batch_errors():
    x = jnp.asarray(_images())
    with pytest.raises(ValueError, match="needs epoch= and indices="):
        augment.augment_batch(x, _key(), flip="alternating")
    with pytest.raises(ValueError, match="flip='sideways'"):
        augment.augment_batch(x, _key(), flip="sideways")


# --- flips ------------------------------------------------------------------------------------------------


def test_flip_is_an_involution_and_mirrors_columns():
    x = _images()
    once = np.asarray(augment.flip_horizontal(jnp.asarray(x)))
    np.testing.assert_array_equal(once, x[:, :, ::-1, :])
    np.testing.assert_array_equal(np.asarray(augment.flip_horizontal(jnp.asarray(once))), x)


def test_random_flip_mirrors_about_half_of_the_examples_and_nothing_else():
    x = _images(b=400, h=4, w=5)
    out = np.asarray(augment.random_flip(jnp.asarray(x), _key(3)))
    same = np.all(out == x, axis=(1, 2, 3))
    mirrored = np.all(out == x[:, :, ::-1, :], axis=(1, 2, 3))
    assert np.all(same | mirrored)
    assert 150 < mirrored.sum() < 250  # Binomial(400, 0.5): 5 standard deviations either side


def test_alternating_flip_flips_each_example_in_exactly_one_of_two_consecutive_epochs():
    x = _images(b=512, h=3, w=4, c=1)
    indices = jnp.asarray(np.random.default_rng(0).permutation(10_000)[:512])
    flipped = []
    for epoch in range(4):
        out = np.asarray(augment.alternating_flip(jnp.asarray(x), epoch, indices))
        is_flipped = np.all(out == x[:, :, ::-1, :], axis=(1, 2, 3))
        assert np.all(is_flipped | np.all(out == x, axis=(1, 2, 3)))
        flipped.append(is_flipped)
    for e in range(3):
        assert np.all(flipped[e] ^ flipped[e + 1])
    assert 180 < flipped[0].sum() < 332  # about half, from the hash


def test_alternating_flip_depends_on_the_example_index_not_its_position():
    x = _images(b=64, h=3, w=4, c=1)
    indices = np.arange(1000, 1064)
    order = np.random.default_rng(1).permutation(64)
    a = np.asarray(augment.alternating_flip(jnp.asarray(x), 5, jnp.asarray(indices)))
    b = np.asarray(augment.alternating_flip(jnp.asarray(x[order]), 5, jnp.asarray(indices[order])))
    np.testing.assert_array_equal(a[order], b)
    other_seed = np.asarray(augment.alternating_flip(jnp.asarray(x), 5, jnp.asarray(indices), seed=7))
    assert not np.array_equal(a, other_seed)


# --- crop -------------------------------------------------------------------------------------------------


def test_crop_with_padding_zero_is_identity():
    x = _images()
    np.testing.assert_array_equal(np.asarray(augment.random_crop(jnp.asarray(x), _key(), 0)), x)


@settings(max_examples=5, deadline=None)
@given(
    h=st.integers(3, 9),
    w=st.integers(3, 9),
    c=st.sampled_from([1, 3]),
    padding=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_crop_output_is_a_window_of_the_zero_padded_input(h, w, c, padding, seed):
    x = _images(b=6, h=h, w=w, c=c, seed=seed)
    out = np.asarray(augment.random_crop(jnp.asarray(x), _key(seed), padding))
    assert out.shape == x.shape
    for i in range(len(x)):
        padded = np.zeros((h + 2 * padding, w + 2 * padding, c), np.uint8)
        padded[padding : padding + h, padding : padding + w] = x[i]
        windows = [
            (dy, dx)
            for dy in range(2 * padding + 1)
            for dx in range(2 * padding + 1)
            if np.array_equal(padded[dy : dy + h, dx : dx + w], out[i])
        ]
        assert windows, f"example {i} is not a window of its padded input"


def test_crop_offsets_vary_across_the_batch():
    x = np.broadcast_to(np.arange(1, 9, dtype=np.uint8)[None, None, :, None], (64, 8, 8, 1)).copy()
    x = x + np.arange(8, dtype=np.uint8)[None, :, None, None] * 10  # each pixel distinct
    out = np.asarray(augment.random_crop(jnp.asarray(x), _key(5), 2))
    distinct = {out[i].tobytes() for i in range(64)}
    assert len(distinct) > 10  # 25 possible windows


# --- cutout -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 3, 4])
def test_cutout_zeroes_one_square_clipped_at_the_borders(size):
    h, w = 16, 12
    x = np.full((200, h, w, 3), 200, np.uint8)
    out = np.asarray(augment.cutout(jnp.asarray(x), _key(size), size))
    zero = np.all(out == 0, axis=-1)  # [B, H, W]: every channel cut together
    assert np.all((out == 0) | (out == 200))
    assert np.array_equal(np.any(out == 0, axis=-1), zero)
    fully_inside = 0
    for i in range(len(x)):
        rows, cols = np.nonzero(zero[i])
        assert len(rows), "every example has a cut"
        top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        assert zero[i, top:bottom, left:right].all() and zero[i].sum() == (bottom - top) * (right - left)
        assert bottom - top <= size and right - left <= size
        if bottom - top < size:
            assert top == 0 or bottom == h  # shorter only where clipped
        if right - left < size:
            assert left == 0 or right == w
        if 0 < top and bottom < h and 0 < left and right < w:
            fully_inside += 1
            assert zero[i].sum() == size * size
    assert fully_inside > 50


def test_cutout_size_zero_is_identity():
    x = _images()
    np.testing.assert_array_equal(np.asarray(augment.cutout(jnp.asarray(x), _key(), 0)), x)


# --- test-time augmentation -------------------------------------------------------------------------------


def _position_weighted_logits(x):
    """A model that is not mirror- or shift-invariant: logits are position-weighted sums. x: [B, H, W, C]."""
    b, h, w, c = x.shape
    weights = np.linspace(-1.0, 2.0, h * w * c * 5).reshape(h * w * c, 5)
    return np.asarray(x, np.float64).reshape(b, -1) @ weights


def _shift_reflect(x, dy, dx):
    p = max(abs(dy), abs(dx))
    padded = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)), mode="reflect")
    h, w = x.shape[1:3]
    return padded[:, p - dy : p - dy + h, p - dx : p - dx + w]


@pytest.mark.parametrize("mode", ["none", "flip", "flip_translate"])
def test_tta_averages_logits_over_the_views(mode):
    x = np.random.default_rng(0).normal(size=(4, 6, 5, 2)).astype(np.float32)

    def apply_fn(images):
        weights = jnp.asarray(np.linspace(-1.0, 2.0, 6 * 5 * 2 * 5).reshape(-1, 5), jnp.float32)
        return images.reshape(images.shape[0], -1) @ weights

    got = np.asarray(jax.jit(partial(augment.tta_logits, apply_fn, mode=mode))(jnp.asarray(x)))

    def mirror_pair(v):
        return 0.5 * (_position_weighted_logits(v) + _position_weighted_logits(v[:, :, ::-1]))

    if mode == "none":
        want = _position_weighted_logits(x)
    elif mode == "flip":
        want = mirror_pair(x)
    else:
        want = 0.5 * mirror_pair(x) + 0.25 * (
            mirror_pair(_shift_reflect(x, -1, -1)) + mirror_pair(_shift_reflect(x, 1, 1))
        )
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_tta_rejects_unknown_mode():
    with pytest.raises(ValueError, match="flip_translate"):
        augment.tta_logits(lambda v: v, jnp.zeros((1, 2, 2, 1)), mode="rotate")
