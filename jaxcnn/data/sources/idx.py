"""MNIST and Fashion-MNIST from their official IDX `.gz` files, with gzip and numpy only.

An IDX file is a big-endian header (magic 2051 for images, 2049 for labels: two zero bytes, the element type
0x08 = uint8, the number of dimensions; then one uint32 per dimension) followed by the raw uint8 data.

Every file is checked against its official md5. Debian's `dataset-fashion-mnist` package ships the official
deflate data under a rewritten 10-byte gzip header; such a file is accepted when putting back the official
header (`restore_official_gzip`) gives the official md5.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from jaxcnn.data.dataset import DATASET_INFO
from jaxcnn.data.sources.locate import UnusableFolder, common_remedies, md5_hex, read_first_usable

DATASETS = ("mnist", "fashion_mnist")
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049

# split -> (images file, labels file): the same names for both datasets.
IDX_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

OFFICIAL_MD5: dict[str, dict[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
}

# The official gzip headers are `1f 8b 08 08 <mtime, u32 LE> 00 03 <name>\0`: (name, mtime) per file.
OFFICIAL_GZIP_HEADER: dict[str, dict[str, tuple[str, int]]] = {
    "mnist": {
        "train-images-idx3-ubyte.gz": ("train-images.idx3-ubyte", 0x3290827A),
        "train-labels-idx1-ubyte.gz": ("train-labels.idx1-ubyte", 0x32908286),
        "t10k-images-idx3-ubyte.gz": ("t10k-images.idx3-ubyte", 0x34CCA6AD),
        "t10k-labels-idx1-ubyte.gz": ("t10k-labels.idx1-ubyte", 0x34CCA6C4),
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte.gz": ("train-images-idx3-ubyte", 0x59A7E9DE),
        "train-labels-idx1-ubyte.gz": ("train-labels-idx1-ubyte", 0x59A7E9DE),
        "t10k-images-idx3-ubyte.gz": ("t10k-images-idx3-ubyte", 0x59A7E9F3),
        "t10k-labels-idx1-ubyte.gz": ("t10k-labels-idx1-ubyte", 0x59A7E9F3),
    },
}

DOWNLOAD_URLS: dict[str, tuple[str, ...]] = {
    "mnist": ("https://storage.googleapis.com/cvdf-datasets/mnist/", "http://yann.lecun.com/exdb/mnist/"),
    "fashion_mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
}


def _check_dataset(dataset: str) -> None:
    if dataset not in DATASETS:
        raise ValueError(f"the IDX reader reads {', '.join(DATASETS)}, not {dataset!r}")


def gzip_header_length(data: bytes) -> int:
    """Length in bytes of the gzip member header at the start of `data` (RFC 1952), where the deflate data
    starts. Raises ValueError if `data` does not start with a gzip header."""
    if len(data) < 10 or data[:3] != b"\x1f\x8b\x08":
        raise ValueError("not a gzip file (no 1f 8b 08 magic)")
    flags, pos = data[3], 10
    if flags & 0x04:  # FEXTRA: u16 LE length, then that many bytes
        (extra_len,) = struct.unpack_from("<H", data, pos)
        pos += 2 + extra_len
    for bit in (0x08, 0x10):  # FNAME, FCOMMENT: zero-terminated strings
        if flags & bit:
            end = data.find(b"\0", pos)
            if end < 0:
                raise ValueError("gzip header truncated")
            pos = end + 1
    if flags & 0x02:  # FHCRC
        pos += 2
    if pos > len(data):
        raise ValueError("gzip header truncated")
    return pos


def _with_official_header(data: bytes, dataset: str, filename: str) -> bytes:
    name, mtime = OFFICIAL_GZIP_HEADER[dataset][filename]
    header = b"\x1f\x8b\x08\x08" + struct.pack("<I", mtime) + b"\x00\x03" + name.encode() + b"\0"
    return header + data[gzip_header_length(data) :]


def restore_official_gzip(path: str | Path, dataset: str) -> bytes:
    """The bytes of the official file that `path` is a re-headered copy of (e.g. Debian's Fashion-MNIST).

    Replaces whatever gzip header the file has with the official one (same deflate data and trailer). The
    result has the official md5 exactly when the compressed data is the official one; the caller checks that.
    """
    _check_dataset(dataset)
    path = Path(path)
    if path.name not in OFFICIAL_GZIP_HEADER[dataset]:
        raise ValueError(
            f"{path}: not an official {dataset} file name; expected one of {', '.join(OFFICIAL_GZIP_HEADER[dataset])}"
        )
    return _with_official_header(path.read_bytes(), dataset, path.name)


def official_md5_problem(data: bytes, dataset: str, filename: str) -> str | None:
    """None if `data` is the official file `filename`, or a re-headered copy of it; else what is wrong."""
    expected = OFFICIAL_MD5[dataset][filename]
    found = md5_hex(data)
    if found == expected:
        return None
    try:
        if md5_hex(_with_official_header(data, dataset, filename)) == expected:
            return None
    except ValueError as e:
        return f"{filename} is damaged ({e}; md5 expected {expected}, found {found})"
    return f"{filename} is damaged (md5 expected {expected}, found {found}, also with the official gzip header)"


def parse_idx(raw: bytes, magic: int) -> np.ndarray:
    """Decodes an uncompressed IDX file of uint8 data: [N, ...] with the dimensions from its header.

    magic: 2051 (images, 3 dimensions) or 2049 (labels, 1 dimension). Raises ValueError for a bad header or a
    data length that does not match the dimensions.
    """
    if len(raw) < 4:
        raise ValueError(f"IDX data too short ({len(raw)} bytes)")
    (found_magic,) = struct.unpack_from(">I", raw, 0)
    if found_magic != magic:
        raise ValueError(f"IDX magic number {found_magic}, expected {magic}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"IDX header truncated ({len(raw)} bytes)")
    dims = struct.unpack_from(f">{ndim}I", raw, 4)
    size = int(np.prod(dims))
    if len(raw) - header != size:
        raise ValueError(f"IDX dimensions {dims} need {size} data bytes, found {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _decode_gz(data: bytes, filename: str, magic: int) -> np.ndarray:
    try:
        return parse_idx(gzip.decompress(data), magic)
    except (OSError, EOFError, zlib.error, ValueError) as e:
        raise UnusableFolder(f"{filename} is damaged ({e})") from None


def read_idx_folder(
    folder: Path, dataset: str, split: str, *, verify: bool = True
) -> tuple[np.ndarray, np.ndarray] | None:
    """Reads one split from a folder holding the official files.

    Returns (images uint8 [N, 28, 28, 1], labels int32 [N]), or None if the folder has neither file.
    Raises UnusableFolder if one is missing or damaged (or, with verify=True, is not the official file).
    """
    images_name, labels_name = IDX_FILES[split]
    present = [n for n in (images_name, labels_name) if (folder / n).is_file()]
    if not present:
        return None
    if len(present) == 1:
        missing = labels_name if present[0] == images_name else images_name
        raise UnusableFolder(f"has {present[0]} but not {missing}")
    images_data, labels_data = (folder / images_name).read_bytes(), (folder / labels_name).read_bytes()
    if verify:
        problems = [
            official_md5_problem(d, dataset, n) for d, n in ((images_data, images_name), (labels_data, labels_name))
        ]
        problems = [p for p in problems if p]
        if problems:
            raise UnusableFolder("; ".join(problems))
    images = _decode_gz(images_data, images_name, IMAGES_MAGIC)
    labels = _decode_gz(labels_data, labels_name, LABELS_MAGIC)
    info = DATASET_INFO[dataset]
    if images.shape[1:] != info.shape[:2] or len(images) != len(labels):
        raise UnusableFolder(
            f"{images_name} holds {images.shape} images and {labels_name} {labels.shape} labels; "
            f"expected [N, {info.shape[0]}, {info.shape[1]}] and [N]"
        )
    if labels.size and labels.max() >= info.num_classes:
        raise UnusableFolder(f"{labels_name} has label {labels.max()}, expected < {info.num_classes}")
    return images[..., None].copy(), labels.astype(np.int32)  # writable copies of the read-only buffers


def ways_to_get(dataset: str) -> list[str]:
    """How to get the official files (one line each), for the DatasetNotFoundError message."""
    _check_dataset(dataset)
    files = " ".join(OFFICIAL_MD5[dataset])
    lines = []
    if dataset == "fashion_mnist":
        lines.append(
            "Debian/Ubuntu: sudo apt-get install dataset-fashion-mnist "
            "(the files land in /usr/share/datasets/fashion-mnist/)"
        )
    lines.append(f"download {files} from " + " or ".join(DOWNLOAD_URLS[dataset]))
    return lines + common_remedies(dataset)


def read(
    dataset: str, split: str, *, data_dir: str | Path | None = None, verify: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Finds and reads one split of MNIST or Fashion-MNIST from the first usable folder of `search_dirs`.

    Returns (images uint8 [N, 28, 28, 1], labels int32 [N]). Raises DatasetNotFoundError naming every folder
    searched, the exact file names, any file found damaged, and the ways to get the data.
    """
    _check_dataset(dataset)
    if split not in IDX_FILES:
        raise ValueError(f"{dataset} has splits {', '.join(IDX_FILES)}, not {split!r}")
    return read_first_usable(
        dataset,
        split,
        data_dir,
        lambda folder: read_idx_folder(folder, dataset, split, verify=verify),
        f"the official IDX files {' and '.join(IDX_FILES[split])}",
        ways_to_get(dataset),
    )
