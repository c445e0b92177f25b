"""The archive readers: real MNIST / Fashion-MNIST, damaged and missing files, and small CIFAR / SVHN archives
in the official layouts (tests/data/archives.py) read back exactly."""

from __future__ import annotations

import gzip
import hashlib
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from jaxcnn.data import DATASET_INFO, ArrayDataset, DatasetNotFoundError, list_datasets, load_split
from jaxcnn.data.sources import cifar, idx, locate, svhn
from jaxcnn.data.sources.idx import parse_idx, restore_official_gzip
import archives  # tests/data/archives.py

# Published facts, not computed by the code under test.
MNIST_TRAIN_CLASS_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_CLASS_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
MNIST_TEST_FIRST_LABELS = [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
FASHION_OFFICIAL_MD5 = {  # from the Fashion-MNIST README
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


@pytest.fixture
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Only tmp_path/'data' (passed as data_dir) and an empty cache are searched; no TFDS build exists."""
    monkeypatch.setattr(locate, "SYSTEM_FOLDERS", {})
    monkeypatch.setattr(locate, "SHARED_FOLDERS", {})
    monkeypatch.delenv(locate.DATA_DIR_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    data = tmp_path / "data"
    data.mkdir()
    return data


def raw_idx(path: Path) -> bytes:
    with gzip.open(path) as f:
        return f.read()


# ---------------------------------------------------------------------------------------------------------
# Real MNIST and Fashion-MNIST
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist(mnist_dir: Path) -> dict[str, ArrayDataset]:
    return {s: load_split("mnist", s, data_dir=str(mnist_dir), source="archive") for s in ("train", "test")}


def test_mnist_shapes_and_published_facts(mnist: dict[str, ArrayDataset]) -> None:
    train, test = mnist["train"], mnist["test"]
    assert train.images.shape == (60000, 28, 28, 1) and test.images.shape == (10000, 28, 28, 1)
    assert train.images.dtype == np.uint8 and train.labels.dtype == np.int32
    assert train.num_classes == 10 and train.name == "mnist/train"
    assert int(train.labels[0]) == 5
    assert test.labels[:10].tolist() == MNIST_TEST_FIRST_LABELS
    assert np.bincount(train.labels, minlength=10).tolist() == MNIST_TRAIN_CLASS_COUNTS
    assert np.bincount(test.labels, minlength=10).tolist() == MNIST_TEST_CLASS_COUNTS
    assert train.images.max() == 255 and train.images[:, 0, 0, 0].max() == 0  # white digits on black, empty corner


def test_mnist_pixels_match_the_raw_idx_bytes(mnist: dict[str, ArrayDataset], mnist_dir: Path) -> None:
    # Independent decoding: pixel (i, r, c) is byte 16 + 784 i + 28 r + c of the file; label i is byte 8 + i.
    images_raw = raw_idx(mnist_dir / "train-images-idx3-ubyte.gz")
    labels_raw = raw_idx(mnist_dir / "train-labels-idx1-ubyte.gz")
    ds = mnist["train"]
    for i in (0, 1, 12345, 59999):
        for r, c in ((0, 0), (14, 14), (10, 20), (27, 27)):
            assert ds.images[i, r, c, 0] == images_raw[16 + 784 * i + 28 * r + c]
        assert ds.labels[i] == labels_raw[8 + i]


def test_mnist_mean_std_in_dataset_info(mnist: dict[str, ArrayDataset]) -> None:
    # The widely published MNIST normalisation: mean 0.1307, std 0.3081 on the 0..1 scale.
    info = DATASET_INFO["mnist"]
    assert info.mean[0] == pytest.approx(0.1307 * 255, abs=0.05)
    assert info.std[0] == pytest.approx(0.3081 * 255, abs=0.05)
    pixels = mnist["train"].images.astype(np.float64)
    assert info.mean[0] == pytest.approx(pixels.mean(), abs=1e-3)
    assert info.std[0] == pytest.approx(pixels.std(), abs=1e-3)


def test_fashion_mnist_debian_copies_pass_through_the_header_fix(fashion_dir: Path) -> None:
    for name, official in FASHION_OFFICIAL_MD5.items():
        debian = (fashion_dir / name).read_bytes()
        restored = restore_official_gzip(fashion_dir / name, "fashion_mnist")
        assert md5(restored) == official
        if md5(debian) != official:  # Debian's copy: only the 10-byte header differs
            assert restored[-(len(debian) - 10) :] == debian[10:]
        assert gzip.decompress(restored) == gzip.decompress(debian)


def test_fashion_mnist_loads_from_debian_files(fashion_dir: Path) -> None:
    train = load_split("fashion_mnist", "train", data_dir=str(fashion_dir), source="archive")
    test = load_split("fashion_mnist", "test", data_dir=str(fashion_dir), source="archive")
    assert train.images.shape == (60000, 28, 28, 1) and test.images.shape == (10000, 28, 28, 1)
    assert train.labels.dtype == np.int32 and train.labels.min() == 0 and train.labels.max() == 9
    # Published: 6000 train and 1000 test images per class.
    assert np.bincount(train.labels).tolist() == [6000] * 10
    assert np.bincount(test.labels).tolist() == [1000] * 10
    raw = raw_idx(fashion_dir / "t10k-images-idx3-ubyte.gz")
    assert test.images[9999].tobytes() == raw[16 + 784 * 9999 :]
    assert DATASET_INFO["fashion_mnist"].mean[0] == pytest.approx(train.images.mean(), abs=1e-3)


def test_limit_take_and_split(mnist_dir: Path) -> None:
    ds = load_split("mnist", "test", data_dir=str(mnist_dir), limit=100)
    assert len(ds) == 100 and ds.labels[:10].tolist() == MNIST_TEST_FIRST_LABELS
    head, tail = ds.split(30)
    assert (len(head), len(tail)) == (70, 30)
    np.testing.assert_array_equal(np.concatenate([head.images, tail.images]), ds.images)
    assert tail.labels.tolist() == ds.labels[70:].tolist()
    assert ds.take(5).labels.tolist() == MNIST_TEST_FIRST_LABELS[:5]
    with pytest.raises(ValueError, match="n_last"):
        ds.split(100)


def test_array_dataset_rejects_wrong_dtypes() -> None:
    with pytest.raises(ValueError, match="uint8"):
        ArrayDataset(np.zeros((2, 4, 4, 1), np.float32), np.zeros(2, np.int32), 10, "x")
    with pytest.raises(ValueError, match="int32"):
        ArrayDataset(np.zeros((2, 4, 4, 1), np.uint8), np.zeros(3, np.int32), 10, "x")


def test_list_datasets_and_unknown_names() -> None:
    assert {"mnist", "fashion_mnist", "cifar10", "cifar100", "svhn_cropped", "imagenet2012", "imagenette"} <= set(
        list_datasets()
    )
    with pytest.raises(ValueError, match="known datasets"):
        load_split("nope")
    with pytest.raises(ValueError, match="splits are: train, test"):
        load_split("mnist", "validation")


# ---------------------------------------------------------------------------------------------------------
# Missing and damaged files: one clear message
# ---------------------------------------------------------------------------------------------------------


def assert_lists_every_remedy(message: str, dataset: str) -> None:
    assert "--set data.data_dir=FOLDER" in message and "JAXCNN_DATA_DIR" in message
    assert "--set data.source=tfds" in message and "manual_dir" in message
    for name in idx.IDX_FILES["train"] + idx.IDX_FILES["test"]:
        assert name in message
    assert idx.DOWNLOAD_URLS[dataset][0] in message


def test_damaged_file_is_named_with_both_md5s(isolated: Path, mnist_dir: Path) -> None:
    for name in idx.IDX_FILES["train"]:
        shutil.copy(mnist_dir / name, isolated / name)
    damaged = isolated / "train-images-idx3-ubyte.gz"
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    with pytest.raises(DatasetNotFoundError) as err:
        load_split("mnist", "train", data_dir=str(isolated), source="archive")
    message = str(err.value)
    line = next(s for s in message.splitlines() if str(isolated) + ":" in s)
    assert "train-images-idx3-ubyte.gz is damaged" in line
    assert "f68b3c2dcbeaaa9fbdd348bbdeb94873" in line and md5(bytes(data)) in line
    assert "train-labels" not in line  # the good file is not blamed
    assert_lists_every_remedy(message, "mnist")
    assert "apt-get" not in message  # Debian packages Fashion-MNIST only


def test_damaged_file_with_verification_off_still_fails_cleanly(isolated: Path) -> None:
    (isolated / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    archives.write_idx_gz(isolated / "t10k-labels-idx1-ubyte.gz", np.zeros(3, np.uint8))
    with pytest.raises(DatasetNotFoundError, match="t10k-images-idx3-ubyte.gz is damaged"):
        idx.read("mnist", "test", data_dir=isolated, verify=False)


def test_missing_file(isolated: Path, mnist_dir: Path) -> None:
    shutil.copy(mnist_dir / "t10k-images-idx3-ubyte.gz", isolated)
    with pytest.raises(DatasetNotFoundError) as err:
        load_split("mnist", "test", data_dir=str(isolated), source="archive")
    assert "has t10k-images-idx3-ubyte.gz but not t10k-labels-idx1-ubyte.gz" in str(err.value)


def test_nothing_found_lists_folders_files_and_every_way(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(locate.DATA_DIR_ENV, str(isolated / "env"))
    with pytest.raises(DatasetNotFoundError) as err:
        load_split("fashion_mnist", "train")  # auto: archive (env folder, cache), then TFDS
    e = err.value
    message = str(e)
    assert isinstance(e, FileNotFoundError) and (e.dataset, e.split) == ("fashion_mnist", "train")
    assert "train-images-idx3-ubyte.gz and train-labels-idx1-ubyte.gz" in message
    assert str(isolated / "env" / "fashion_mnist") in message  # the env folder and its <dataset> subfolder
    assert str(isolated.parent / "cache" / "jaxcnn" / "fashion_mnist") in message
    assert "No prepared TFDS build of 'fashion_mnist'" in message
    assert "sudo apt-get install dataset-fashion-mnist" in message
    assert_lists_every_remedy(message, "fashion_mnist")
    assert pickle.loads(pickle.dumps(e)).args == e.args


def test_search_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(locate.DATA_DIR_ENV, str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    # An explicit folder is the only place searched: no silent fallback to another copy.
    explicit = locate.search_dirs("fashion_mnist", tmp_path / "arg")
    assert explicit[:3] == [tmp_path / "arg", tmp_path / "arg/fashion_mnist", tmp_path / "arg/fashion-mnist"]
    assert all(str(d).startswith(str(tmp_path / "arg")) for d in explicit)
    dirs = locate.search_dirs("fashion_mnist")
    assert dirs.index(tmp_path / "env") < dirs.index(tmp_path / "env/fashion_mnist")
    assert dirs.index(tmp_path / "env/fashion_mnist") < dirs.index(Path("/usr/share/datasets/fashion-mnist"))
    assert dirs[-1] == tmp_path / "cache/jaxcnn/fashion_mnist"
    mnist_dirs = locate.search_dirs("mnist")
    assert (locate.REPO_ROOT.parent / "shared/data/mnist").resolve() in [Path(p).resolve() for p in mnist_dirs]


def test_env_folder_is_used(isolated: Path, mnist_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (isolated / "mnist").mkdir()
    for name in idx.IDX_FILES["test"]:
        shutil.copy(mnist_dir / name, isolated / "mnist" / name)
    monkeypatch.setenv(locate.DATA_DIR_ENV, str(isolated))
    assert load_split("mnist", "test", source="archive").labels[:10].tolist() == MNIST_TEST_FIRST_LABELS


# ---------------------------------------------------------------------------------------------------------
# IDX parsing
# ---------------------------------------------------------------------------------------------------------


def test_parse_idx_reads_what_was_written() -> None:
    images = archives.random_images(5, (3, 4, 1), seed=0)[..., 0]
    np.testing.assert_array_equal(parse_idx(archives.idx_bytes(images), idx.IMAGES_MAGIC), images)
    labels = np.arange(7, dtype=np.uint8)
    np.testing.assert_array_equal(parse_idx(archives.idx_bytes(labels), idx.LABELS_MAGIC), labels)


def test_parse_idx_rejects_bad_headers() -> None:
    labels = archives.idx_bytes(np.arange(7, dtype=np.uint8))
    with pytest.raises(ValueError, match="magic number 2049, expected 2051"):
        parse_idx(labels, idx.IMAGES_MAGIC)
    with pytest.raises(ValueError, match="need 7 data bytes, found 6"):
        parse_idx(labels[:-1], idx.LABELS_MAGIC)


def test_small_idx_folder_without_verification(isolated: Path) -> None:
    images = archives.random_images(6, (28, 28, 1), seed=1)
    labels = np.array([3, 1, 4, 1, 5, 9], np.uint8)
    archives.write_idx_gz(isolated / "t10k-images-idx3-ubyte.gz", images[..., 0])
    archives.write_idx_gz(isolated / "t10k-labels-idx1-ubyte.gz", labels)
    got_images, got_labels = idx.read("fashion_mnist", "test", data_dir=isolated, verify=False)
    np.testing.assert_array_equal(got_images, images)
    assert got_labels.dtype == np.int32 and got_labels.tolist() == labels.tolist()
    with pytest.raises(DatasetNotFoundError, match="md5 expected bef4ecab320f06d8554ea6380940ec79"):
        idx.read("fashion_mnist", "test", data_dir=isolated)


# ---------------------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100
# ---------------------------------------------------------------------------------------------------------

CIFAR_SIZES = {"train": 2, "test": 3}  # examples per batch file


def make_cifar(dataset: str, seed: int = 0) -> dict[str, tuple[np.ndarray, list[list[int]]]]:
    """{split: (images [N, 32, 32, 3], label bytes per example)}: 5 train batches for CIFAR-10, else 1."""
    rng = np.random.default_rng(seed)
    train_files = 5 if dataset == "cifar10" else 1
    out = {}
    for split, files in (("train", train_files), ("test", 1)):
        n = CIFAR_SIZES[split] * files
        images = archives.random_images(n, (32, 32, 3), seed=seed + len(out))
        if dataset == "cifar10":
            labels = [[int(v)] for v in rng.integers(0, 10, n)]
        else:
            labels = [[int(c), int(f)] for c, f in zip(rng.integers(0, 20, n), rng.integers(0, 100, n), strict=True)]
        out[split] = (images, labels)
    return out


def cifar_members(dataset: str, kind: str, data: dict[str, tuple[np.ndarray, list[list[int]]]]) -> dict[str, bytes]:
    archive = cifar.ARCHIVES[dataset][kind]
    members = {}
    for split, names in archive.splits.items():
        images, labels = data[split]
        per = len(images) // len(names)
        for i, name in enumerate(names):
            sl = slice(i * per, (i + 1) * per)
            if kind == "binary":
                members[f"{archive.folder}/{name}"] = archives.cifar_binary_records(images[sl], labels[sl])
            else:
                key = b"labels" if dataset == "cifar10" else b"fine_labels"
                members[f"{archive.folder}/{name}"] = archives.cifar_python_batch(
                    images[sl], [lab[-1] for lab in labels[sl]], key
                )
    members[f"{archive.folder}/readme.html"] = b"<html></html>"
    return members


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
@pytest.mark.parametrize("kind", ["binary", "python"])
def test_cifar_tarball_reads_back_exactly(
    isolated: Path, monkeypatch: pytest.MonkeyPatch, dataset: str, kind: str
) -> None:
    data = make_cifar(dataset)
    tarball = archives.write_tar_gz(
        isolated / cifar.ARCHIVES[dataset][kind].filename, cifar_members(dataset, kind, data)
    )
    monkeypatch.setitem(cifar.OFFICIAL_MD5, tarball.name, md5(tarball.read_bytes()))
    for split, (images, labels) in data.items():
        ds = load_split(dataset, split, data_dir=str(isolated), source="archive")
        assert ds.images.dtype == np.uint8 and ds.images.shape == (len(images), 32, 32, 3)
        np.testing.assert_array_equal(ds.images, images)
        assert ds.labels.dtype == np.int32 and ds.labels.tolist() == [lab[-1] for lab in labels]  # fine labels
        assert ds.num_classes == (10 if dataset == "cifar10" else 100)


@pytest.mark.parametrize("kind", ["binary", "python"])
def test_cifar_extracted_folder(isolated: Path, kind: str) -> None:
    data = make_cifar("cifar100", seed=3)
    for name, content in cifar_members("cifar100", kind, data).items():
        (isolated / name).parent.mkdir(exist_ok=True)
        (isolated / name).write_bytes(content)
    images, labels = cifar.read("cifar100", "test", data_dir=isolated, verify=False)
    np.testing.assert_array_equal(images, data["test"][0])
    assert labels.tolist() == [lab[1] for lab in data["test"][1]]
    # The extracted folder itself as data_dir works too.
    images, _ = cifar.read(
        "cifar100", "train", data_dir=isolated / cifar.ARCHIVES["cifar100"][kind].folder, verify=False
    )
    np.testing.assert_array_equal(images, data["train"][0])
    # With verification, a folder holding fewer than the official 10000 test examples is refused.
    with pytest.raises(DatasetNotFoundError, match="holds 3 test examples, expected 10000"):
        cifar.read("cifar100", "test", data_dir=isolated)


def test_cifar_damaged_tarball(isolated: Path) -> None:
    tarball = archives.write_tar_gz(
        isolated / "cifar-10-binary.tar.gz", cifar_members("cifar10", "binary", make_cifar("cifar10"))
    )
    with pytest.raises(DatasetNotFoundError) as err:
        load_split("cifar10", "train", data_dir=str(isolated), source="archive")
    message = str(err.value)
    found = md5(tarball.read_bytes())
    assert (
        f"cifar-10-binary.tar.gz is damaged (md5 expected c32a1d4ab5d03f1284b67883e8d87530, found {found})" in message
    )
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz" in message and "JAXCNN_DATA_DIR" in message


def test_cifar_pickle_cannot_run_code(isolated: Path) -> None:
    class Evil:
        def __reduce__(self):  # unpickling would call os.system
            import os

            return (os.system, ("true",))

    folder = isolated / "cifar-10-batches-py"
    folder.mkdir()
    for name in cifar.ARCHIVES["cifar10"]["python"].splits["test"]:
        (folder / name).write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))
    with pytest.raises(DatasetNotFoundError, match=r"unexpected object (posix|nt)\.system"):
        cifar.read("cifar10", "test", data_dir=isolated, verify=False)


def test_cifar_binary_with_a_truncated_record(isolated: Path) -> None:
    folder = isolated / "cifar-10-batches-bin"
    folder.mkdir()
    (folder / "test_batch.bin").write_bytes(bytes(3073 * 2 - 1))
    with pytest.raises(DatasetNotFoundError, match="not a whole number of 3073-byte records"):
        cifar.read("cifar10", "test", data_dir=isolated, verify=False)


# ---------------------------------------------------------------------------------------------------------
# SVHN
# ---------------------------------------------------------------------------------------------------------


def test_svhn_mat_reads_back_with_ten_as_zero(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images = archives.random_images(7, (32, 32, 3), seed=5)
    labels = np.array([0, 1, 2, 9, 0, 5, 3])
    path = archives.write_svhn_mat(isolated / "test_32x32.mat", images, labels)
    monkeypatch.setitem(svhn.OFFICIAL_MD5, path.name, md5(path.read_bytes()))
    monkeypatch.setitem(DATASET_INFO["svhn_cropped"].num_examples, "test", 7)  # type: ignore[index]
    ds = load_split("svhn_cropped", "test", data_dir=str(isolated), source="archive")
    np.testing.assert_array_equal(ds.images, images)
    assert ds.labels.dtype == np.int32 and ds.labels.tolist() == labels.tolist()


def test_svhn_damaged_and_missing(isolated: Path) -> None:
    archives.write_svhn_mat(isolated / "train_32x32.mat", archives.random_images(2, (32, 32, 3), 0), np.array([1, 2]))
    with pytest.raises(DatasetNotFoundError, match="train_32x32.mat is damaged \\(md5 expected e26dedcc"):
        load_split("svhn_cropped", "train", data_dir=str(isolated), source="archive")
    with pytest.raises(DatasetNotFoundError) as err:
        load_split("svhn_cropped", "extra", data_dir=str(isolated), source="archive")
    assert "Looked for extra_32x32.mat" in str(err.value)
    assert "http://ufldl.stanford.edu/housenumbers/extra_32x32.mat" in str(err.value)
