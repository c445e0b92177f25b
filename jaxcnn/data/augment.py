"""Augmentation and preprocessing inside the compiled train step: pure `jax.numpy`, batched, jit-able.

The train step receives the batch as stored, `uint8 [B, H, W, C]`, augments it with `augment_batch` and turns
it into float with `preprocess`:

    images = augment_batch(batch["image"], rng, crop_padding=4, flip="alternating",
                           epoch=epoch, indices=batch["index"])
    x = preprocess(images, mean=info.mean, std=info.std)          # float32 [B, H, W, C]

The augmentation keyword names mirror `jaxcnn.config.DataConfig` (`crop_padding`, `flip`, `cutout`, `tta`).
Every random choice is per example and comes from the `rng` key, so the same key gives the same batch.
"""

from __future__ import annotations

from typing import Callable, Literal, Sequence

import jax
import jax.numpy as jnp
from jax import lax

FlipMode = Literal["none", "random", "alternating"]
TTAMode = Literal["none", "flip", "flip_translate"]


def preprocess(
    images: jax.Array,
    *,
    mean: Sequence[float] | jax.Array,
    std: Sequence[float] | jax.Array,
    normalize: bool = True,
    dtype: jnp.dtype = jnp.float32,
) -> jax.Array:
    """uint8 images to float: `x / 255`, then per channel `(x - mean / 255) / (std / 255)` if `normalize`.

    images: [B, H, W, C] (uint8, values 0..255). mean, std: [C] on the 0..255 scale (as in
    `jaxcnn.data.dataset.DATASET_INFO[name]`). Returns `dtype` [B, H, W, C]; the arithmetic runs in float32
    and is cast at the end, so a bfloat16 result is the rounded float32 one.
    """
    x = images.astype(jnp.float32) / 255.0
    if normalize:
        mean = jnp.asarray(mean, jnp.float32) / 255.0
        std = jnp.asarray(std, jnp.float32) / 255.0
        if mean.shape not in ((), (x.shape[-1],)) or std.shape not in ((), (x.shape[-1],)):
            raise ValueError(
                f"preprocess: mean {mean.shape} and std {std.shape} must have one value per channel "
                f"({x.shape[-1]} channels, images {x.shape})"
            )
        x = (x - mean) / std
    return x.astype(dtype)


def random_crop(images: jax.Array, rng: jax.Array, padding: int) -> jax.Array:
    """Zero-pads each side by `padding` pixels, then crops a random [H, W] window per example.

    images: [B, H, W, C]. The window's top-left corner is uniform over the (2 * padding + 1)^2 positions of the
    padded [H + 2p, W + 2p] image, independently per example. `padding` = 0 returns `images` unchanged.
    """
    if padding < 0:
        raise ValueError(f"random_crop: padding must be >= 0, got {padding}")
    if padding == 0:
        return images
    b, h, w, c = images.shape
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    offsets = jax.random.randint(rng, (b, 2), 0, 2 * padding + 1)

    def crop_one(image: jax.Array, offset: jax.Array) -> jax.Array:
        return lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))

    return jax.vmap(crop_one)(padded, offsets)


def flip_horizontal(images: jax.Array) -> jax.Array:
    """Mirrors left-right. images: [B, H, W, C] -> [B, H, W, C]."""
    return images[:, :, ::-1, :]


def _flip_where(images: jax.Array, flip: jax.Array) -> jax.Array:
    """Mirrors the examples where `flip` ([B] bool) is True."""
    return jnp.where(flip[:, None, None, None], flip_horizontal(images), images)


def random_flip(images: jax.Array, rng: jax.Array) -> jax.Array:
    """Mirrors each example left-right with probability 0.5, independently. images: [B, H, W, C]."""
    return _flip_where(images, jax.random.bernoulli(rng, 0.5, (images.shape[0],)))


def _hash_bit(indices: jax.Array, seed: int | jax.Array) -> jax.Array:
    """A pseudo-random bit per integer index (the top bit of the `lowbias32` integer hash of index ^ seed)."""
    x = indices.astype(jnp.uint32) ^ (jnp.asarray(seed, jnp.uint32) * jnp.uint32(0x9E3779B9))
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    x = x ^ (x >> 16)
    return (x >> 31).astype(jnp.bool_)


def alternating_flip(
    images: jax.Array, epoch: int | jax.Array, indices: jax.Array, *, seed: int | jax.Array = 0
) -> jax.Array:
    """airbench's alternating flip: example i is mirrored in epoch e iff hash_bit(i) XOR (e % 2).

    images: [B, H, W, C]; indices: [B] int, each example's index in the dataset (the loaders' `batch['index']`);
    epoch: the epoch number. The hash bit (of index and `seed`) picks a pseudo-random half of the dataset to
    mirror in even epochs; odd epochs mirror the other half. So every example is seen mirrored exactly every
    other epoch, which covers both views in any two consecutive epochs (random flips leave about a quarter of
    the examples in the same orientation two epochs running).
    """
    flip = _hash_bit(indices, seed) ^ (jnp.asarray(epoch) % 2 == 1)
    return _flip_where(images, flip)


def cutout(images: jax.Array, rng: jax.Array, size: int, *, fill: int | float = 0) -> jax.Array:
    """Sets a `size` x `size` square to `fill` in every example (DeVries & Taylor, 2017), all channels.

    images: [B, H, W, C]. The square's centre is uniform over the image, per example; near a border the square
    is clipped, so fewer than size^2 pixels change. The default fill 0 is black for uint8 images; pass the
    dataset mean to fill with the mean colour after `preprocess` maps it to 0 (or cut out after preprocessing).
    """
    if size < 0:
        raise ValueError(f"cutout: size must be >= 0, got {size}")
    if size == 0:
        return images
    b, h, w, _ = images.shape
    ky, kx = jax.random.split(rng)
    top = jax.random.randint(ky, (b, 1, 1), 0, h) - size // 2
    left = jax.random.randint(kx, (b, 1, 1), 0, w) - size // 2
    rows = jnp.arange(h)[None, :, None]
    cols = jnp.arange(w)[None, None, :]
    inside = (rows >= top) & (rows < top + size) & (cols >= left) & (cols < left + size)  # [B, H, W]
    return jnp.where(inside[..., None], jnp.asarray(fill, images.dtype), images)


_cutout = cutout  # augment_batch's `cutout` argument shadows the function's name


def augment_batch(
    images: jax.Array,
    rng: jax.Array,
    *,
    crop_padding: int = 0,
    flip: FlipMode = "none",
    cutout: int = 0,
    epoch: int | jax.Array | None = None,
    indices: jax.Array | None = None,
    flip_seed: int | jax.Array = 0,
) -> jax.Array:
    """The train-time augmentation of `DataConfig`: random crop, then flip, then cutout.

    images: [B, H, W, C] (uint8 as stored; any dtype works) -> same shape and dtype. `flip='alternating'`
    needs `epoch` and `indices` ([B] dataset indices, the loaders' `batch['index']`); `flip_seed` varies which
    half is mirrored first (pass the run's seed). All settings are static (Python values) except `rng`,
    `epoch` and `indices`.
    """
    k_crop, k_flip, k_cut = jax.random.split(rng, 3)
    if crop_padding:
        images = random_crop(images, k_crop, crop_padding)
    if flip == "random":
        images = random_flip(images, k_flip)
    elif flip == "alternating":
        if epoch is None or indices is None:
            raise ValueError(
                "augment_batch: flip='alternating' needs epoch= and indices= (the batch's 'index' field)"
            )
        images = alternating_flip(images, epoch, indices, seed=flip_seed)
    elif flip != "none":
        raise ValueError(f"augment_batch: flip={flip!r}; choose one of 'none', 'random', 'alternating'")
    if cutout:
        images = _cutout(images, k_cut, cutout)
    return images


def _translate(images: jax.Array, dy: int, dx: int) -> jax.Array:
    """Shifts content by (dy, dx) pixels with reflect padding: out[y, x] = in[y - dy, x - dx] inside."""
    p = max(abs(dy), abs(dx))
    h, w = images.shape[1:3]
    padded = jnp.pad(images, ((0, 0), (p, p), (p, p), (0, 0)), mode="reflect")
    return padded[:, p - dy : p - dy + h, p - dx : p - dx + w, :]


def tta_logits(
    apply_fn: Callable[[jax.Array], jax.Array],
    images: jax.Array,
    mode: TTAMode = "none",
    *,
    translate: int = 1,
) -> jax.Array:
    """Test-time augmentation: averages the **logits** (not the softmax) of `apply_fn` over several views.

    apply_fn: images [B, H, W, C] -> logits [B, K] (e.g. `lambda x: model.apply(variables, x, train=False)`);
    images: [B, H, W, C] as `apply_fn` takes them (preprocessed floats). Views, following airbench:
      'none'            the images alone;
      'flip'            mean of the images and their mirror;
      'flip_translate'  0.5 * flip(images) + 0.25 * flip(shifted up-left by `translate` px)
                        + 0.25 * flip(shifted down-right by `translate` px), with reflect padding.
    Returns logits [B, K]; `mode` and `translate` are static.
    """
    if mode == "none":
        return apply_fn(images)

    def with_mirror(x: jax.Array) -> jax.Array:
        return 0.5 * (apply_fn(x) + apply_fn(flip_horizontal(x)))

    if mode == "flip":
        return with_mirror(images)
    if mode == "flip_translate":
        shifted = with_mirror(_translate(images, -translate, -translate)) + with_mirror(
            _translate(images, translate, translate)
        )
        return 0.5 * with_mirror(images) + 0.25 * shifted
    raise ValueError(f"tta_logits: mode={mode!r}; choose one of 'none', 'flip', 'flip_translate'")
