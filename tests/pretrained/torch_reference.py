"""PyTorch references for the pretrained-weights tests: torchvision and timm models with random weights.

torchvision's wheel on the registry is built against the CUDA PyTorch; with the CPU PyTorch its C++ ops do not load.
Its models are pure Python: an empty `torchvision._meta_registrations` module lets them import (shared/NOTES.md).
"""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest


def import_torch():
    """(torch, torchvision, timm), or skips the test saying which package is missing and how to get it."""
    try:
        import torch
    except ImportError:
        pytest.skip("PyTorch is not installed (./setup.sh --tests installs torch==2.13.0 where a wheel exists for this "
                    f"Python; Python {sys.version_info.major}.{sys.version_info.minor} has none here)")
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    try:
        import timm
        import torchvision
    except ImportError as e:
        pytest.skip(f"torchvision or timm is not installed ({e}); ./setup.sh --tests installs torchvision==0.28.0 "
                    "and timm==1.0.31 without their dependencies")
    return torch, torchvision, timm


def build(source: str, arch: str, num_classes: int = 1000, seed: int = 0):
    """A torchvision or timm model in eval mode with random weights and random BatchNorm statistics and affine
    parameters (PyTorch's initial statistics, mean 0 and variance 1, would hide a mix-up of the two)."""
    torch, torchvision, timm = import_torch()
    torch.manual_seed(seed)
    if source == "torchvision":
        # VGG's own init_weights would draw its 120M classifier weights a second time
        extra = {"init_weights": False} if arch.startswith("vgg") else {}
        model = torchvision.models.get_model(arch, num_classes=num_classes, **extra)
    else:
        model = timm.create_model(arch, pretrained=False, num_classes=num_classes)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
    return model.eval()


def logits(model, x_nhwc: np.ndarray) -> np.ndarray:
    """The PyTorch model's eval-mode logits of NHWC images."""
    torch, _, _ = import_torch()
    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))).numpy()


def save(model, path) -> None:
    """The state dict as .safetensors (safetensors.torch) or .pth (torch.save), by the suffix of `path`."""
    torch, _, _ = import_torch()
    state_dict = model.state_dict()
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    else:
        torch.save(state_dict, str(path))
