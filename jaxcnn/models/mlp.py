"""Multilayer perceptron on flattened images (the fully connected baseline of LeCun et al., 1998)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcnn.models.base import ClassifierBase
from jaxcnn.models.registry import register
from jaxcnn.nn import layers
from jaxcnn.nn.blocks import norm_act


@register("mlp", description="MLP on flattened images; LeCun et al. (1998) 784-300-100-10: 266,610 params on 28x28x1")
class MLP(ClassifierBase):
    """Fully connected network: flatten, then for each hidden size dense -> norm -> act, then the logits.

    The default is LeCun et al. (1998)'s 300-100 network: 266,610 parameters on 28x28x1 inputs at 10 classes.
    ``width`` scales the hidden sizes; ``dropout`` acts on the input of every dense layer but the first.
    Submodules ``fc1``, ``norm1``, ``fc2``, ... and ``head/logits``. Features: ``block1`` ... (the hidden
    activations), ``pre_logits``, ``logits``. Default activation ReLU (``act='tanh'`` for the 1998 network).

    x: ``[N, H, W, C]`` (any shape ``[N, ...]`` is flattened) -> logits ``[N, num_classes]``.
    """

    norm: layers.NormKind = "none"
    hidden: tuple[int, ...] = (300, 100)
    width: float = 1.0

    @nn.compact
    def __call__(
        self, x: jax.Array, train: bool = False, return_features: bool = False
    ) -> jax.Array | dict[str, jax.Array]:
        if getattr(x, "ndim", 0) < 2:
            raise ValueError(f"MLP expects a batch [N, ...], got shape {tuple(jnp.shape(x))}")
        x = jnp.asarray(x, self.compute_dtype).reshape(x.shape[0], -1)
        dense, norm = self.dense_def(), self.norm_def(train)
        drop = nn.Dropout(self.dropout)
        features = {}
        for i, units in enumerate(self.hidden):
            if i:
                x = drop(x, deterministic=not train)
            x = norm_act(norm, self.act_fn, name=f"norm{i + 1}")(dense(self.scaled(units), name=f"fc{i + 1}")(x))
            features[f"block{i + 1}"] = x
        return self.classify(x, train, features, return_features)
