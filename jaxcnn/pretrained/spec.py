"""Weights specs: which PyTorch weights, for which architecture, from where.

    torchvision:resnet50=/path/resnet50-0676ba61.pth     a file saved from torchvision's model (.pth/.pt/.safetensors)
    timm:resnet50=/path/model.safetensors                a file saved from timm's model
    hf-hub:timm/resnet50.a1_in1k                         timm's weights on the Hugging Face hub (downloaded, cached)

`parse_spec` reads one; `weights_file` finds its file (downloading a hub file through `huggingface_hub` when it is
not cached yet). A string without one of these prefixes is not a spec (`is_weights_spec`): `transfer.init_from`
then reads it as a jaxcnn run folder or exported file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from jaxcnn.pretrained.convert import TIMM_ARCHS, MissingPackageError, check_arch

Source = Literal["torchvision", "timm", "hf-hub"]
PREFIXES: tuple[str, ...] = ("torchvision:", "timm:", "hf-hub:")
HUB_FILES: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")  # what timm's hub repos hold, preferred first

_FORMS = ("torchvision:ARCH=PATH (e.g. torchvision:resnet50=/path/resnet50.pth), timm:ARCH=PATH (e.g. "
          "timm:resnet50=/path/model.safetensors) or hf-hub:REPO (e.g. hf-hub:timm/resnet50.a1_in1k)")


@dataclass(frozen=True)
class WeightsSpec:
    """``source``: 'torchvision', 'timm' or 'hf-hub'; ``arch``: the jaxcnn model name (torchvision's); ``location``:
    a file path, or the hub repo ('timm/resnet50.a1_in1k'). ``key_names``: whose state-dict key names to expect."""

    source: Source
    arch: str
    location: str

    @property
    def key_names(self) -> str:
        return "torchvision" if self.source == "torchvision" else "timm"

    def __str__(self) -> str:
        if self.source == "hf-hub":
            return f"hf-hub:{self.location}"
        return f"{self.source}:{self.arch}={self.location}"


def is_weights_spec(text: str) -> bool:
    """True when `text` starts with one of the spec prefixes ('torchvision:', 'timm:', 'hf-hub:')."""
    return str(text).startswith(PREFIXES)


def parse_spec(text: str) -> WeightsSpec:
    """The WeightsSpec of `text`; ValueError naming the accepted forms when it is not one."""
    text = str(text)
    source, sep, rest = text.partition(":")
    if not sep or source not in ("torchvision", "timm", "hf-hub") or not rest:
        raise ValueError(f"{text!r} is not a weights spec; use {_FORMS}")
    if source == "hf-hub":
        repo = rest
        if repo.count("/") != 1 or not all(repo.split("/")):
            raise ValueError(f"{text!r}: a hub repo is OWNER/NAME, e.g. hf-hub:timm/resnet50.a1_in1k")
        arch = repo.split("/")[1].split(".")[0]  # timm names its repos ARCH.TAG
        if arch not in TIMM_ARCHS:
            raise ValueError(
                f"{text!r}: {arch!r} has no name map; timm weights load for {', '.join(TIMM_ARCHS)} "
                f"(hub repos timm/ARCH.TAG such as timm/resnet50.a1_in1k)"
            )
        return WeightsSpec("hf-hub", arch, repo)
    arch, sep, path = rest.partition("=")
    if not sep or not arch or not path:
        raise ValueError(f"{text!r}: give the architecture and the file, {source}:ARCH=PATH (all forms: {_FORMS})")
    check_arch(arch, source)
    return WeightsSpec(source, arch, path)  # type: ignore[arg-type]


def _hub_help(repo: str, cache: str) -> str:
    return (
        f"Online, jaxcnn downloads it into the Hugging Face cache ({cache}). Offline, either copy the cache folder "
        f"models--{repo.replace('/', '--')} from a machine where `python -c \"from huggingface_hub import "
        f"hf_hub_download; hf_hub_download('{repo}', 'model.safetensors')\"` ran into {cache}, or download "
        f"https://huggingface.co/{repo}/resolve/main/model.safetensors and pass the file as "
        f"timm:{repo.split('/')[1].split('.')[0]}=/path/to/model.safetensors"
    )


def hub_file(repo: str) -> Path:
    """The weights file of a hub repo: from the Hugging Face cache, else downloaded into it (``HF_HUB_OFFLINE=1``:
    the cache only). FileNotFoundError saying which file to put where when neither works."""
    try:
        from huggingface_hub import constants, hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    except ImportError:
        raise MissingPackageError(
            f"hf-hub:{repo} needs the huggingface_hub package: pip install 'jaxcnn[pretrained]' (or pass a file you "
            f"downloaded as timm:ARCH=/path/to/model.safetensors)"
        ) from None
    error: Exception | None = None
    for filename in HUB_FILES:  # the cache first: no network call when the file is there
        try:
            return Path(hf_hub_download(repo, filename, local_files_only=True))
        except LocalEntryNotFoundError as e:
            error = e
    if not constants.HF_HUB_OFFLINE:
        for filename in HUB_FILES:
            try:
                path = Path(hf_hub_download(repo, filename))
                try:  # timm's evaluation settings, for `predict` (hub_pretrained_cfg reads them from the cache)
                    hf_hub_download(repo, "config.json")
                except OSError:
                    pass
                return path
            except LocalEntryNotFoundError as e:  # no network (after huggingface_hub's retries): stop here
                error = e
                break
            except EntryNotFoundError as e:  # the repo has no file of this name: try the next
                error = e
            except OSError as e:  # other HTTP errors (unknown or gated repo)
                error = e
                break
    if constants.HF_HUB_OFFLINE:
        why = "HF_HUB_OFFLINE is set, so no download was tried"
    else:
        why = (f"the download failed ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}; "
               "HF_HUB_OFFLINE=1 skips the download attempt)")
    raise FileNotFoundError(
        f"hf-hub:{repo}: no {' or '.join(HUB_FILES)} in the Hugging Face cache, and {why}. "
        + _hub_help(repo, constants.HF_HUB_CACHE)
    )


def hub_pretrained_cfg(repo: str) -> dict | None:
    """The ``pretrained_cfg`` of a timm hub repo's config.json (input size, crop_pct, interpolation, mean, std) from
    the Hugging Face cache (`hub_file` puts it there with the weights); None where it is not cached."""
    try:
        from huggingface_hub import hf_hub_download

        config = json.loads(Path(hf_hub_download(repo, "config.json", local_files_only=True)).read_text())
    except (ImportError, OSError, ValueError):  # no huggingface_hub / not cached / not JSON
        return None
    cfg = config.get("pretrained_cfg") if isinstance(config, dict) else None
    return cfg if isinstance(cfg, dict) else None


def weights_file(spec: WeightsSpec) -> Path:
    """The local file holding `spec`'s weights (a hub file is downloaded and cached first)."""
    if spec.source == "hf-hub":
        return hub_file(spec.location)
    path = Path(spec.location).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"{spec}: no file {str(path)!r}. Download the weights (docs/pretrained.md lists torchvision's URLs and "
            f"timm's hub names) or save a state dict there (torch.save(model.state_dict(), PATH) or "
            f"safetensors.torch.save_file(model.state_dict(), PATH))"
        )
    return path


__all__ = ["PREFIXES", "WeightsSpec", "hub_file", "hub_pretrained_cfg", "is_weights_spec", "parse_spec",
           "weights_file"]
