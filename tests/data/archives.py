"""Small dataset files in the official byte layouts, written from the format descriptions with plain Python
loops (not with the readers' code), so the readers can be checked against arrays we know.

All `images` here are uint8 [N, H, W, C] (HWC, the layout the readers return); the writers lay them out the
way each official format does (CHW planes for CIFAR, [H, W, C, N] for SVHN).
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np


def random_images(n: int, shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """uint8 [n, *shape] random images."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)


def idx_bytes(array: np.ndarray) -> bytes:
    """An uncompressed IDX file of uint8 data: magic 0x0000_08_<ndim>, one big-endian u32 per dimension."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + bytes(int(v) for v in array.reshape(-1))


def write_idx_gz(path: Path, array: np.ndarray) -> Path:
    path.write_bytes(gzip.compress(idx_bytes(array)))
    return path


def _chw_planes(image: np.ndarray) -> bytes:
    """The 3072 bytes of one CIFAR image: the red plane row by row, then green, then blue."""
    out = bytearray()
    for c in range(3):
        for r in range(32):
            for col in range(32):
                out.append(int(image[r, col, c]))
    return bytes(out)


def cifar_binary_records(images: np.ndarray, labels: list[list[int]]) -> bytes:
    """Binary-version records: the label bytes of each example (CIFAR-10: [label]; CIFAR-100: [coarse, fine])
    then its 3072 image bytes."""
    return b"".join(bytes(lab) + _chw_planes(img) for img, lab in zip(images, labels, strict=True))


def cifar_python_batch(images: np.ndarray, labels: list[int], labels_key: bytes) -> bytes:
    """A python-version batch: a pickled dict with bytes keys, b'data' uint8 [N, 3072] (CHW rows)."""
    data = np.frombuffer(b"".join(_chw_planes(img) for img in images), dtype=np.uint8).reshape(len(images), 3072)
    batch = {b"batch_label": b"testing batch", labels_key: list(labels), b"data": data, b"filenames": []}
    return pickle.dumps(batch, protocol=2)


def write_tar_gz(path: Path, members: dict[str, bytes]) -> Path:
    """A .tar.gz holding `members` ({'folder/name': bytes})."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def write_svhn_mat(path: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """A `*_32x32.mat` file: X uint8 [32, 32, 3, N], y [N, 1] with the digit 0 stored as 10."""
    import scipy.io

    x = np.zeros((32, 32, 3, len(images)), dtype=np.uint8)
    for i, img in enumerate(images):
        x[:, :, :, i] = img
    y = np.array([[10 if lab == 0 else lab] for lab in labels], dtype=np.uint8)
    scipy.io.savemat(path, {"X": x, "y": y})
    return path
