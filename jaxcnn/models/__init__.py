"""The model zoo: `create_model(name, num_classes=..., **knobs)`, `list_models(pattern)`, `model_knobs(name)`.

Importing this package registers every family (one module each).
"""

from jaxcnn.models.registry import (
    ModelConfigError,
    create_model,
    list_models,
    model_defaults,
    model_description,
    model_knobs,
    register,
    register_model,
)
from jaxcnn.models import alexnet, googlenet, lenet, mlp, nin, resnet, vgg  # noqa: E402,F401  (registers the models)

__all__ = [
    "ModelConfigError",
    "create_model",
    "list_models",
    "model_defaults",
    "model_description",
    "model_knobs",
    "register",
    "register_model",
]
