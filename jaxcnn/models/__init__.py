"""The model zoo: `create_model(name, num_classes=..., **knobs)`, `list_models(pattern)`, `model_knobs(name)`.

    model = create_model("resnet20", num_classes=10, pool="avg", residual=False)
    variables = model.init(key, x)                               # x: float [N, H, W, C]
    logits = model.apply(variables, x, train=False)              # [N, num_classes], float32
    features = model.apply(variables, x, return_features=True)   # OrderedDict: 'stem', 'stage1', ..., 'logits'

One module per family, each registering its names when imported (which this package does):

- `mlp` (LeCun 1998 784-300-100-10), `lenet` (LeNet-5), `alexnet` (alexnet, alexnet_cifar),
  `vgg` (vgg11/13/16/19 and _bn), `googlenet` (Inception v1), `nin` (Network in Network),
- `resnet`: CIFAR resnet20..1202 and plain20..110, preact_resnet18/110/164, wrn16_4, wrn28_10, resnext29_8x64d,
  and torchvision's ImageNet resnet18..152, resnext50_32x4d, wide_resnet50_2.

The shared knobs and the calling convention are in `jaxcnn.models.base`; the blocks in `jaxcnn.nn.blocks`.
"""

from jaxcnn.models import alexnet, googlenet, lenet, mlp, nin, resnet, vgg  # noqa: F401  (registers the models)
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
