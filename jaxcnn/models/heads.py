"""The classifier head every model in the zoo ends with: feature map -> pooled features -> hidden layers -> logits.

    head = ClassifierHead(10, pool="flatten", pool_size=7, hidden=(4096, 4096), dropout=0.5, name="head")
    features, logits = head(x, train)          # x: [N, H, W, C] (or [N, D]); features['pre_logits']: [N, D']

The knobs cover the heads of the classic networks: global average pooling and one dense layer (ResNet, GoogLeNet),
flatten after an adaptive average pool and 4096-4096 hidden layers (torchvision's AlexNet and VGG), flatten and
120-84 (LeNet-5), and class maps averaged into logits (Network in Network). Submodules are ``fc1``, ``fc2``, ...
and ``logits``, so a model's head parameters are ``head/fc1/kernel`` ... ``head/logits/bias``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcnn.nn import layers
from jaxcnn.nn.blocks import adaptive_avg_pool

HeadPool = Literal["gap", "gmp", "flatten"]
FlattenOrder = Literal["hwc", "chw"]
DropoutPosition = Literal["after_hidden", "before_hidden"]
ModuleDef = Any


class ClassifierHead(nn.Module):
    """Feature map to logits: pool, hidden dense layers, logits.

    Attributes:
      num_classes: size of the logits.
      pool: ``'gap'`` global average pool ``[N, H, W, C] -> [N, C]``; ``'gmp'`` global max pool; ``'flatten'``
        ``[N, H * W * C]``, after `adaptive_avg_pool` to ``pool_size x pool_size`` when `pool_size` is given
        (torchvision's VGG and AlexNet; `pool_size` is not used by the global pools). ``[N, D]`` inputs are
        used as they are.
      flatten_order: the order of the flattened features: ``'hwc'`` (NHWC memory order) or ``'chw'`` (channel
        major, as PyTorch flattens NCHW maps: the order a torchvision classifier's first weight expects).
      hidden: sizes of the hidden dense layers ``fc1``, ``fc2``, ...; each is dense, act.
      dropout: on the input of every dense layer but the first: the hidden outputs, or the pooled features
        when there is no hidden layer; with ``dropout_position='before_hidden'`` on the input of every hidden
        layer instead, and not on the logits layer's (torchvision's AlexNet: dropout, fc1, relu, dropout, fc2,
        relu, logits). Evaluation is the same either way.
      act: activation of the hidden layers.
      dense: the dense layer factory, called as ``dense(units, name=...)`` (the model's dtypes set).
      class_maps: apply the logits layer at every position first, then pool the class maps (Network in
        Network: with ``dense`` a 1x1 convolution). Needs a global pool and no hidden layers.

    Returns ``(features, logits [N, num_classes])``: ``features['pre_logits']`` is the pooled input of the
    logits layer ``[N, D']`` (with `class_maps`: the pooled feature map), plus ``features['class_maps']``
    ``[N, H, W, num_classes]`` with `class_maps`.
    """

    num_classes: int
    pool: HeadPool = "gap"
    pool_size: int | None = None
    flatten_order: FlattenOrder = "hwc"
    hidden: tuple[int, ...] = ()
    dropout: float = 0.0
    dropout_position: DropoutPosition = "after_hidden"
    act: Callable[[jax.Array], jax.Array] = jax.nn.relu
    dense: ModuleDef = layers.Dense
    class_maps: bool = False

    def __post_init__(self) -> None:
        if self.pool not in ("gap", "gmp", "flatten"):
            raise ValueError(f"ClassifierHead: pool={self.pool!r} is not one of 'gap', 'gmp', 'flatten'")
        if self.flatten_order not in ("hwc", "chw"):
            raise ValueError(f"ClassifierHead: flatten_order={self.flatten_order!r} is not one of 'hwc', 'chw'")
        if self.dropout_position not in ("after_hidden", "before_hidden"):
            raise ValueError(f"ClassifierHead: dropout_position={self.dropout_position!r} is not one of "
                             "'after_hidden', 'before_hidden'")
        if self.class_maps and (self.pool == "flatten" or self.hidden):
            raise ValueError(
                f"ClassifierHead: class_maps=True needs pool='gap' or 'gmp' and hidden=(), got pool={self.pool!r}, "
                f"hidden={self.hidden}"
            )
        super().__post_init__()

    def _pool(self, x: jax.Array) -> jax.Array:
        if x.ndim == 2:
            return x
        if self.pool == "gap":
            return jnp.mean(x, axis=(1, 2))
        if self.pool == "gmp":
            return jnp.max(x, axis=(1, 2))
        if self.pool_size is not None:
            x = adaptive_avg_pool(x, (self.pool_size, self.pool_size))
        if self.flatten_order == "chw":
            x = jnp.transpose(x, (0, 3, 1, 2))
        return x.reshape(x.shape[0], -1)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> tuple[dict[str, jax.Array], jax.Array]:
        if x.ndim not in (2, 4) or (self.class_maps and x.ndim != 4):
            expected = "[N, H, W, C]" if self.class_maps else "[N, H, W, C] or [N, D]"
            raise ValueError(f"ClassifierHead expects {expected}, got {tuple(x.shape)}")
        drop = functools.partial(nn.Dropout(self.dropout), deterministic=not train)
        if self.class_maps:
            maps = self.dense(self.num_classes, name="logits")(drop(x))
            return {"class_maps": maps, "pre_logits": self._pool(x)}, self._pool(maps)
        x = self._pool(x)
        before = self.dropout_position == "before_hidden" and bool(self.hidden)
        for i, units in enumerate(self.hidden):
            x = self.act(self.dense(units, name=f"fc{i + 1}")(drop(x) if (i or before) else x))
        return {"pre_logits": x}, self.dense(self.num_classes, name="logits")(x if before else drop(x))


__all__ = ["ClassifierHead", "DropoutPosition", "FlattenOrder", "HeadPool"]
