"""Residual networks: CIFAR ResNets (option A), pre-activation, wide and ResNeXt variants, ImageNet ResNets.

One module, `ResNet`, covers them all through its knobs; the registered names are partials of it:

- CIFAR ResNet-20/32/44/56/110/1202 (He et al., 2015, Sec. 4.2): 3x3 conv stem with 16 channels, three stages of
  basic blocks with 16/32/64 channels, option-A shortcuts (stride subsampling + zero channels, no parameters).
  ``plain20`` ... are the same networks without shortcuts (``residual=False``), the paper's degradation ablation.
- Pre-activation ResNets (He et al., 2016, "Identity Mappings"): BN-ReLU before each conv, a final BN-ReLU
  before the pooling, and 1x1 projection shortcuts without BN where the shape changes. ``preact_resnet110``
  (basic), ``preact_resnet164`` (bottleneck), ``preact_resnet18`` (the CIFAR ResNet-18 with 64..512 channels).
- Wide ResNets (Zagoruyko & Komodakis, 2016): pre-activation basic blocks, widths 16k/32k/64k, ``wrn16_4``,
  ``wrn28_10`` (36,479,194 parameters at 10 classes).
- ResNeXt-29 8x64d (Xie et al., 2017, CIFAR): grouped bottlenecks with 8 groups of width 64.
- ImageNet ResNet-18/34/50/101/152, ResNeXt-50 32x4d, Wide ResNet-50-2 as torchvision builds them (7x7 stride-2
  stem and 3x3 max pool, option-B projection shortcuts with BN, the stride on the 3x3 conv of bottlenecks);
  parameter counts equal torchvision's at 1000 classes.
"""

from __future__ import annotations

import functools
from typing import Literal

import flax.linen as nn
import jax

from jaxcnn.models.base import ClassifierBase, DownsampleKind, HeadKind
from jaxcnn.models.registry import register_model
from jaxcnn.nn import layers
from jaxcnn.nn.blocks import (
    BasicBlock,
    BottleneckBlock,
    ConvNormAct,
    ShortcutKind,
    check_downsample,
    conv_padding,
    norm_act,
)


class ResNet(ClassifierBase):
    """A residual network: stem, stages of residual blocks, (final norm-act if pre-activation), head.

    Knobs (beyond `ClassifierBase`'s):
      stage_sizes / stage_widths: blocks per stage and each stage's width ("planes": a bottleneck outputs 4x).
        Stage 1 keeps the stem's resolution, each later stage halves it.
      block: 'basic' (two kxk convs) or 'bottleneck' (1x1, kxk, 1x1).
      stem: 'cifar' (3x3 conv, stride 1) or 'imagenet' (7x7 conv stride 2, then a 3x3 stride-2 pool of kind
        `pool`); `stem_width` channels (not scaled by `width`).
      width: multiplies every stage width (the k of wide ResNets).
      kernel_size: of the blocks' spatial convs.
      shortcut: 'A' zero-pad channels + stride subsampling (no parameters), 'B' 1x1 projection conv (+ norm
        unless pre-activation) where the shape changes, the identity elsewhere.
      residual: False removes the shortcuts (a plain network).
      preact: pre-activation blocks (norm-act before each conv; stem without norm; final norm-act).
      groups / base_width: grouped convs (ResNeXt): bottleneck inner width int(planes * base_width / 64) * groups.
      downsample: 'conv' (stride-2 first block of a stage) or 'pool' (a 2x2 stride-2 pool of kind `pool` before
        the stage, blocks at stride 1).
      head / head_hidden / dropout: the classifier head (`jaxcnn.models.heads.ClassifierHead`).
      block_dropout: dropout between the convs of each block (wide ResNets).
      zero_init_residual: start the last norm of each residual branch at 0 (Goyal et al., 2017).

    x: ``[N, H, W, C]`` -> logits ``[N, num_classes]``. Features: ``stem``, ``stage1`` ... ``stageK``,
    ``pre_logits``, ``logits``.
    """

    stage_sizes: tuple[int, ...] = (3, 3, 3)
    stage_widths: tuple[int, ...] = (16, 32, 64)
    block: Literal["basic", "bottleneck"] = "basic"
    stem: Literal["cifar", "imagenet"] = "cifar"
    stem_width: int = 16
    width: float = 1.0
    kernel_size: int = 3
    shortcut: ShortcutKind = "A"
    residual: bool = True
    preact: bool = False
    groups: int = 1
    base_width: int = 64
    downsample: DownsampleKind = "conv"
    pool: layers.PoolKind = "max"
    head: HeadKind = "gap"
    head_hidden: tuple[int, ...] = ()
    block_dropout: float = 0.0
    zero_init_residual: bool = False

    def check_knobs(self) -> None:
        super().check_knobs()
        self.check_same_length(stage_sizes=self.stage_sizes, stage_widths=self.stage_widths)
        if self.stem_width < 1 or self.groups < 1 or self.base_width < 1:
            self._fail(f"stem_width={self.stem_width}, groups={self.groups}, base_width={self.base_width}: "
                       "each must be positive")
        if not 0.0 <= self.block_dropout < 1.0:
            self._fail(f"block_dropout={self.block_dropout} must be in [0, 1)")
        if self.block == "basic" and self.groups > 1:
            widths = {"stem_width": self.stem_width} | {
                f"stage{i + 1}": self.scaled(w) for i, w in enumerate(self.stage_widths)
            }
            bad = {k: v for k, v in widths.items() if v % self.groups}
            if bad:
                self._fail(
                    f"groups={self.groups} must divide the channels of every grouped conv, but "
                    + ", ".join(f"{k} has {v}" for k, v in bad.items())
                    + "; choose groups dividing all widths (or block='bottleneck', whose inner width is a "
                    "multiple of groups)"
                )
        if self.zero_init_residual:
            why = (
                "pre-activation blocks end in a conv, not a norm" if self.preact
                else "norm='none' has no scale to zero" if self.norm == "none"
                else "without shortcuts (residual=False) it would zero the whole signal" if not self.residual
                else None
            )
            if why:
                self._fail(f"zero_init_residual=True does not apply: {why}; leave it False")

    @nn.compact
    def __call__(
        self, x: jax.Array, train: bool = False, return_features: bool = False
    ) -> jax.Array | dict[str, jax.Array]:
        x = self.prepare_input(x)
        input_shape = tuple(x.shape)
        name = type(self).__name__
        conv, norm, act = self.conv_def(), self.norm_def(train), self.act_fn
        features = {}

        if self.stem == "imagenet":
            check_downsample(x, 2, f"{name} stem conv (input {input_shape})")
            x = ConvNormAct(self.stem_width, 7, strides=2, conv=conv, norm=norm, act=act, pool_follows=True,
                            name="stem")(x)
            check_downsample(x, 2, f"{name} stem pool (input {input_shape})")
            x = layers.Pool2d(self.pool, window_shape=3, strides=2, padding=1, name="stem_pool")(x)
        elif self.preact:
            x = conv(self.stem_width, kernel_size=3, padding=conv_padding(3), name="stem")(x)
        else:
            x = ConvNormAct(self.stem_width, 3, conv=conv, norm=norm, act=act, name="stem")(x)
        features["stem"] = x

        block_cls = BasicBlock if self.block == "basic" else functools.partial(
            BottleneckBlock, base_width=self.base_width
        )
        block = functools.partial(
            block_cls, kernel_size=self.kernel_size, groups=self.groups, shortcut=self.shortcut,
            residual=self.residual, preact=self.preact, zero_init_residual=self.zero_init_residual,
            dropout=self.block_dropout, conv=conv, norm=norm, act=act,
        )
        for i, (size, planes) in enumerate(zip(self.stage_sizes, self.stage_widths)):
            stage = f"stage{i + 1}"
            strides = 1 if i == 0 else 2
            where = f"{name} {stage} (input {input_shape})"
            check_downsample(x, strides, where)
            if strides > 1 and self.downsample == "pool":
                x = layers.Pool2d(self.pool, window_shape=2, strides=2, name=f"{stage}_pool")(x)
                strides = 1
            for j in range(size):
                x = block(self.scaled(planes), strides=strides if j == 0 else 1, name=f"{stage}_block{j + 1}")(
                    x, train
                )
            features[stage] = x

        if self.preact:
            x = norm_act(norm, act, name="final_norm")(x)
        return self.classify(x, train, features, return_features)


# ---------------------------------------------------------------------------------------------------------
# The registered sizes
# ---------------------------------------------------------------------------------------------------------

_CIFAR = functools.partial(ResNet, num_classes=10, stem="cifar", stem_width=16, stage_widths=(16, 32, 64))
register_model(
    "resnet20", functools.partial(_CIFAR, stage_sizes=(3, 3, 3), shortcut="A"),
    description="CIFAR ResNet-20 (He et al. 2015): 3 stages x 3 basic blocks, option-A shortcuts",
)
register_model(
    "resnet32", functools.partial(_CIFAR, stage_sizes=(5, 5, 5), shortcut="A"),
    description="CIFAR ResNet-32 (He et al. 2015): 3 stages x 5 basic blocks, option-A shortcuts",
)
register_model(
    "resnet44", functools.partial(_CIFAR, stage_sizes=(7, 7, 7), shortcut="A"),
    description="CIFAR ResNet-44 (He et al. 2015): 3 stages x 7 basic blocks, option-A shortcuts",
)
register_model(
    "resnet56", functools.partial(_CIFAR, stage_sizes=(9, 9, 9), shortcut="A"),
    description="CIFAR ResNet-56 (He et al. 2015): 3 stages x 9 basic blocks, option-A shortcuts",
)
register_model(
    "resnet110", functools.partial(_CIFAR, stage_sizes=(18, 18, 18), shortcut="A"),
    description="CIFAR ResNet-110 (He et al. 2015): 3 stages x 18 basic blocks, option-A shortcuts",
)
register_model(
    "resnet1202", functools.partial(_CIFAR, stage_sizes=(200, 200, 200), shortcut="A"),
    description="CIFAR ResNet-1202 (He et al. 2015): 3 stages x 200 basic blocks, option-A shortcuts",
)
register_model(
    "plain20", functools.partial(_CIFAR, stage_sizes=(3, 3, 3), residual=False),
    description="CIFAR plain-20: resnet20 without shortcuts (the degradation ablation)",
)
register_model(
    "plain32", functools.partial(_CIFAR, stage_sizes=(5, 5, 5), residual=False),
    description="CIFAR plain-32: resnet32 without shortcuts (the degradation ablation)",
)
register_model(
    "plain44", functools.partial(_CIFAR, stage_sizes=(7, 7, 7), residual=False),
    description="CIFAR plain-44: resnet44 without shortcuts (the degradation ablation)",
)
register_model(
    "plain56", functools.partial(_CIFAR, stage_sizes=(9, 9, 9), residual=False),
    description="CIFAR plain-56: resnet56 without shortcuts (the degradation ablation)",
)
register_model(
    "plain110", functools.partial(_CIFAR, stage_sizes=(18, 18, 18), residual=False),
    description="CIFAR plain-110: resnet110 without shortcuts (the degradation ablation)",
)

_PREACT = functools.partial(_CIFAR, preact=True, shortcut="B")
register_model(
    "preact_resnet110", functools.partial(_PREACT, stage_sizes=(18, 18, 18)),
    description="CIFAR pre-activation ResNet-110 (He et al. 2016, Identity Mappings), basic blocks",
)
register_model(
    "preact_resnet164", functools.partial(_PREACT, stage_sizes=(18, 18, 18), block="bottleneck"),
    description="CIFAR pre-activation ResNet-164 (He et al. 2016), bottleneck blocks, 64/128/256 outputs",
)
register_model(
    "preact_resnet18",
    functools.partial(_PREACT, stage_sizes=(2, 2, 2, 2), stage_widths=(64, 128, 256, 512), stem_width=64),
    description="CIFAR pre-activation ResNet-18: 3x3 stem, 4 stages of 64..512 channels",
)
register_model(
    "wrn16_4", functools.partial(_PREACT, stage_sizes=(2, 2, 2), width=4.0),
    description="Wide ResNet-16-4 (Zagoruyko & Komodakis 2016), CIFAR",
)
register_model(
    "wrn28_10", functools.partial(_PREACT, stage_sizes=(4, 4, 4), width=10.0),
    description="Wide ResNet-28-10 (Zagoruyko & Komodakis 2016), CIFAR: 36,479,194 params at 10 classes",
)
register_model(
    "resnext29_8x64d",
    functools.partial(
        _CIFAR, stage_sizes=(3, 3, 3), stage_widths=(64, 128, 256), stem_width=64, block="bottleneck",
        shortcut="B", groups=8, base_width=64,
    ),
    description="CIFAR ResNeXt-29 8x64d (Xie et al. 2017): grouped bottlenecks, cardinality 8, width 64",
)

_IMAGENET = functools.partial(
    ResNet, num_classes=1000, stem="imagenet", stem_width=64, stage_widths=(64, 128, 256, 512), shortcut="B"
)
register_model(
    "resnet18", functools.partial(_IMAGENET, stage_sizes=(2, 2, 2, 2)),
    description="ImageNet resnet18 as torchvision builds it: 11,689,512 params at 1000 classes",
)
register_model(
    "resnet34", functools.partial(_IMAGENET, stage_sizes=(3, 4, 6, 3)),
    description="ImageNet resnet34 as torchvision builds it: 21,797,672 params at 1000 classes",
)
register_model(
    "resnet50", functools.partial(_IMAGENET, stage_sizes=(3, 4, 6, 3), block="bottleneck"),
    description="ImageNet resnet50 as torchvision builds it: 25,557,032 params at 1000 classes",
)
register_model(
    "resnet101", functools.partial(_IMAGENET, stage_sizes=(3, 4, 23, 3), block="bottleneck"),
    description="ImageNet resnet101 as torchvision builds it: 44,549,160 params at 1000 classes",
)
register_model(
    "resnet152", functools.partial(_IMAGENET, stage_sizes=(3, 8, 36, 3), block="bottleneck"),
    description="ImageNet resnet152 as torchvision builds it: 60,192,808 params at 1000 classes",
)
register_model(
    "resnext50_32x4d",
    functools.partial(_IMAGENET, stage_sizes=(3, 4, 6, 3), block="bottleneck", groups=32, base_width=4),
    description="ImageNet resnext50_32x4d as torchvision builds it: 25,028,904 params at 1000 classes",
)
register_model(
    "wide_resnet50_2", functools.partial(_IMAGENET, stage_sizes=(3, 4, 6, 3), block="bottleneck", base_width=128),
    description="ImageNet wide_resnet50_2 as torchvision builds it: 68,883,240 params at 1000 classes",
)

__all__ = ["ResNet"]
