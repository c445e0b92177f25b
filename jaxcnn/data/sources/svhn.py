"""SVHN (cropped digits, format 2) from the official MATLAB files `train_32x32.mat`, `test_32x32.mat`,
`extra_32x32.mat`: X uint8 [32, 32, 3, N] and y [N, 1] with labels 1..10, where 10 means the digit 0.
Read with scipy.io.loadmat; checked against the official md5 (`OFFICIAL_MD5`, which tests may patch).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxcnn.data.dataset import DATASET_INFO
from jaxcnn.data.sources.locate import UnusableFolder, common_remedies, file_md5, read_first_usable

DATASET = "svhn_cropped"
DOWNLOAD_URL = "http://ufldl.stanford.edu/housenumbers/"
SPLIT_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat", "extra": "extra_32x32.mat"}
OFFICIAL_MD5: dict[str, str] = {
    "train_32x32.mat": "e26dedcc434d2e4c54c9b2d4a06d8373",
    "test_32x32.mat": "eb5a983be6a315427106f1b164d9cef3",
    "extra_32x32.mat": "a93ce644f1a588dc4d68dda5feec44a7",
}


def parse_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A `*_32x32.mat` file -> (images uint8 [N, 32, 32, 3], labels int32 [N] in 0..9, digit 0 as 0)."""
    import scipy.io  # deferred: only SVHN needs scipy

    mat = scipy.io.loadmat(path, variable_names=["X", "y"])
    if "X" not in mat or "y" not in mat:
        raise ValueError(f"expected variables X and y, found {sorted(k for k in mat if not k.startswith('__'))}")
    x, y = np.asarray(mat["X"]), np.asarray(mat["y"]).reshape(-1)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3) or y.shape != x.shape[3:]:
        raise ValueError(f"X {x.dtype} {x.shape} and y {y.shape}; expected uint8 [32, 32, 3, N] and [N, 1]")
    if y.size and (y.min() < 1 or y.max() > 10):
        raise ValueError(f"labels must be 1..10, found {y.min()}..{y.max()}")
    return np.ascontiguousarray(x.transpose(3, 0, 1, 2)), (y % 10).astype(np.int32)


def read_svhn_folder(folder: Path, split: str, *, verify: bool = True) -> tuple[np.ndarray, np.ndarray] | None:
    """Reads one split from `folder`: None if its file is not there, UnusableFolder if damaged."""
    filename = SPLIT_FILES[split]
    path = folder / filename
    if not path.is_file():
        return None
    if verify and (found := file_md5(path)) != OFFICIAL_MD5[filename]:
        raise UnusableFolder(f"{filename} is damaged (md5 expected {OFFICIAL_MD5[filename]}, found {found})")
    try:
        images, labels = parse_mat(path)
    except (OSError, ValueError, NotImplementedError) as e:
        raise UnusableFolder(f"{filename} is damaged ({e})") from None
    expected = DATASET_INFO[DATASET].num_examples[split]
    if verify and len(labels) != expected:
        raise UnusableFolder(f"{filename} holds {len(labels)} examples, expected {expected}")
    return images, labels


def ways_to_get(dataset: str = DATASET) -> list[str]:
    """How to get the official files (one line each), for the DatasetNotFoundError message."""
    urls = " ".join(DOWNLOAD_URL + f for f in SPLIT_FILES.values())
    return [f"download {urls}", *common_remedies(dataset)]


def read(
    dataset: str, split: str, *, data_dir: str | Path | None = None, verify: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Finds and reads one split of SVHN (cropped) from the first usable folder of `search_dirs`.

    Returns (images uint8 [N, 32, 32, 3], labels int32 [N]). verify=False skips the md5 and count checks.
    """
    if dataset != DATASET:
        raise ValueError(f"the SVHN reader reads {DATASET}, not {dataset!r}")
    if split not in SPLIT_FILES:
        raise ValueError(f"{DATASET} has splits {', '.join(SPLIT_FILES)}, not {split!r}")
    return read_first_usable(
        dataset,
        split,
        data_dir,
        lambda folder: read_svhn_folder(folder, split, verify=verify),
        SPLIT_FILES[split],
        ways_to_get(dataset),
    )
