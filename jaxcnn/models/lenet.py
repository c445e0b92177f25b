"""LeNet-5 (LeCun et al., 1998) as it is usually built today: full connections between conv layers, max/avg/L2
pooling instead of trainable subsampling, and a plain dense output layer instead of RBF units."""

from __future__ import annotations

from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcnn.models.base import ClassifierBase, HeadKind
from jaxcnn.models.registry import register
from jaxcnn.nn import layers
from jaxcnn.nn.blocks import norm_act


@register("lenet5", description="LeNet-5: conv5x5x6-pool-conv5x5x16-pool-fc120-fc84; 61,706 params on 32x32x1")
class LeNet5(ClassifierBase):
    """conv5x5·6 -> act -> pool2 -> conv5x5·16 -> act -> pool2 -> fc120 -> fc84 -> logits (valid convolutions).

    61,706 parameters at 10 classes on 32x32x1 inputs, and on 28x28 inputs, which ``pad_to=32`` zero-pads
    (centred) to 32x32 first, as LeCun et al. padded the 28x28 MNIST digits so that strokes can reach the centre
    of the top feature detectors' receptive fields. Inputs at least ``pad_to`` on a side are left as they are;
    ``pad_to=None`` never pads, and then an input smaller than 16x16 fails at ``block1_conv`` or later with
    the layer and the shape named (with padding, any small input is padded up to 32x32). (The padding is zeros in the model's input space: after the pipeline's
    normalisation that is the dataset's mean intensity.)

    Knobs: ``act`` and ``pool`` default to ReLU and max pooling, the best of the four pairings on Fashion-MNIST
    (experiments/fashion_mnist_lenet5.py cut to 4 epochs, seed 0, test accuracy: relu/max 89.91%, relu/avg
    89.60%, tanh/max 89.42%, the 1998 tanh/avg 88.95%); ``pool`` is 'max', 'avg' or 'l2';
    ``downsample='conv'`` (stride-2 convolutions instead of the pools; same shapes), ``norm`` (default none),
    ``conv_channels``/``kernel_size``/``width`` for the conv stack, ``head``/``head_hidden``/``dropout``.

    x: ``[N, H, W, C]`` -> logits ``[N, num_classes]``. Features: ``block1``, ``block2`` (after each pool),
    ``pre_logits`` (the 84 units), ``logits``.
    """

    norm: layers.NormKind = "none"
    pool: layers.PoolKind = "max"
    downsample: Literal["pool", "conv"] = "pool"
    conv_channels: tuple[int, ...] = (6, 16)
    kernel_size: int = 5
    width: float = 1.0
    head: HeadKind = "flatten"
    head_hidden: tuple[int, ...] = (120, 84)
    pad_to: int | None = 32

    def check_knobs(self) -> None:
        super().check_knobs()
        if not self.conv_channels:
            self._fail("conv_channels=(): give at least one conv layer")
        if self.pad_to is not None and self.pad_to < 1:
            self._fail(f"pad_to={self.pad_to} must be a positive size or None")

    @nn.compact
    def __call__(
        self, x: jax.Array, train: bool = False, return_features: bool = False
    ) -> jax.Array | dict[str, jax.Array]:
        x = self.prepare_input(x)
        if self.pad_to is not None:
            dh, dw = max(self.pad_to - x.shape[1], 0), max(self.pad_to - x.shape[2], 0)
            x = jnp.pad(x, ((0, 0), (dh // 2, dh - dh // 2), (dw // 2, dw - dw // 2), (0, 0)))
        conv, norm = self.conv_def(), self.norm_def(train)
        strides = 2 if self.downsample == "conv" else 1
        features = {}
        for i, c in enumerate(self.conv_channels):
            k = f"block{i + 1}"
            x = conv(self.scaled(c), kernel_size=self.kernel_size, strides=strides, padding="valid", name=f"{k}_conv")(x)
            xla_pool = self.downsample == "pool" and self.pool != "max"  # 2x2 max pools: jaxcnn's native kernel
            x = norm_act(norm, self.act_fn, name=f"{k}_norm", pool_follows=xla_pool)(x)
            if self.downsample == "pool":
                x = layers.Pool2d(self.pool, window_shape=2, strides=2, name=f"{k}_pool")(x)
            features[k] = x
        return self.classify(x, train, features, return_features)
