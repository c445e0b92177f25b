"""TensorFlow Datasets: preparing a build (online, or offline from the official files) and reading it.

Preparing (`download_and_prepare`) needs TensorFlow (`pip install 'jaxcnn[tf]'`); reading does not when the
build is in the `array_record` format, which is what `prepare` writes: `tfds.data_source` (random access,
no TensorFlow) reads it. A build in the older `tfrecord` format is read with `tfds.load`, which needs
TensorFlow. (`tfds.data_source` reads only array_record builds and `tfds.load` only tfrecord builds.)

Small datasets are decoded once into an ArrayDataset; large ones (imagenet2012, imagenette) are returned as a
`TFDSRandomAccessSource` that decodes one example per `source[i]`.

TFDS stores the examples of a split in its own (shuffled) order, not the order of the official files, so a
TFDS build and the archive reader give the same examples in a different order.

Offline, TFDS builds from a `manual_dir` holding the official files (its checksum check needs the exact
official bytes). `official_files_dir` finds them with the archive readers' search; for Debian's Fashion-MNIST
it writes header-restored copies into a temporary folder first.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from jaxcnn.data.dataset import DATASET_INFO, ArrayDataset, DatasetNotFoundError
from jaxcnn.data.sources import cifar, idx, svhn
from jaxcnn.data.sources.archives import ARCHIVE_READERS
from jaxcnn.data.sources.locate import common_remedies, search_dirs

TFDS_NAMES = ("mnist", "fashion_mnist", "cifar10", "cifar100", "svhn_cropped", "imagenet2012", "imagenette")

# The files TFDS's builder looks for in manual_dir (the official downloads it would otherwise fetch).
MANUAL_FILES: dict[str, tuple[str, ...]] = {
    "mnist": tuple(idx.OFFICIAL_MD5["mnist"]),
    "fashion_mnist": tuple(idx.OFFICIAL_MD5["fashion_mnist"]),
    "cifar10": (cifar.ARCHIVES["cifar10"]["binary"].filename,),
    "cifar100": (cifar.ARCHIVES["cifar100"]["binary"].filename,),
    "svhn_cropped": tuple(svhn.OFFICIAL_MD5),
    "imagenet2012": ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"),
    "imagenette": ("imagenette2.tgz",),
}

DECODE_CHUNK = 1024  # examples read from an array_record source per call


class TensorFlowMissingError(ImportError):
    """Preparing a TFDS build (or reading a tfrecord build) needs TensorFlow, which is not installed."""


def has_tensorflow() -> bool:
    try:
        return importlib.util.find_spec("tensorflow") is not None
    except (ImportError, ValueError):
        return False


def _require_tensorflow(what: str) -> None:
    if not has_tensorflow():
        raise TensorFlowMissingError(
            f"{what} needs TensorFlow, which is not installed. Install it with pip install 'jaxcnn[tf]' "
            "(tensorflow-cpu), or read the official archive files instead (--set data.source=archive)."
        )


def tfds_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where TFDS builds live: `data_dir` if given, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    return Path(os.environ.get("TFDS_DATA_DIR") or Path.home() / "tensorflow_datasets")


def _check_name(name: str) -> None:
    if name not in TFDS_NAMES:
        raise ValueError(f"no TFDS support for {name!r}; TFDS datasets here: {', '.join(TFDS_NAMES)}")


def _builder(name: str, data_dir: str | os.PathLike[str] | None) -> Any:
    import tensorflow_datasets as tfds

    return tfds.builder(name, data_dir=os.fspath(tfds_data_dir(data_dir)))


def prepared_builder(name: str, data_dir: str | os.PathLike[str] | None = None) -> Any | None:
    """The TFDS builder of an existing build of `name` under the TFDS data_dir, or None."""
    _check_name(name)
    builder = _builder(name, data_dir)
    return builder if builder.is_prepared() else None


@contextlib.contextmanager
def official_files_dir(name: str, data_dir: str | os.PathLike[str] | None = None) -> Iterator[Path | None]:
    """A folder holding the official files TFDS builds `name` from offline, or None if they are not found.

    Searches the archive readers' folders. For MNIST/Fashion-MNIST, files that match only after restoring
    the official gzip header (Debian's) are restored into a temporary folder, removed on exit.
    """
    _check_name(name)
    needed = MANUAL_FILES[name]
    for folder in search_dirs(name, data_dir):
        if not all((folder / f).is_file() for f in needed):
            continue
        if name in idx.DATASETS:
            contents = {f: (folder / f).read_bytes() for f in needed}
            if any(idx.official_md5_problem(data, name, f) for f, data in contents.items()):
                continue
            if all(idx.md5_hex(data) == idx.OFFICIAL_MD5[name][f] for f, data in contents.items()):
                yield folder
                return
            with tempfile.TemporaryDirectory(prefix=f"jaxcnn_{name}_") as tmp:
                for f in needed:
                    (Path(tmp) / f).write_bytes(idx.restore_official_gzip(folder / f, name))
                yield Path(tmp)
            return
        yield folder
        return
    yield None


def prepare(
    name: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    manual_dir: str | os.PathLike[str] | None = None,
    file_format: str = "array_record",
) -> Any:
    """Builds `name` under the TFDS data_dir and returns its builder (needs TensorFlow).

    manual_dir: a folder with the official files, to build offline (TFDS checks their checksums). None looks
    for them in the archive readers' folders (`official_files_dir`) and, if not found, downloads them.
    file_format: 'array_record' (read without TensorFlow by tfds.data_source) or 'tfrecord' (tfds.load).
    Raises TensorFlowMissingError without TensorFlow, DatasetNotFoundError when the download or the files fail.
    """
    _check_name(name)
    _require_tensorflow(f"Preparing the TFDS dataset {name!r}")
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.download.download_manager import NonMatchingChecksumError

    builder = _builder(name, data_dir)
    with contextlib.ExitStack() as stack:
        if manual_dir is None:
            manual_dir = stack.enter_context(official_files_dir(name, data_dir))
        download_config = tfds.download.DownloadConfig(
            manual_dir=None if manual_dir is None else os.fspath(manual_dir), try_download_gcs=False
        )
        try:
            builder.download_and_prepare(download_config=download_config, file_format=file_format)
        except (OSError, tfds.download.DownloadError, NonMatchingChecksumError) as e:
            where = f"from the files in {manual_dir}" if manual_dir is not None else "by downloading"
            raise DatasetNotFoundError(
                name,
                "all",
                [f"TFDS could not prepare {name!r} {where}: {type(e).__name__}: {e}"],
                ways_to_get(name),
            ) from e
    return builder


def _available_formats(builder: Any) -> set[str]:
    return {f.value for f in builder.info.available_file_formats()}


def _label(value: Any) -> int:
    return int(np.asarray(value))


class TFDSRandomAccessSource:
    """A prepared array_record TFDS split read example by example (a RandomAccessSource).

    source[i] -> {'image': uint8 [H, W, C], 'label': int}; len(source) examples (the first `limit` if given).
    """

    def __init__(self, builder: Any, split: str, num_classes: int, name: str, limit: int | None = None):
        if "array_record" not in _available_formats(builder):
            raise ValueError(
                f"the TFDS build of {builder.name} in {builder.data_dir} is in the "
                f"{', '.join(sorted(_available_formats(builder)))} format; random access needs an array_record "
                "build: delete that folder and prepare again (jaxcnn prepares array_record builds)"
            )
        self._source = builder.as_data_source(split=split)
        self._len = len(self._source) if limit is None else min(limit, len(self._source))
        self.num_classes = num_classes
        self.name = name

    def __len__(self) -> int:
        return self._len

    def _convert(self, example: Mapping[str, Any]) -> dict[str, Any]:
        return {"image": np.asarray(example["image"], dtype=np.uint8), "label": _label(example["label"])}

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -self._len <= index < self._len:
            raise IndexError(f"{self.name}: index {index} out of range for {self._len} examples")
        return self._convert(self._source[index % self._len])

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        """Several examples at once (array_record reads them in one go)."""
        if any(not 0 <= i < self._len for i in indices):
            raise IndexError(f"{self.name}: indices out of range for {self._len} examples")
        return [self._convert(e) for e in self._source.__getitems__(list(indices))]


def read_arrays(builder: Any, split: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Decodes a whole prepared split (its first `limit` examples): (images uint8 [N, H, W, C], labels int32 [N]).

    array_record builds are read with the random-access data source (no TensorFlow); tfrecord builds with
    tfds.as_dataset, which needs TensorFlow.
    """
    if "array_record" in _available_formats(builder):
        num_classes = builder.info.features["label"].num_classes
        source = TFDSRandomAccessSource(builder, split, num_classes, name=builder.name, limit=limit)
        parts = []
        for start in range(0, len(source), DECODE_CHUNK):
            chunk = source.__getitems__(list(range(start, min(start + DECODE_CHUNK, len(source)))))
            parts.append((np.stack([e["image"] for e in chunk]), np.array([e["label"] for e in chunk])))
    else:
        _require_tensorflow(f"Reading the tfrecord TFDS build of {builder.name!r} in {builder.data_dir}")
        import tensorflow_datasets as tfds

        tfds_split = split if limit is None else f"{split}[:{limit}]"
        # Fixed-size batches rather than batch_size=-1, which aborts the process under tfds.testing.mock_data.
        batches = tfds.as_numpy(builder.as_dataset(split=tfds_split, batch_size=DECODE_CHUNK))
        parts = [(b["image"], b["label"]) for b in batches]
    if not parts:
        return np.zeros((0, *builder.info.features["image"].shape), np.uint8), np.zeros((0,), np.int32)
    images = np.concatenate([p[0] for p in parts]).astype(np.uint8, copy=False)
    labels = np.concatenate([p[1] for p in parts]).astype(np.int32)
    return images[:limit], labels[:limit]


def ways_to_get(name: str) -> list[str]:
    """Every way to get `name` (the remedies of DatasetNotFoundError): the archive reader's ways for the
    datasets that have one, else the TFDS ways."""
    _check_name(name)
    if name in ARCHIVE_READERS:
        return ARCHIVE_READERS[name].ways_to_get(name)
    if name == "imagenet2012":
        return [
            "ImageNet cannot be downloaded automatically: get ILSVRC2012_img_train.tar and "
            "ILSVRC2012_img_val.tar from https://image-net.org/, put them in a folder FOLDER and run with "
            "--set data.source=tfds --set data.data_dir=FOLDER (TFDS manual_dir; needs pip install 'jaxcnn[tf]')"
        ]
    return [
        f"download {' '.join(MANUAL_FILES[name])} (the official files) into a folder FOLDER and run with "
        "--set data.data_dir=FOLDER --set data.source=tfds (TFDS builds from them offline, as its manual_dir)",
        *common_remedies(name)[1:],
    ]


def load(
    name: str,
    split: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    prepare_missing: bool = True,
) -> ArrayDataset | TFDSRandomAccessSource:
    """Loads a split through TFDS: an ArrayDataset for small datasets, a TFDSRandomAccessSource for large.

    prepare_missing: build the dataset when no build exists (from the official files if found locally,
    else by downloading); False raises DatasetNotFoundError instead.
    """
    _check_name(name)
    info = DATASET_INFO[name]
    builder = prepared_builder(name, data_dir)
    if builder is None:
        if not prepare_missing:
            raise DatasetNotFoundError(
                name,
                split,
                [f"No prepared TFDS build of {name!r} in {tfds_data_dir(data_dir)}."],
                ways_to_get(name),
            )
        builder = prepare(name, data_dir=data_dir)
    if info.large:
        return TFDSRandomAccessSource(builder, split, info.num_classes, f"{name}/{split}", limit=limit)
    images, labels = read_arrays(builder, split, limit)
    suffix = "" if limit is None or limit > len(labels) else f"[:{limit}]"
    return ArrayDataset(images, labels, info.num_classes, f"{name}/{split}{suffix}")
