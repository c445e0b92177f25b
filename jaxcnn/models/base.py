"""What every model in the zoo shares: the common knobs, the layer factories built from them, the head.

Every model is called as

    logits = model.apply(variables, x, train=False)                       # x: float [N, H, W, C]
    logits, updates = model.apply(variables, x, train=True, rngs={'dropout': key}, mutable=['batch_stats'])
    features = model.apply(variables, x, return_features=True)            # {'stem': ..., 'logits': ...}

and returns float32 logits ``[N, num_classes]`` whatever the compute ``dtype``. BatchNorm statistics live in
the ``batch_stats`` collection; dropout draws from the ``'dropout'`` rng.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcnn.models.heads import ClassifierHead, HeadPool
from jaxcnn.models.registry import ModelConfigError
from jaxcnn.nn import layers

DTypeName = Literal["float32", "bfloat16"]
HeadKind = HeadPool  # the `head` knob: "gap", "gmp" (global max pool) or "flatten"
DownsampleKind = Literal["conv", "pool"]
ModuleDef = Any


class ClassifierBase(nn.Module):
    """Knobs every model takes.

    Attributes:
      num_classes: size of the logits.
      norm: 'batch', 'group', 'layer' or 'none' (see `jaxcnn.nn.layers.make_norm`). With 'none' the convolutions
        get a bias; with a norm they do not (the norm's shift replaces it), unless a model says otherwise.
      act: activation by name (`jaxcnn.nn.layers.ACTIVATIONS`).
      dropout: dropout rate in the classifier head (on the outputs of its hidden layers, or on the pooled
        features when it has none).
      dtype: compute dtype ('bfloat16' for mixed precision); parameters are stored in `param_dtype`; the logits
        are returned in float32.
      bn_momentum, bn_epsilon: BatchNorm's (flax's momentum: 0.9 here is PyTorch's 0.1).
      bn_axis_name: average the BatchNorm statistics over this pmap/shard_map axis (set by those strategies).
      bn_virtual_batch_size: ghost BatchNorm over slices of this many examples.
      norm_groups: the most groups GroupNorm uses (the largest divisor of the channels not above it).
      conv_init: the convolution kernels' initializer by name (`jaxcnn.nn.layers.KERNEL_INITS`): 'he_normal'
        (default), 'he_uniform', 'lecun_normal' or 'torch' (PyTorch's default, U(+-1/sqrt(fan_in))).
    """

    num_classes: int = 10
    norm: layers.NormKind = "batch"
    act: layers.Act = "relu"
    dropout: float = 0.0
    dtype: DTypeName = "float32"
    param_dtype: DTypeName = "float32"
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    bn_axis_name: str | None = None
    bn_virtual_batch_size: int | None = None
    norm_groups: int = 32
    conv_init: layers.KernelInit = "he_normal"

    def __post_init__(self) -> None:
        self.check_knobs()
        super().__post_init__()

    # --- checks, at construction --------------------------------------------------------------------------

    def _fail(self, message: str) -> None:
        raise ModelConfigError(f"{type(self).__name__}: {message}")

    def check_knobs(self) -> None:
        """Raises ModelConfigError for a combination of knobs that cannot work. Models extend it."""
        if self.num_classes < 1:
            self._fail(f"num_classes={self.num_classes} must be at least 1")
        if not 0.0 <= self.dropout < 1.0:
            self._fail(f"dropout={self.dropout} must be in [0, 1)")
        if not 0.0 <= self.bn_momentum < 1.0:
            self._fail(f"bn_momentum={self.bn_momentum} must be in [0, 1) (flax convention: 0.9 = PyTorch's 0.1)")
        if self.bn_epsilon <= 0:
            self._fail(f"bn_epsilon={self.bn_epsilon} must be positive")
        if self.bn_virtual_batch_size is not None and self.bn_virtual_batch_size < 1:
            self._fail(f"bn_virtual_batch_size={self.bn_virtual_batch_size} must be at least 1 (or None)")
        if self.norm_groups < 1:
            self._fail(f"norm_groups={self.norm_groups} must be at least 1")
        if self.conv_init not in layers.KERNEL_INITS:
            self._fail(f"conv_init={self.conv_init!r} is not one of {', '.join(layers.KERNEL_INITS)}")
        for knob in ("width", "kernel_size", "head_pool_size"):
            value = getattr(self, knob, None)
            if value is not None and value <= 0:
                self._fail(f"{knob}={value} must be positive")
        for knob in ("head_hidden", "stage_sizes", "stage_widths", "conv_channels", "kernel_sizes", "hidden"):
            value = getattr(self, knob, None)
            if value is not None and any(v < 1 for v in value):
                self._fail(f"{knob}={value}: every entry must be at least 1")

    def check_same_length(self, **tuples: tuple[int, ...]) -> None:
        """Fails unless the given tuple knobs are non-empty and of one length (e.g. one width per stage)."""
        if len({len(v) for v in tuples.values()}) != 1 or not next(iter(tuples.values())):
            given = " and ".join(f"{k}={v}" for k, v in tuples.items())
            self._fail(f"{given} must be non-empty and of the same length (one entry per stage)")

    # --- layer factories, for use inside __call__ ----------------------------------------------------------

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    def conv_def(self, **overrides: Any) -> ModuleDef:
        """`layers.Conv2d` with this model's dtypes; a bias only when there is no norm after it."""
        kwargs = {"use_bias": self.norm == "none", "dtype": self.compute_dtype,
                  "param_dtype": jnp.dtype(self.param_dtype), "kernel_init": layers.kernel_init(self.conv_init)}
        return functools.partial(layers.Conv2d, **{**kwargs, **overrides})

    def dense_def(self) -> ModuleDef:
        return functools.partial(layers.Dense, dtype=self.compute_dtype, param_dtype=jnp.dtype(self.param_dtype))

    def norm_def(self, train: bool) -> Callable[..., Callable[[jax.Array], jax.Array]]:
        """`layers.make_norm` with this model's norm knobs; call it with ``name=`` (and ``zero_init=``)."""
        return functools.partial(
            layers.make_norm,
            self.norm,
            train=train,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            axis_name=self.bn_axis_name,
            virtual_batch_size=self.bn_virtual_batch_size,
            num_groups=self.norm_groups,
            dtype=self.compute_dtype,
        )

    @property
    def act_fn(self) -> Callable[[jax.Array], jax.Array]:
        return layers.activation(self.act)

    def scaled(self, base: int) -> int:
        """`base` channels scaled by the model's `width` multiplier (at least 1)."""
        return max(1, round(base * getattr(self, "width", 1.0)))

    # --- input and output ----------------------------------------------------------------------------------

    def prepare_input(self, x: jax.Array) -> jax.Array:
        """Checks x is ``[N, H, W, C]`` and casts it to the compute dtype."""
        if getattr(x, "ndim", None) != 4:
            raise ValueError(
                f"{type(self).__name__} expects images of shape [N, H, W, C], got {tuple(jnp.shape(x))}; "
                "add the missing axes (x[None] for one image, x[..., None] for grey images without a channel axis)"
            )
        return jnp.asarray(x, self.compute_dtype)

    def finish(
        self, features: dict[str, jax.Array], logits: jax.Array, return_features: bool
    ) -> jax.Array | dict[str, jax.Array]:
        """float32 logits, or the features with them added under 'logits'.

        The features are a `collections.OrderedDict`: JAX keeps its order through jit and eval_shape (a plain
        dict comes back with sorted keys).
        """
        logits = logits.astype(jnp.float32)
        if return_features:
            return collections.OrderedDict([*features.items(), ("logits", logits)])
        return logits

    def head_module(self) -> ClassifierHead:
        """The head (submodule ``head``) from the model's ``head``, ``head_pool_size``, ``head_hidden`` and
        ``dropout`` knobs; a model without the first three gets GAP without hidden layers."""
        return ClassifierHead(
            self.num_classes,
            pool=getattr(self, "head", "gap"),
            pool_size=getattr(self, "head_pool_size", None),
            hidden=getattr(self, "head_hidden", ()),
            dropout=self.dropout,
            dropout_position=getattr(self, "head_dropout_position", "after_hidden"),
            act=self.act_fn,
            dense=self.dense_def(),
            name="head",
        )

    def classify(
        self, x: jax.Array, train: bool, features: dict[str, jax.Array], return_features: bool
    ) -> jax.Array | dict[str, jax.Array]:
        """`head_module` on ``x``, then `finish` (the head's features, ``pre_logits`` and the like, added)."""
        head_features, logits = self.head_module()(x, train)
        return self.finish({**features, **head_features}, logits, return_features)

__all__ = ["ClassifierBase", "DTypeName", "DownsampleKind", "HeadKind", "ModuleDef"]
