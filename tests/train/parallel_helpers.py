"""Shared by tests/train/test_parallel.py and the multi-host worker: the small ResNet and a cheap deterministic init.

`numpy_variables` fills a model's variables from NumPy instead of running `model.init`: compiling the zoo's
initialisers costs ~10 s of CPU per process, the shapes (from `jax.eval_shape`) cost nothing, and the tests only
need some fixed, non-trivial starting point.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

IMAGE = (8, 8, 3)
CLASSES = 3
SMALL_RESNET = {"num_classes": CLASSES, "stage_sizes": (1, 1), "stage_widths": (8, 16), "stem_width": 8}


def small_resnet(**knobs: Any) -> Any:
    """The zoo's CIFAR ResNet cut to one basic block in each of two stages (option-A downsampling), BatchNorm."""
    from jaxcnn.models import create_model

    return create_model("resnet20", **SMALL_RESNET, **knobs)


def numpy_variables(model: Any, image_shape: tuple[int, ...] = IMAGE, seed: int = 0) -> dict[str, Any]:
    """{'params': ..., 'batch_stats': ...} as float32 NumPy: kernels He-normal, norm scales 1 ± 0.1, biases
    N(0, 0.1²), BatchNorm statistics at their initial mean 0 and variance 1."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), np.zeros((1, *image_shape), np.float32)))
    rng = np.random.default_rng(seed)

    def fill(path: tuple[Any, ...], leaf: Any) -> np.ndarray:
        collection, name = path[0].key, path[-1].key
        if collection == "batch_stats":
            return np.full(leaf.shape, 1.0 if name == "var" else 0.0, np.float32)
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            return (rng.normal(size=leaf.shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        if name == "scale":
            return (1.0 + 0.1 * rng.normal(size=leaf.shape)).astype(np.float32)
        return (0.1 * rng.normal(size=leaf.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, dict(shapes))
