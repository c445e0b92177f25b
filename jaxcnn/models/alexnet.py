"""AlexNet (Krizhevsky et al., 2012) in torchvision's single-GPU layout, and a 32x32 variant for CIFAR."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax

from jaxcnn.models.base import ClassifierBase, HeadKind
from jaxcnn.models.heads import DropoutPosition
from jaxcnn.models.registry import register_model
from jaxcnn.nn import layers
from jaxcnn.nn.blocks import ConvNormAct, check_downsample


class AlexNet(ClassifierBase):
    """Five convs (``conv_channels``, ``kernel_sizes``), 3x3 stride-2 pools after convs 1, 2 and 5, the head.

    The first conv has stride ``stem_stride`` and padding ``stem_padding``, the others stride 1 and ``k // 2``
    padding; pools are overlapping 3x3 stride 2 without padding (kind ``pool``). The head defaults to
    torchvision's: adaptive average pool to 6x6, flatten, 4096, 4096, logits, with dropout 0.5 on the outputs of
    the two hidden layers, as the paper describes; ``head_dropout_position='before_hidden'`` puts it on their
    inputs, as torchvision does (the same parameters and evaluation; training draws differ). ``alexnet`` has
    61,100,840 parameters at 1000 classes.

    ``alexnet_cifar`` (32x32 inputs): first conv 5x5 stride 1, no adaptive pool, a 1024-1024 head, so the last
    pool's 3x3x256 map is flattened (5,871,434 parameters at 10 classes).

    x: ``[N, H, W, C]`` -> logits ``[N, num_classes]``. Features: ``block1`` ... ``block5``, ``pre_logits``,
    ``logits``.
    """

    norm: layers.NormKind = "none"
    conv_channels: tuple[int, ...] = (64, 192, 384, 256, 256)
    kernel_sizes: tuple[int, ...] = (11, 5, 3, 3, 3)
    pool_after: tuple[int, ...] = (1, 2, 5)
    stem_stride: int = 4
    stem_padding: int = 2
    width: float = 1.0
    pool: layers.PoolKind = "max"
    head: HeadKind = "flatten"
    head_pool_size: int | None = 6
    head_hidden: tuple[int, ...] = (4096, 4096)
    dropout: float = 0.5
    head_dropout_position: DropoutPosition = "after_hidden"

    def check_knobs(self) -> None:
        super().check_knobs()
        self.check_same_length(conv_channels=self.conv_channels, kernel_sizes=self.kernel_sizes)
        if self.stem_stride < 1 or self.stem_padding < 0:
            self._fail(f"stem_stride={self.stem_stride} must be positive and stem_padding={self.stem_padding} >= 0")
        bad = [i for i in self.pool_after if not 1 <= i <= len(self.conv_channels)]
        if bad:
            self._fail(f"pool_after={self.pool_after}: conv numbers must be in 1..{len(self.conv_channels)}")

    @nn.compact
    def __call__(
        self, x: jax.Array, train: bool = False, return_features: bool = False
    ) -> jax.Array | dict[str, jax.Array]:
        x = self.prepare_input(x)
        input_shape = tuple(x.shape)
        block = functools.partial(ConvNormAct, conv=self.conv_def(), norm=self.norm_def(train), act=self.act_fn)
        features = {}
        for i, (channels, k) in enumerate(zip(self.conv_channels, self.kernel_sizes)):
            name = f"block{i + 1}"
            strides, padding = (self.stem_stride, self.stem_padding) if i == 0 else (1, None)
            check_downsample(x, strides, f"AlexNet {name} conv (input {input_shape})")
            x = block(self.scaled(channels), k, strides=strides, padding=padding, pool_follows=i + 1 in self.pool_after,
                      name=f"{name}_conv")(x)
            if i + 1 in self.pool_after:
                x = layers.Pool2d(self.pool, window_shape=3, strides=2, name=f"{name}_pool")(x)
            features[name] = x
        return self.classify(x, train, features, return_features)


register_model(
    "alexnet", functools.partial(AlexNet, num_classes=1000),
    description="AlexNet (torchvision layout): 61,100,840 params at 1000 classes",
)
register_model(
    "alexnet_cifar",
    functools.partial(
        AlexNet, num_classes=10, kernel_sizes=(5, 5, 3, 3, 3), stem_stride=1, stem_padding=2, head_pool_size=None,
        head_hidden=(1024, 1024),
    ),
    description="AlexNet for 32x32 inputs: 5x5 stride-1 first conv, 1024-1024 head (5,871,434 params at 10 classes)",
)

__all__ = ["AlexNet"]
