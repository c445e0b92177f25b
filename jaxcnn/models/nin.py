"""Network in Network (Lin et al., 2013), the CIFAR-10 model: three mlpconv blocks and global average pooling."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax

from jaxcnn.models.base import ClassifierBase
from jaxcnn.models.heads import ClassifierHead
from jaxcnn.models.registry import register_model
from jaxcnn.nn import layers
from jaxcnn.nn.blocks import NiNBlock, check_downsample


class NiN(ClassifierBase):
    """mlpconv(5x5·192, 1x1·160, 1x1·96) -> pool -> dropout -> mlpconv(5x5·192, 1x1·192, 1x1·192) -> pool ->
    dropout -> mlpconv(3x3·192, 1x1·192) -> 1x1 conv to ``num_classes`` class maps -> global average pool.

    As in the paper's CIFAR-10 model there are no dense layers: the last 1x1 conv (``head/logits``) makes one map
    per class and their averages are the logits (966,986 parameters at 10 classes with ``norm='none'``). Pools are
    3x3 stride 2 ('same' padding: 32 -> 16 -> 8, Caffe's ceil-mode sizes), both of kind ``pool`` (the Caffe model
    averaged in the second). ``dropout`` (0.5) follows each pool. The class maps get no ReLU (the Caffe model had one).
    ``width`` scales every hidden channel count.

    x: ``[N, H, W, C]`` -> logits ``[N, num_classes]``. Features: ``block1``, ``block2``, ``block3``, ``class_maps``,
    ``pre_logits`` (the averaged ``block3``), ``logits``.
    """

    norm: layers.NormKind = "none"
    pool: layers.PoolKind = "max"
    width: float = 1.0
    dropout: float = 0.5

    @nn.compact
    def __call__(
        self, x: jax.Array, train: bool = False, return_features: bool = False
    ) -> jax.Array | dict[str, jax.Array]:
        x = self.prepare_input(x)
        input_shape = tuple(x.shape)
        conv, norm, act = self.conv_def(), self.norm_def(train), self.act_fn
        features = {}
        for i, (channels, k) in enumerate((((192, 160, 96), 5), ((192, 192, 192), 5), ((192, 192), 3))):
            name = f"block{i + 1}"
            x = NiNBlock(tuple(self.scaled(c) for c in channels), k, conv=conv, norm=norm, act=act, name=name)(x)
            if i < 2:
                check_downsample(x, 2, f"NiN {name} pool (input {input_shape})")
                x = layers.Pool2d(self.pool, window_shape=3, strides=2, padding="same", name=f"{name}_pool")(x)
                x = nn.Dropout(self.dropout)(x, deterministic=not train)
            features[name] = x
        return self.classify(x, train, features, return_features)

    def head_module(self) -> ClassifierHead:
        """A 1x1 conv to one map per class (biased, initialised like the other convs), averaged into the logits."""
        class_map_conv = functools.partial(self.conv_def(use_bias=True), kernel_size=1, padding=0)
        return ClassifierHead(self.num_classes, pool="gap", class_maps=True, dense=class_map_conv, name="head")


register_model("nin", NiN, description="Network in Network (CIFAR-10 model, GAP head): 966,986 params at 10 classes")

__all__ = ["NiN"]
