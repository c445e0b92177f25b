"""jaxcnn: convolutional networks as composable pure functions in JAX/Flax.

    import jaxcnn
    model = jaxcnn.create_model("resnet20", num_classes=10, pool="avg")
    jaxcnn.list_models("resnet*")
    print(jaxcnn.summary(model, (1, 32, 32, 3)))
    jaxcnn.run_experiment(jaxcnn.load_experiment("experiments/fashion_mnist_lenet5.py"), workdir="runs/fmnist")

`jaxcnn.train` is the training subpackage (state, optim, step, parallel, loop, checkpoint, transfer);
`jaxcnn.run_experiment` is its `loop.train`, the function `python -m jaxcnn train` calls.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["create_model", "list_models", "summary", "run_experiment", "load_experiment", "Config"]


def __getattr__(name: str) -> Any:
    # Lazy, so `import jaxcnn` (and the CLI's --help) stays fast and XLA flags can still be set before jax loads.
    if name in ("create_model", "list_models", "model_knobs"):
        from jaxcnn import models

        return getattr(models, name)
    if name == "summary":
        from jaxcnn.analysis.summary import summary

        return summary
    if name == "run_experiment":
        from jaxcnn.train.loop import train

        return train
    if name in ("analysis", "backends", "data", "models", "nn", "pretrained", "results", "train"):
        import importlib

        return importlib.import_module(f"jaxcnn.{name}")
    if name in ("load_experiment", "Config"):
        from jaxcnn import config

        return getattr(config, name)
    raise AttributeError(f"module 'jaxcnn' has no attribute {name!r}")
