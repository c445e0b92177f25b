"""`load_split`, the one way to get a dataset, and the readers behind it: a dataset's official files into uint8
NHWC arrays, and TFDS.

    train = load_split("fashion_mnist", "train")             # ArrayDataset: uint8 [60000, 28, 28, 1], int32 [60000]
    imagenet = load_split("imagenet2012", "train", source="tfds")  # RandomAccessSource (decoded one at a time)

    idx.py          MNIST, Fashion-MNIST: the IDX .gz files (Debian's re-headered copies accepted)
    cifar.py        CIFAR-10/100: binary or python tarballs, or their extracted folders
    svhn.py         SVHN cropped: the *_32x32.mat files
    tfds_source.py  TensorFlow Datasets: prepare (online or from the official files) and read
    archives.py     which reader reads which dataset
    locate.py       the folders searched, md5 helpers

Every archive reader has `read(dataset, split, *, data_dir=None, verify=True) -> (images, labels)` and
`ways_to_get(dataset) -> list[str]`, and raises DatasetNotFoundError naming the folders searched. The imports run
one way: `jaxcnn.data.dataset` (the types) <- the readers <- this module.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from jaxcnn.data.dataset import (
    DATASET_INFO,
    ArrayDataset,
    DatasetNotFoundError,
    RandomAccessSource,
    Source,
    check_split,
    dataset_info,
)
from jaxcnn.data.sources import cifar, idx, svhn, tfds_source
from jaxcnn.data.sources.archives import ARCHIVE_READERS
from jaxcnn.data.sources.idx import restore_official_gzip
from jaxcnn.data.sources.locate import DATA_DIR_ENV, search_dirs
from jaxcnn.data.sources.tfds_source import ways_to_get


def read_archive(name: str, split: str, *, data_dir: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, H, W, C], labels int32 [N]) from the official files, via the dataset's reader."""
    dataset_info(name)
    if name not in ARCHIVE_READERS:
        raise DatasetNotFoundError(
            name, split, [f"There is no archive reader for {name!r}; it is read through TFDS."], ways_to_get(name)
        )
    return ARCHIVE_READERS[name].read(name, split, data_dir=data_dir)


def load_split(
    name: str,
    split: str = "train",
    *,
    data_dir: str | None = None,
    source: Source = "auto",
    limit: int | None = None,
) -> ArrayDataset | RandomAccessSource:
    """Loads one split of a dataset.

    name: one of list_datasets(); split: e.g. 'train' / 'test' (DATASET_INFO[name].splits).
    data_dir: a folder with the official files (or a TFDS data_dir); None searches the default places.
    source: 'archive' reads the official files (IDX .gz, CIFAR tarballs, SVHN .mat); 'tfds' reads a TFDS
      build (preparing it if needed); 'auto' reads the files if found, else an existing TFDS build.
    limit: keep only the first `limit` examples.
    Returns an ArrayDataset (uint8 [N, H, W, C], int32 [N]), or a RandomAccessSource for large datasets.
    Raises DatasetNotFoundError (one message naming the folders searched and every way to get the data).
    """
    check_split(name, split)
    if source not in ("auto", "archive", "tfds"):
        raise ValueError(f"source={source!r}: choose one of 'auto', 'archive', 'tfds'")
    if limit is not None and limit < 0:
        raise ValueError(f"limit={limit}: expected None or a number of examples >= 0")
    info = DATASET_INFO[name]
    if source == "tfds" or (info.large and source == "auto"):
        return tfds_source.load(name, split, data_dir=data_dir, limit=limit, prepare_missing=source == "tfds")
    try:
        images, labels = read_archive(name, split, data_dir=data_dir)
    except DatasetNotFoundError as archive_error:
        if source == "archive":
            raise
        try:
            return tfds_source.load(name, split, data_dir=data_dir, limit=limit, prepare_missing=False)
        except DatasetNotFoundError as tfds_error:
            raise DatasetNotFoundError(
                name,
                split,
                archive_error.findings + tfds_error.findings,
                ways_to_get(name),
            ) from None
    dataset = ArrayDataset(images, labels, info.num_classes, f"{name}/{split}")
    if limit is None or limit >= len(dataset):
        return dataset
    # Copies, so that the whole split is not kept alive behind a small view.
    small = dataset.take(limit)
    return dataclasses.replace(small, images=small.images.copy(), labels=small.labels.copy())


__all__ = [
    "ARCHIVE_READERS",
    "DATA_DIR_ENV",
    "cifar",
    "idx",
    "load_split",
    "read_archive",
    "restore_official_gzip",
    "search_dirs",
    "svhn",
    "tfds_source",
    "ways_to_get",
]
