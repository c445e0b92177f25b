"""Readers that turn a dataset's official files into uint8 NHWC arrays, and TFDS.

    idx.py          MNIST, Fashion-MNIST: the IDX .gz files (Debian's re-headered copies accepted)
    cifar.py        CIFAR-10/100: binary or python tarballs, or their extracted folders
    svhn.py         SVHN cropped: the *_32x32.mat files
    tfds_source.py  TensorFlow Datasets: prepare (online or from the official files) and read
    locate.py       the folders searched, md5 helpers

Every archive reader has `read(dataset, split, *, data_dir=None, verify=True) -> (images, labels)` and
`ways_to_get(dataset) -> list[str]`, and raises DatasetNotFoundError naming the folders searched.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import numpy as np

from jaxcnn.data.dataset import DatasetNotFoundError, dataset_info
from jaxcnn.data.sources import cifar, idx, svhn, tfds_source
from jaxcnn.data.sources.idx import restore_official_gzip
from jaxcnn.data.sources.locate import DATA_DIR_ENV, search_dirs

ARCHIVE_READERS: dict[str, ModuleType] = {
    "mnist": idx,
    "fashion_mnist": idx,
    "cifar10": cifar,
    "cifar100": cifar,
    "svhn_cropped": svhn,
}


def read_archive(name: str, split: str, *, data_dir: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, H, W, C], labels int32 [N]) from the official files, via the dataset's reader."""
    dataset_info(name)
    if name not in ARCHIVE_READERS:
        raise DatasetNotFoundError(
            name, split, [f"There is no archive reader for {name!r}; it is read through TFDS."], ways_to_get(name)
        )
    return ARCHIVE_READERS[name].read(name, split, data_dir=data_dir)


def ways_to_get(name: str) -> list[str]:
    """Every way to get `name`, one line each (the remedies of DatasetNotFoundError)."""
    if name in ARCHIVE_READERS:
        return ARCHIVE_READERS[name].ways_to_get(name)
    return tfds_source.ways_to_get(name)  # the datasets read only through TFDS


__all__ = [
    "ARCHIVE_READERS",
    "DATA_DIR_ENV",
    "cifar",
    "idx",
    "read_archive",
    "restore_official_gzip",
    "search_dirs",
    "svhn",
    "tfds_source",
    "ways_to_get",
]
