"""Classifying images with pretrained ImageNet weights.

    python -m jaxcnn predict --weights torchvision:resnet50=/path/resnet50-0676ba61.pth cat.jpg dog.png
    python -m jaxcnn predict --weights hf-hub:timm/resnet50.a1_in1k cat.jpg    # timm's transform, from config.json

    for path, top in zip(paths, predict("torchvision:resnet18=/path/resnet18.pth", paths)):
        print(path, top[0])             # Prediction(index=281, name='tabby', probability=0.62)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from jaxcnn.pretrained.imagenet import class_names, load_image, timm_transform
from jaxcnn.pretrained.spec import WeightsSpec, hub_pretrained_cfg, parse_spec


class Prediction(NamedTuple):
    index: int
    name: str
    probability: float


def top_k(logits: np.ndarray, k: int = 5, names: Sequence[str] | None = None) -> list[list[Prediction]]:
    """The k most probable classes of each row of `logits` ``[N, classes]`` (softmax), most probable first."""
    logits = np.asarray(logits, np.float64)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    out = []
    for row in probs:
        order = np.argsort(-row, kind="stable")[:k]
        out.append([Prediction(int(i), names[i] if names else f"class {i}", float(row[i])) for i in order])
    return out


def transform_for(spec: WeightsSpec, **given: Any) -> dict[str, Any]:
    """`imagenet.eval_transform`'s arguments for `spec`: those given (not None) win; then, for hub weights, timm's
    settings from the repo's cached config.json; else torchvision's (resize 256, crop 224, bilinear)."""
    given = {k: v for k, v in given.items() if v is not None}
    cfg = hub_pretrained_cfg(spec.location) if spec.source == "hf-hub" else None
    return {**(timm_transform(cfg) if cfg else {}), **given}


def predict(weights: str, images: Sequence[str | Path], *, k: int = 5, batch_size: int = 16,
            **transform: Any) -> list[list[Prediction]]:
    """Top-k predictions for each image file, with the model and weights of the spec `weights` (see
    `jaxcnn.pretrained.spec`); `transform` goes to `imagenet.eval_transform` (resize, crop, interpolation; see
    `transform_for` for the defaults)."""
    import jax

    from jaxcnn.pretrained.load import load_weights

    spec = parse_spec(weights)
    model, variables = load_weights(spec)
    transform = transform_for(spec, **transform)
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
    names = class_names() if model.num_classes == 1000 else None
    out: list[list[Prediction]] = []
    for start in range(0, len(images), batch_size):
        x = np.stack([load_image(p, **transform) for p in images[start:start + batch_size]])
        out += top_k(np.asarray(apply(variables, x)), k, names)
    return out


def format_predictions(images: Sequence[str | Path], predictions: list[list[Prediction]]) -> str:
    """One block per image: its path, then 'rank. probability  (index) name' lines."""
    lines = []
    for path, top in zip(images, predictions):
        lines.append(str(path))
        lines += [f"  {r}. {p.probability:.4f}  ({p.index}) {p.name}" for r, p in enumerate(top, 1)]
    return "\n".join(lines)


__all__ = ["Prediction", "format_predictions", "predict", "top_k", "transform_for"]
