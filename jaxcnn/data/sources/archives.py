"""The archive reader of each dataset that has one (the others are read through TFDS only)."""

from __future__ import annotations

from types import ModuleType

from jaxcnn.data.sources import cifar, idx, svhn

ARCHIVE_READERS: dict[str, ModuleType] = {
    "mnist": idx,
    "fashion_mnist": idx,
    "cifar10": cifar,
    "cifar100": cifar,
    "svhn_cropped": svhn,
}

__all__ = ["ARCHIVE_READERS"]
