"""CIFAR-10 and CIFAR-100 from the official archives: the binary or the python version, as the `.tar.gz`
tarball or its extracted folder.

Binary version: records of `label_bytes` label bytes + 3072 image bytes in CHW order (1024 red, 1024 green,
1024 blue, rows top to bottom). CIFAR-10 has one label byte; CIFAR-100 two (coarse, fine; we use fine).
Python version: pickled dicts with b'data' uint8 [N, 3072] (the same CHW order) and b'labels' (CIFAR-10) or
b'fine_labels' (CIFAR-100). The pickles are read with an unpickler that only builds numpy arrays.

Tarballs are checked against their official md5 (`OFFICIAL_MD5`, which tests may patch); extracted folders
(no official md5 of the member files) are checked for their structure and, with verify=True, the official
example counts.
"""

from __future__ import annotations

import io
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from jaxcnn.data.dataset import DATASET_INFO
from jaxcnn.data.sources.locate import UnusableFolder, common_remedies, file_md5, read_first_usable

DATASETS = ("cifar10", "cifar100")
IMAGE_BYTES = 32 * 32 * 3
DOWNLOAD_URL = "https://www.cs.toronto.edu/~kriz/"


@dataclass(frozen=True)
class Archive:
    """One official archive: the tarball, the folder inside it, and the member files of each split."""

    filename: str
    folder: str
    kind: Literal["binary", "python"]
    splits: dict[str, tuple[str, ...]]
    label_bytes: int = 1  # binary version: label bytes per record (the last one is the label used)
    labels_key: str = "labels"  # python version: the dict key of the labels


ARCHIVES: dict[str, dict[str, Archive]] = {
    "cifar10": {
        "binary": Archive(
            "cifar-10-binary.tar.gz",
            "cifar-10-batches-bin",
            "binary",
            {"train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)), "test": ("test_batch.bin",)},
        ),
        "python": Archive(
            "cifar-10-python.tar.gz",
            "cifar-10-batches-py",
            "python",
            {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
        ),
    },
    "cifar100": {
        "binary": Archive(
            "cifar-100-binary.tar.gz",
            "cifar-100-binary",
            "binary",
            {"train": ("train.bin",), "test": ("test.bin",)},
            label_bytes=2,
        ),
        "python": Archive(
            "cifar-100-python.tar.gz",
            "cifar-100-python",
            "python",
            {"train": ("train",), "test": ("test",)},
            labels_key="fine_labels",
        ),
    },
}

# Official md5 of each tarball (https://www.cs.toronto.edu/~kriz/cifar.html).
OFFICIAL_MD5: dict[str, str] = {
    "cifar-10-binary.tar.gz": "c32a1d4ab5d03f1284b67883e8d87530",
    "cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",
    "cifar-100-binary.tar.gz": "03b5dce01913d631647c71ecec9e9cb8",
    "cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85",
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only what the CIFAR batches hold (dicts, lists, strings, numpy arrays): a damaged or
    malicious pickle cannot run code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),  # how Python 3 writes bytes in pickle protocols 0-2
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a CIFAR batch")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = module.replace("numpy.core.", "numpy._core.", 1)  # numpy 2 renamed it
        return super().find_class(module, name)


def _chw_to_hwc(flat: np.ndarray) -> np.ndarray:
    """uint8 [N, 3072] in CHW order -> uint8 [N, 32, 32, 3]."""
    return np.ascontiguousarray(flat.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def parse_binary(raw: bytes, label_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """Binary-version records -> (images uint8 [N, 32, 32, 3], labels int32 [N]); the label used is the last
    label byte (CIFAR-100: fine)."""
    record = label_bytes + IMAGE_BYTES
    if len(raw) % record:
        raise ValueError(f"{len(raw)} bytes is not a whole number of {record}-byte records")
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, record)
    return _chw_to_hwc(records[:, label_bytes:]), records[:, label_bytes - 1].astype(np.int32)


def parse_python(raw: bytes, labels_key: str) -> tuple[np.ndarray, np.ndarray]:
    """A python-version batch (pickled dict) -> (images uint8 [N, 32, 32, 3], labels int32 [N])."""
    batch = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
    if not isinstance(batch, dict):
        raise ValueError(f"expected a pickled dict, found {type(batch).__name__}")

    def get(key: str) -> Any:
        for k in (key.encode(), key):
            if k in batch:
                return batch[k]
        raise ValueError(f"no {key!r} entry (found {sorted(map(str, batch))})")

    data = np.asarray(get("data"))
    labels = np.asarray(get(labels_key))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != IMAGE_BYTES or labels.shape != data.shape[:1]:
        raise ValueError(f"data {data.dtype} {data.shape} and labels {labels.shape}, expected uint8 [N, 3072] and [N]")
    return _chw_to_hwc(data), labels.astype(np.int32)


def _parse(archive: Archive, raw: bytes) -> tuple[np.ndarray, np.ndarray]:
    if archive.kind == "binary":
        return parse_binary(raw, archive.label_bytes)
    return parse_python(raw, archive.labels_key)


def _read_members(archive: Archive, split: str, tarball: Path | None, folder: Path | None) -> list[bytes]:
    names = archive.splits[split]
    if folder is not None:
        return [(folder / n).read_bytes() for n in names]
    assert tarball is not None
    out = []
    with tarfile.open(tarball, "r:gz") as tar:
        for n in names:
            member = tar.extractfile(f"{archive.folder}/{n}")
            if member is None:
                raise KeyError(n)
            out.append(member.read())
    return out


def _read_archive(
    dataset: str, archive: Archive, split: str, tarball: Path | None, folder: Path | None, check_count: bool
) -> tuple[np.ndarray, np.ndarray]:
    where = tarball.name if tarball is not None else f"{folder}/"
    try:
        parts = [_parse(archive, raw) for raw in _read_members(archive, split, tarball, folder)]
    except (OSError, EOFError, KeyError, ValueError, pickle.UnpicklingError, tarfile.TarError) as e:
        raise UnusableFolder(f"{where} is damaged ({type(e).__name__}: {e})") from None
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    info = DATASET_INFO[dataset]
    if labels.size and labels.max() >= info.num_classes:
        raise UnusableFolder(f"{where} has label {labels.max()}, expected < {info.num_classes}")
    if check_count and len(labels) != info.num_examples[split]:
        raise UnusableFolder(f"{where} holds {len(labels)} {split} examples, expected {info.num_examples[split]}")
    return images, labels


def read_cifar_folder(
    folder: Path, dataset: str, split: str, *, verify: bool = True
) -> tuple[np.ndarray, np.ndarray] | None:
    """Reads one split from `folder`, trying for each version (binary first, then python) the tarball in
    `folder`, then the extracted folder (`folder/cifar-10-batches-bin/`, or `folder` itself if it is that).

    Returns (images uint8 [N, 32, 32, 3], labels int32 [N]), or None if nothing of CIFAR is there. Raises
    UnusableFolder when something is there but missing, damaged, or (verify=True) not the official file.
    """
    problems = []
    for archive in ARCHIVES[dataset].values():
        tarball = folder / archive.filename
        if tarball.is_file():
            if verify and (found := file_md5(tarball)) != OFFICIAL_MD5[archive.filename]:
                problems.append(
                    f"{archive.filename} is damaged (md5 expected {OFFICIAL_MD5[archive.filename]}, found {found})"
                )
                continue
            try:
                # The md5 already vouches for the contents.
                return _read_archive(dataset, archive, split, tarball, None, check_count=False)
            except UnusableFolder as e:
                problems.append(str(e))
                continue
        for extracted in (folder / archive.folder, folder if folder.name == archive.folder else None):
            if extracted is None or not extracted.is_dir():
                continue
            missing = [n for n in archive.splits[split] if not (extracted / n).is_file()]
            if missing:
                problems.append(f"{extracted.name}/ lacks {', '.join(missing)}")
                continue
            try:
                return _read_archive(dataset, archive, split, None, extracted, check_count=verify)
            except UnusableFolder as e:
                problems.append(str(e))
    if problems:
        raise UnusableFolder("; ".join(problems))
    return None


def expected_files(dataset: str) -> str:
    """The file names looked for, in words."""
    a = ARCHIVES[dataset]
    return (
        f"{a['binary'].filename} or {a['python'].filename} "
        f"(or their extracted folders {a['binary'].folder}/, {a['python'].folder}/)"
    )


def ways_to_get(dataset: str) -> list[str]:
    """How to get the official files (one line each), for the DatasetNotFoundError message."""
    a = ARCHIVES[dataset]
    return [
        f"download {DOWNLOAD_URL}{a['binary'].filename} (or {DOWNLOAD_URL}{a['python'].filename})",
        *common_remedies(dataset),
    ]


def read(
    dataset: str, split: str, *, data_dir: str | Path | None = None, verify: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Finds and reads one split of CIFAR-10/100 from the first usable folder of `search_dirs`.

    Returns (images uint8 [N, 32, 32, 3], labels int32 [N]). verify=False skips the md5 and example-count
    checks (for small archives in the official layout). Raises DatasetNotFoundError otherwise.
    """
    if dataset not in DATASETS:
        raise ValueError(f"the CIFAR reader reads {', '.join(DATASETS)}, not {dataset!r}")
    if split not in ("train", "test"):
        raise ValueError(f"{dataset} has splits train, test, not {split!r}")
    return read_first_usable(
        dataset,
        split,
        data_dir,
        lambda folder: read_cifar_folder(folder, dataset, split, verify=verify),
        expected_files(dataset),
        ways_to_get(dataset),
    )
