"""PyTorch-pretrained weights (torchvision, timm) in jaxcnn's models: import, predict, fine-tune.

    model, variables = load_weights("torchvision:resnet50=/path/resnet50-0676ba61.pth")   # .pth needs torch
    model, variables = load_weights("timm:resnet50=/path/model.safetensors")              # no torch needed
    model, variables = load_weights("hf-hub:timm/resnet50.a1_in1k")                       # downloaded, cached
    logits = model.apply(variables, x)       # x: [N, 224, 224, 3] from imagenet.eval_transform

    python -m jaxcnn predict --weights SPEC IMAGE...             top-5 ImageNet classes
    python -m jaxcnn train EXP --set transfer.init_from=SPEC     fine-tune from the weights (new head re-initialised)

Modules: `spec` (parsing specs, finding and downloading files), `load` (reading .safetensors / .pth into state
dicts and variables), `convert` (name maps and layouts), `imagenet` (class names, evaluation transform),
`predict`. docs/pretrained.md says where to get weights and what each format needs.
"""

from jaxcnn.pretrained.convert import (
    TIMM_ARCHS,
    TORCHVISION_ARCHS,
    MissingPackageError,
    WeightsMismatchError,
    check_state_dict,
    convert_state_dict,
    name_map,
)
from jaxcnn.pretrained.load import load_weights, read_state_dict, read_weights
from jaxcnn.pretrained.spec import WeightsSpec, is_weights_spec, parse_spec

__all__ = [
    "TIMM_ARCHS",
    "TORCHVISION_ARCHS",
    "MissingPackageError",
    "WeightsMismatchError",
    "WeightsSpec",
    "check_state_dict",
    "convert_state_dict",
    "is_weights_spec",
    "load_weights",
    "name_map",
    "parse_spec",
    "read_state_dict",
    "read_weights",
]
