"""VGG (Simonyan & Zisserman, 2014) as torchvision builds it: stages of 3x3 convs (with bias), 2x2 max pools,
a 7x7 adaptive average pool, and a 4096-4096 classifier with dropout 0.5.

VGG-16 has 138,357,544 parameters at 1000 classes and VGG-16-BN 138,365,992 (the BN variants keep the conv biases,
as torchvision's do). The 7x7 adaptive pool makes the classifier's size independent of the input: a 32x32 input
reaches it as a 1x1 map, copied to 7x7.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax

from jaxcnn.models.base import ClassifierBase, DownsampleKind, HeadKind
from jaxcnn.models.registry import register_model
from jaxcnn.nn import layers
from jaxcnn.nn.blocks import ConvNormAct, check_downsample


class VGG(ClassifierBase):
    """Stages of ``stage_sizes[i]`` kxk convs with ``stage_widths[i]`` channels, each stage followed by a 2x2
    stride-2 pool (``downsample='pool'``, of kind ``pool``), or with its last conv at stride 2
    (``downsample='conv'``); then the head.

    The head defaults to torchvision's: adaptive average pool to ``head_pool_size`` (7) x 7, flatten, dense 4096,
    act, dropout, dense 4096, act, dropout, logits. ``head='gap'`` with ``head_hidden=()`` gives the small CIFAR
    head. The convolutions always have a bias, also with a norm (torchvision's VGG-BN does the same); before a
    BatchNorm, `ConvNormAct` hands it to the norm, which moves its mean by it (the same values, computed faster).

    x: ``[N, H, W, C]`` -> logits ``[N, num_classes]``. Features: ``stage1`` ... ``stage5``, ``pre_logits``,
    ``logits``.
    """

    norm: layers.NormKind = "none"
    stage_sizes: tuple[int, ...] = (2, 2, 3, 3, 3)
    stage_widths: tuple[int, ...] = (64, 128, 256, 512, 512)
    width: float = 1.0
    kernel_size: int = 3
    pool: layers.PoolKind = "max"
    downsample: DownsampleKind = "pool"
    head: HeadKind = "flatten"
    head_pool_size: int | None = 7
    head_hidden: tuple[int, ...] = (4096, 4096)
    dropout: float = 0.5

    def check_knobs(self) -> None:
        super().check_knobs()
        self.check_same_length(stage_sizes=self.stage_sizes, stage_widths=self.stage_widths)

    @nn.compact
    def __call__(
        self, x: jax.Array, train: bool = False, return_features: bool = False
    ) -> jax.Array | dict[str, jax.Array]:
        x = self.prepare_input(x)
        input_shape = tuple(x.shape)
        block = functools.partial(
            ConvNormAct, kernel_size=self.kernel_size, conv=self.conv_def(use_bias=True), norm=self.norm_def(train),
            act=self.act_fn,
        )
        features = {}
        for i, (size, channels) in enumerate(zip(self.stage_sizes, self.stage_widths)):
            stage = f"stage{i + 1}"
            for j in range(size):
                strides = 2 if self.downsample == "conv" and j == size - 1 else 1
                check_downsample(x, strides, f"VGG {stage} conv{j + 1} (input {input_shape})")
                last = self.downsample == "pool" and j == size - 1
                # The 2x2 max pool ends the stage's last block (with a BatchNorm: norm, ReLU and pool in one native
                # kernel each way); before an average or L2 pool, XLA fuses the norm into the pool instead.
                max_pool = 2 if last and self.pool == "max" else None
                if max_pool:
                    check_downsample(x, 2, f"VGG {stage} pool (input {input_shape})")
                x = block(self.scaled(channels), strides=strides, pool_follows=last and self.pool != "max",
                          max_pool_window=max_pool, name=f"{stage}_conv{j + 1}")(x)
            if self.downsample == "pool" and self.pool != "max":
                check_downsample(x, 2, f"VGG {stage} pool (input {input_shape})")
                x = layers.Pool2d(self.pool, window_shape=2, strides=2, name=f"{stage}_pool")(x)
            features[stage] = x
        return self.classify(x, train, features, return_features)


# Convs per stage: Table 1 of the paper (configurations A, B, D, E); parameter counts equal torchvision's.
register_model(
    "vgg11", functools.partial(VGG, num_classes=1000, stage_sizes=(1, 1, 2, 2, 2)),
    description="VGG-11 (torchvision layout): 132,863,336 params at 1000 classes",
)
register_model(
    "vgg11_bn", functools.partial(VGG, num_classes=1000, stage_sizes=(1, 1, 2, 2, 2), norm="batch"),
    description="VGG-11 with BatchNorm (torchvision layout): 132,868,840 params at 1000 classes",
)
register_model(
    "vgg13", functools.partial(VGG, num_classes=1000, stage_sizes=(2, 2, 2, 2, 2)),
    description="VGG-13 (torchvision layout): 133,047,848 params at 1000 classes",
)
register_model(
    "vgg13_bn", functools.partial(VGG, num_classes=1000, stage_sizes=(2, 2, 2, 2, 2), norm="batch"),
    description="VGG-13 with BatchNorm (torchvision layout): 133,053,736 params at 1000 classes",
)
register_model(
    "vgg16", functools.partial(VGG, num_classes=1000, stage_sizes=(2, 2, 3, 3, 3)),
    description="VGG-16 (torchvision layout): 138,357,544 params at 1000 classes",
)
register_model(
    "vgg16_bn", functools.partial(VGG, num_classes=1000, stage_sizes=(2, 2, 3, 3, 3), norm="batch"),
    description="VGG-16 with BatchNorm (torchvision layout): 138,365,992 params at 1000 classes",
)
register_model(
    "vgg19", functools.partial(VGG, num_classes=1000, stage_sizes=(2, 2, 4, 4, 4)),
    description="VGG-19 (torchvision layout): 143,667,240 params at 1000 classes",
)
register_model(
    "vgg19_bn", functools.partial(VGG, num_classes=1000, stage_sizes=(2, 2, 4, 4, 4), norm="batch"),
    description="VGG-19 with BatchNorm (torchvision layout): 143,678,248 params at 1000 classes",
)

__all__ = ["VGG"]
