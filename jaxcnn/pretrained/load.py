"""Reading PyTorch weights into jaxcnn: files to state dicts, specs to variables.

    state_dict = read_state_dict("resnet50.safetensors")        # {key: numpy array}; no PyTorch needed
    state_dict = read_state_dict("resnet50-0676ba61.pth")       # .pth / .pt / .bin: needs torch (jaxcnn[torch])
    model, variables = load_weights("torchvision:resnet50=/path/resnet50-0676ba61.pth")
    logits = model.apply(variables, x)                          # x: [N, 224, 224, 3], ImageNet-normalised

A ``.safetensors`` file is read with the ``safetensors`` package's NumPy API. A pickled ``.pth``/``.pt``/``.bin``
file is read with ``torch.load(..., weights_only=True)`` (tensors only, no code runs); a training checkpoint that
nests the weights under ``'state_dict'``, ``'model'`` or ``'model_state_dict'`` and the ``'module.'`` prefix of
``DataParallel`` are both unwrapped.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jaxcnn.pretrained.convert import MissingPackageError, convert_state_dict, num_classes
from jaxcnn.pretrained.spec import WeightsSpec, parse_spec, weights_file

PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
_NESTED = ("state_dict", "model", "model_state_dict")


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    try:
        from safetensors.numpy import load_file
    except ImportError:
        raise MissingPackageError(
            f"{path}: reading .safetensors files needs the safetensors package: pip install 'jaxcnn[pretrained]' "
            "(or pip install safetensors)"
        ) from None
    try:
        return dict(load_file(str(path)))
    except Exception as e:  # safetensors raises its own SafetensorError for damaged or non-safetensors files
        if "bf16" in str(e).lower() or "bfloat16" in str(e).lower():
            raise ValueError(
                f"{path}: holds bfloat16 tensors, which NumPy cannot read; save it in float32 "
                "(safetensors.torch.save_file({k: v.float() for k, v in sd.items()}, PATH)) or read it as .pth"
            ) from e
        raise ValueError(f"{path} is not a readable .safetensors file ({type(e).__name__}: {e})") from e


def _read_pickle(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise MissingPackageError(
            f"{path}: reading PyTorch's pickled {path.suffix} files needs PyTorch: pip install 'jaxcnn[torch]'. "
            "Where PyTorch cannot be installed, convert the file once on a machine that has it: python -c \"import "
            "torch; from safetensors.torch import save_file; save_file(torch.load('IN.pth', map_location='cpu'), "
            "'OUT.safetensors')\" and pass the .safetensors file, which needs only the safetensors package"
        ) from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle and zip errors of several types
        raise ValueError(f"{path} is not a PyTorch weights file torch.load reads ({type(e).__name__}: {e})") from e
    for key in _NESTED:
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict; save model.state_dict()")
    out = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor; save model.state_dict()")
        value = value.detach()
        out[key] = (value.float() if value.is_floating_point() else value).numpy()
    return out


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """{key: numpy array} from a ``.safetensors`` file (no PyTorch) or a pickled ``.pth``/``.pt``/``.bin`` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file {str(path)!r}")
    if path.suffix == ".safetensors":
        state_dict = _read_safetensors(path)
    elif path.suffix in PICKLE_SUFFIXES:
        state_dict = _read_pickle(path)
    else:
        raise ValueError(
            f"{path}: unknown weights format {path.suffix!r}; give a .safetensors file or a PyTorch "
            f"{'/'.join(PICKLE_SUFFIXES)} file"
        )
    if state_dict and all(k.startswith("module.") for k in state_dict):  # saved from DataParallel
        state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    return state_dict


def read_weights(spec: str | WeightsSpec) -> tuple[dict[str, Any], WeightsSpec, int]:
    """(jaxcnn variables {'params', 'batch_stats'} as numpy, the parsed spec, the number of classes) of a spec."""
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    path = weights_file(spec)
    state_dict = read_state_dict(path)
    variables = convert_state_dict(state_dict, spec.arch, spec.key_names, where=f"{spec} ({path})")
    return variables, spec, num_classes(state_dict, spec.arch, spec.key_names)


def load_weights(spec: str | WeightsSpec, **knobs: Any) -> tuple[Any, dict[str, Any]]:
    """(the jaxcnn model, its variables as jax arrays) for a weights spec; `knobs` go to `create_model`."""
    import jax
    import jax.numpy as jnp

    from jaxcnn.models import create_model

    variables, spec, classes = read_weights(spec)
    model = create_model(spec.arch, num_classes=classes, **knobs)
    return model, jax.tree_util.tree_map(jnp.asarray, variables)


__all__ = ["load_weights", "read_state_dict", "read_weights"]
