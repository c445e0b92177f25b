"""Where the official dataset files are looked for, and checking them against their official md5."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from typing import Callable, Sequence, TypeVar

from jaxcnn.data.dataset import DatasetNotFoundError

T = TypeVar("T")

DATA_DIR_ENV = "JAXCNN_DATA_DIR"
REPO_ROOT = Path(__file__).resolve().parents[3]

# Other names a dataset's folder commonly has (the TFDS name is always tried first).
FOLDER_ALIASES: dict[str, tuple[str, ...]] = {
    "mnist": ("MNIST/raw",),
    "fashion_mnist": ("fashion-mnist", "FashionMNIST/raw"),
    "cifar10": ("cifar-10", "cifar"),
    "cifar100": ("cifar-100", "cifar"),
    "svhn_cropped": ("svhn",),
}

# Places where a system package or this project's shared checkout puts the files.
SYSTEM_FOLDERS: dict[str, tuple[str, ...]] = {
    "fashion_mnist": ("/usr/share/datasets/fashion-mnist",),
}
# Relative to the repository root and to the current directory.
SHARED_FOLDERS: dict[str, tuple[str, ...]] = {
    "mnist": ("../shared/data/mnist",),
}


def user_cache_dir(dataset: str) -> Path:
    """~/.cache/jaxcnn/<dataset> (honours XDG_CACHE_HOME)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "jaxcnn" / dataset


def search_dirs(dataset: str, data_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """The folders searched for `dataset`'s official files, in order, without duplicates.

    An explicit data_dir (the config's data.data_dir) is the only place searched, as given and with a <dataset>
    subfolder: a user who names a folder gets that folder or an error, never a silent fallback to another copy.
    Without it: $JAXCNN_DATA_DIR (as given and with a <dataset> subfolder), then the system/shared places for this
    dataset, then ~/.cache/jaxcnn/<dataset>.
    """
    subfolders = (dataset, *FOLDER_ALIASES.get(dataset, ()))
    if data_dir is not None:
        base_path = Path(data_dir).expanduser()
        return [base_path] + [base_path / s for s in subfolders]
    dirs: list[Path] = []
    env_dir = os.environ.get(DATA_DIR_ENV) or None
    if env_dir is not None:
        base_path = Path(env_dir).expanduser()
        dirs += [base_path] + [base_path / s for s in subfolders]
    dirs += [Path(p) for p in SYSTEM_FOLDERS.get(dataset, ())]
    for rel in SHARED_FOLDERS.get(dataset, ()):
        dirs += [REPO_ROOT / rel, Path.cwd() / rel]
    dirs.append(user_cache_dir(dataset))
    unique: dict[Path, Path] = {}
    for d in dirs:
        unique.setdefault(Path(os.path.normpath(d.absolute())), d)
    return list(unique)


def md5_hex(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def file_md5(path: Path, chunk_bytes: int = 1 << 22) -> str:
    """md5 of a file read in chunks (for the 170 MB tarballs)."""
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


class UnusableFolder(Exception):
    """A folder holds some of the files, but they cannot be used; the message says why (missing, damaged)."""


def first_usable(folders: Sequence[Path], read_folder: Callable[[Path], T | None]) -> tuple[T | None, list[str]]:
    """Calls `read_folder` on each folder in order until one returns a result.

    read_folder returns None when the folder has none of the files, or raises UnusableFolder. Returns (the
    first result or None, one line per folder tried saying what was wrong there).
    """
    notes: list[str] = []
    absent = [str(f) for f in folders if not f.is_dir()]
    for folder in folders:
        if not folder.is_dir():
            continue
        try:
            result = read_folder(folder)
        except UnusableFolder as e:
            notes.append(f"  {folder}: {e}")
            continue
        if result is not None:
            return result, notes
        notes.append(f"  {folder}: none of the files")
    if absent:
        notes.append(f"  (no such folder: {', '.join(absent)})")
    return None, notes


def read_first_usable(
    dataset: str,
    split: str,
    data_dir: str | os.PathLike[str] | None,
    read_folder: Callable[[Path], T | None],
    looked_for: str,
    remedies: Sequence[str],
) -> T:
    """`read_folder` on the first usable folder of search_dirs(dataset, data_dir), or DatasetNotFoundError
    saying what was `looked_for`, what was wrong in each folder, and the `remedies`."""
    used: list[Path] = []

    def read_and_note(folder: Path) -> T | None:
        result = read_folder(folder)
        used.append(folder)
        return result

    result, notes = first_usable(search_dirs(dataset, data_dir), read_and_note)
    if result is None:
        raise DatasetNotFoundError(dataset, split, [f"Looked for {looked_for} in:", *notes], remedies)
    env_dir = os.environ.get(DATA_DIR_ENV) if data_dir is None else None
    if env_dir and not used[-1].absolute().is_relative_to(Path(env_dir).expanduser().absolute()):
        note = f"note: {DATA_DIR_ENV}={env_dir} holds no usable {dataset} files; read them from {used[-1]}"
        if note not in _NOTES_PRINTED:  # once per process, not once per split
            _NOTES_PRINTED.add(note)
            print(note, file=sys.stderr, flush=True)
    return result


_NOTES_PRINTED: set[str] = set()


def common_remedies(dataset: str) -> list[str]:
    """The ways to get any dataset that do not depend on its file format."""
    return [
        f"put the files in a folder FOLDER and pass --set data.data_dir=FOLDER (or export {DATA_DIR_ENV}=FOLDER; "
        f"a '{dataset}' subfolder of either also works), or put them in {user_cache_dir(dataset)}",
        f"TFDS online: --set data.source=tfds downloads and prepares '{dataset}' "
        "(needs internet and TensorFlow: pip install 'jaxcnn[tf]')",
        "TFDS offline: --set data.source=tfds with the official files in one of the folders above builds the "
        "TFDS dataset from them (TFDS manual_dir; needs TensorFlow: pip install 'jaxcnn[tf]')",
    ]
