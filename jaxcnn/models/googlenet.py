"""GoogLeNet / Inception v1 (Szegedy et al., 2014) in torchvision's layout, without the auxiliary heads."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax

from jaxcnn.models.base import ClassifierBase
from jaxcnn.models.registry import register_model
from jaxcnn.nn import layers
from jaxcnn.nn.blocks import ConvNormAct, InceptionBlock, check_downsample

# (ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj) of each Inception module, Table 1 of the paper.
_INCEPTION = {
    "3a": (64, 96, 128, 16, 32, 32),
    "3b": (128, 128, 192, 32, 96, 64),
    "4a": (192, 96, 208, 16, 48, 64),
    "4b": (160, 112, 224, 24, 64, 64),
    "4c": (128, 128, 256, 24, 64, 64),
    "4d": (112, 144, 288, 32, 64, 64),
    "4e": (256, 160, 320, 32, 128, 128),
    "5a": (256, 160, 320, 32, 128, 128),
    "5b": (384, 192, 384, 48, 128, 128),
}


class GoogLeNet(ClassifierBase):
    """Stem (7x7/2 conv, pool, 1x1 conv, 3x3 conv, pool), Inception 3a-3b, pool, 4a-4e, pool, 5a-5b, global average
    pool, dropout 0.2, logits. Every conv is conv (no bias) -> BN (epsilon 1e-3) -> ReLU, as torchvision's.

    ``kernel5`` is the kernel of the "5x5" branches: 3 by default, as torchvision's GoogLeNet builds them (its
    6,624,904 parameters at 1000 classes); 5 is the paper's (7,005,832). Pools are 3x3 stride 2 ('same' padding,
    which matches torchvision's ceil_mode sizes), kind ``pool``.

    x: ``[N, H, W, C]`` (at least 32x32) -> logits ``[N, num_classes]``. Features: ``stem`` (28x28x192 at a 224
    input), ``stage3``, ``stage4``, ``stage5``, ``pre_logits``, ``logits``.
    """

    kernel5: int = 3
    pool: layers.PoolKind = "max"
    dropout: float = 0.2
    bn_epsilon: float = 1e-3

    def check_knobs(self) -> None:
        super().check_knobs()
        if self.kernel5 < 1:
            self._fail(f"kernel5={self.kernel5} must be positive")

    @nn.compact
    def __call__(
        self, x: jax.Array, train: bool = False, return_features: bool = False
    ) -> jax.Array | dict[str, jax.Array]:
        x = self.prepare_input(x)
        input_shape = tuple(x.shape)
        cb = functools.partial(ConvNormAct, conv=self.conv_def(), norm=self.norm_def(train), act=self.act_fn)

        def pool(y: jax.Array, name: str, window: int = 3) -> jax.Array:
            check_downsample(y, 2, f"GoogLeNet {name} (input {input_shape})")
            return layers.Pool2d(self.pool, window_shape=window, strides=2, padding="same", name=name)(y)

        def inception(y: jax.Array, key: str) -> jax.Array:
            return InceptionBlock(*_INCEPTION[key], kernel5=self.kernel5, pool=self.pool, conv_block=cb,
                                  name=f"inception{key}")(y)

        check_downsample(x, 2, f"GoogLeNet conv1 (input {input_shape})")
        x = cb(64, 7, strides=2, name="conv1")(x)
        x = pool(x, "pool1")
        x = cb(64, 1, name="conv2")(x)
        x = cb(192, 3, name="conv3")(x)
        x = pool(x, "pool2")
        features = {"stem": x}
        x = inception(inception(x, "3a"), "3b")
        features["stage3"] = x
        x = pool(x, "pool3")
        for key in ("4a", "4b", "4c", "4d", "4e"):
            x = inception(x, key)
        features["stage4"] = x
        x = pool(x, "pool4", window=2)
        x = inception(inception(x, "5a"), "5b")
        features["stage5"] = x
        return self.classify(x, train, features, return_features)


register_model(
    "googlenet", functools.partial(GoogLeNet, num_classes=1000),
    description="GoogLeNet / Inception v1 (torchvision layout, no aux heads): 6,624,904 params at 1000 classes",
)

__all__ = ["GoogLeNet"]
