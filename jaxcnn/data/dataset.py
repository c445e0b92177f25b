"""What a dataset is once loaded and what we know about each one: the types every reader returns.

    train = jaxcnn.data.load_split("fashion_mnist", "train")  # ArrayDataset: uint8 [60000, 28, 28, 1], int32 [60000]
    train, val = train.split(5000)                            # carve a validation set off the end
    info = dataset_info("fashion_mnist")                      # DatasetInfo: shape, classes, mean/std, splits

Small datasets come back from `jaxcnn.data.load_split` as an `ArrayDataset` held in host memory. Large ones
(ImageNet, Imagenette) come back as a `RandomAccessSource` that the streaming loader reads example by example.
The readers (`jaxcnn.data.sources`) import this module; it imports none of them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

Source = Literal["auto", "archive", "tfds"]


class DatasetNotFoundError(FileNotFoundError):
    """The data is missing or damaged. `str(err)` is one message: what was looked for, where, what was wrong,
    and each way to get the data. `findings` and `remedies` hold those lines separately."""

    def __init__(self, dataset: str, split: str, findings: Sequence[str], remedies: Sequence[str] = ()):
        self.dataset = dataset
        self.split = split
        self.findings = tuple(findings)
        self.remedies = tuple(remedies)
        lines = [f"Dataset {dataset!r} (split {split!r}) could not be loaded."]
        lines += list(self.findings)
        if self.remedies:
            lines.append("Ways to get it:")
            lines += [f"  - {r}" for r in self.remedies]
        super().__init__("\n".join(lines))

    def __str__(self) -> str:
        return str(self.args[0])

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.dataset, self.split, self.findings, self.remedies))


@dataclass(frozen=True)
class ArrayDataset:
    """A whole split in host memory.

    images: uint8 [N, H, W, C]; labels: int32 [N] in [0, num_classes); name: e.g. 'fashion_mnist/train'.
    """

    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    name: str

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(
                f"{self.name}: images must be uint8 [N, H, W, C], got {self.images.dtype} {self.images.shape}"
            )
        if self.labels.dtype != np.int32 or self.labels.shape != self.images.shape[:1]:
            raise ValueError(
                f"{self.name}: labels must be int32 [N] with N = {self.images.shape[0]}, "
                f"got {self.labels.dtype} {self.labels.shape}"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C)."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def take(self, n: int) -> ArrayDataset:
        """The first `n` examples (all of them if there are fewer). Arrays are views, not copies."""
        if n < 0:
            raise ValueError(f"{self.name}: take(n) needs n >= 0, got {n}")
        if n >= len(self):
            return self
        return dataclasses.replace(self, images=self.images[:n], labels=self.labels[:n], name=f"{self.name}[:{n}]")

    def split(self, n_last: int) -> tuple[ArrayDataset, ArrayDataset]:
        """(head, tail): the tail is the last `n_last` examples, e.g. a 45k/5k train/validation carve."""
        if not 0 < n_last < len(self):
            raise ValueError(f"{self.name}: split(n_last) needs 0 < n_last < {len(self)}, got {n_last}")
        cut = len(self) - n_last
        head = dataclasses.replace(
            self, images=self.images[:cut], labels=self.labels[:cut], name=f"{self.name}[:{cut}]"
        )
        tail = dataclasses.replace(
            self, images=self.images[cut:], labels=self.labels[cut:], name=f"{self.name}[{cut}:]"
        )
        return head, tail


@runtime_checkable
class RandomAccessSource(Protocol):
    """A dataset too large to hold decoded in memory, read one example at a time (e.g. by a grain loader).

    `source[i]` returns {'image': uint8 [H, W, C] (H, W may differ per example), 'label': int}.
    """

    num_classes: int
    name: str

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Mapping[str, Any]: ...


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset.

    shape: (H, W, C) of every image, with None for a side that varies per image (ImageNet). mean, std: per
    channel on the 0..255 scale, over the training split. splits: the split names load_split accepts.
    """

    shape: tuple[int | None, int | None, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    splits: tuple[str, ...]
    num_examples: Mapping[str, int]
    large: bool = False  # streamed as a RandomAccessSource instead of decoded into an ArrayDataset


def _scaled(values: Sequence[float]) -> tuple[float, ...]:
    return tuple(round(v * 255.0, 3) for v in values)


_IMAGENET_MEAN, _IMAGENET_STD = _scaled((0.485, 0.456, 0.406)), _scaled((0.229, 0.224, 0.225))

# mean/std: MNIST and Fashion-MNIST measured on the official train files (tests/data/test_sources.py checks
# them); CIFAR and SVHN are the widely used values from the train splits; ImageNet's are torchvision's.
DATASET_INFO: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo((28, 28, 1), 10, (33.318,), (78.567,), ("train", "test"), {"train": 60000, "test": 10000}),
    "fashion_mnist": DatasetInfo(
        (28, 28, 1), 10, (72.940,), (90.021,), ("train", "test"), {"train": 60000, "test": 10000}
    ),
    "cifar10": DatasetInfo(
        (32, 32, 3),
        10,
        _scaled((0.4914, 0.4822, 0.4465)),
        _scaled((0.2470, 0.2435, 0.2616)),
        ("train", "test"),
        {"train": 50000, "test": 10000},
    ),
    "cifar100": DatasetInfo(
        (32, 32, 3),
        100,
        _scaled((0.5071, 0.4865, 0.4409)),
        _scaled((0.2673, 0.2564, 0.2762)),
        ("train", "test"),
        {"train": 50000, "test": 10000},
    ),
    "svhn_cropped": DatasetInfo(
        (32, 32, 3),
        10,
        _scaled((0.4377, 0.4438, 0.4728)),
        _scaled((0.1980, 0.2010, 0.1970)),
        ("train", "test", "extra"),
        {"train": 73257, "test": 26032, "extra": 531131},
    ),
    "imagenet2012": DatasetInfo(
        (None, None, 3),
        1000,
        _IMAGENET_MEAN,
        _IMAGENET_STD,
        ("train", "validation"),
        {"train": 1281167, "validation": 50000},
        large=True,
    ),
    "imagenette": DatasetInfo(
        (None, None, 3),
        10,
        _IMAGENET_MEAN,
        _IMAGENET_STD,
        ("train", "validation"),
        {"train": 9469, "validation": 3925},
        large=True,
    ),
}


def list_datasets() -> list[str]:
    """The dataset names load_split knows."""
    return sorted(DATASET_INFO)


def dataset_info(name: str) -> DatasetInfo:
    """DATASET_INFO[name], or a ValueError listing the known names."""
    if name not in DATASET_INFO:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(list_datasets())}")
    return DATASET_INFO[name]


def check_split(name: str, split: str) -> None:
    """A ValueError naming the dataset's splits unless `split` is one of them."""
    splits = dataset_info(name).splits
    if split not in splits:
        raise ValueError(f"dataset {name!r} has no split {split!r}; its splits are: {', '.join(splits)}")
