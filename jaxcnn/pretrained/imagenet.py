"""ImageNet-1k: the 1000 class names and the evaluation transform of torchvision's pretrained weights.

    names = class_names()                           # ['tench', 'goldfish', ...], index = logit
    x = eval_transform(PIL.Image.open(path))        # float32 [224, 224, 3], normalised
    x = eval_transform(img, resize=232)             # torchvision's IMAGENET1K_V2 weights
    x = eval_transform(img, **timm_transform(pretrained_cfg))      # timm's settings: resnet50.a1_in1k resizes to
                                                                   # 235 (crop_pct 0.95), bicubic

The class names are torchvision's (``ResNet50_Weights.IMAGENET1K_V1.meta['categories']``), stored in
``imagenet_classes.txt`` beside this file.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any, Literal

import numpy as np

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
Interpolation = Literal["bilinear", "bicubic", "nearest"]


@functools.cache
def class_names() -> tuple[str, ...]:
    """The 1000 ImageNet class names, in the order of the logits."""
    names = (Path(__file__).with_name("imagenet_classes.txt")).read_text().splitlines()
    assert len(names) == 1000, f"imagenet_classes.txt has {len(names)} lines, expected 1000"
    return tuple(names)


def resized_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """(height, width) with the shorter side scaled to `short_side`, the longer rounded down (torchvision's rule)."""
    if width <= height:
        return int(short_side * height / width), short_side
    return short_side, int(short_side * width / height)


def eval_transform(image: Any, *, resize: int = 256, crop: int = 224, interpolation: Interpolation = "bilinear",
                   mean: tuple[float, ...] = MEAN, std: tuple[float, ...] = STD) -> np.ndarray:
    """torchvision's ImageNet evaluation transform of a PIL image: shorter side resized to `resize` (PIL's resampling,
    which antialiases as torchvision does on PIL images), centre `crop` x `crop`, scaled to [0, 1], normalised.

    Returns float32 ``[crop, crop, 3]`` (NHWC's HWC). Grey and RGBA images are converted to RGB first.
    """
    from PIL import Image

    if crop > resize:
        raise ValueError(f"crop={crop} is larger than resize={resize}; the crop must fit in the resized image")
    methods = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
               "nearest": Image.Resampling.NEAREST}
    if interpolation not in methods:
        raise ValueError(f"interpolation={interpolation!r}: use one of {', '.join(methods)}")
    image = image.convert("RGB")
    height, width = resized_size(image.height, image.width, resize)
    image = image.resize((width, height), methods[interpolation])
    top, left = int(round((height - crop) / 2.0)), int(round((width - crop) / 2.0))
    image = image.crop((left, top, left + crop, top + crop))
    x = np.asarray(image, np.float32) / 255.0
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def timm_transform(pretrained_cfg: dict[str, Any]) -> dict[str, Any]:
    """`eval_transform`'s arguments from a timm ``pretrained_cfg`` (the ``pretrained_cfg`` of a hub repo's
    config.json), as timm's evaluation transform uses it: crop = the input size, shorter side resized to
    ``floor(crop / crop_pct)`` with its interpolation, its mean and std."""
    crop = int(pretrained_cfg.get("input_size", (3, 224, 224))[-1])
    interpolation = pretrained_cfg.get("interpolation", "bilinear")
    return {
        "crop": crop,
        "resize": math.floor(crop / float(pretrained_cfg.get("crop_pct", 0.875))),
        "interpolation": interpolation if interpolation in ("bilinear", "bicubic", "nearest") else "bilinear",
        "mean": tuple(pretrained_cfg.get("mean", MEAN)),
        "std": tuple(pretrained_cfg.get("std", STD)),
    }


def load_image(path: str | Path, **transform: Any) -> np.ndarray:
    """`eval_transform` of the image file at `path` (any format PIL reads)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return eval_transform(image, **transform)
    except FileNotFoundError:
        raise FileNotFoundError(f"no image file {str(path)!r}") from None
    except UnidentifiedImageError:
        raise ValueError(f"{path}: not an image file PIL can read") from None


__all__ = ["MEAN", "STD", "class_names", "eval_transform", "load_image", "resized_size", "timm_transform"]
