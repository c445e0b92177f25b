"""The TFDS source: tfds.testing.mock_data, offline builds from the official files (MNIST from the shared
folder, Fashion-MNIST from Debian's re-headered copies), reading array_record builds without TensorFlow, the
random-access source for large datasets, and the errors when data or TensorFlow is missing."""

from __future__ import annotations

import gzip
import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from jaxcnn.data import ArrayDataset, DatasetNotFoundError, RandomAccessSource, load_split
from jaxcnn.data.sources import idx, locate, tfds_source

needs_tf = pytest.mark.skipif(
    not tfds_source.has_tensorflow(),
    reason="TensorFlow is not installed (it is absent on Python 3.12 here); TFDS preparation and tfds.load need it",
)

# Makes `import tensorflow` fail and find_spec('tensorflow') return None, as when it is not installed.
NO_TENSORFLOW = """
import importlib.util, sys
_find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, package=None: (
    None if name.split(".")[0] == "tensorflow" else _find_spec(name, package))
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "tensorflow":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, _Block())
"""


@pytest.fixture
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No JAXCNN_DATA_DIR, an empty cache, and TFDS_DATA_DIR in tmp_path (returned)."""
    monkeypatch.delenv(locate.DATA_DIR_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    return tmp_path / "tfds"


def by_content(ds: ArrayDataset) -> dict[bytes, int]:
    """{image bytes: label}: TFDS stores examples in its own order, so builds are compared as sets."""
    return {img.tobytes(): int(lab) for img, lab in zip(ds.images, ds.labels, strict=True)}


def assert_subset_of(tfds_ds: ArrayDataset, archive_ds: ArrayDataset) -> None:
    reference = by_content(archive_ds)
    for img, lab in zip(tfds_ds.images, tfds_ds.labels, strict=True):
        assert reference[img.tobytes()] == lab


# ---------------------------------------------------------------------------------------------------------
# Fast: no TensorFlow needed
# ---------------------------------------------------------------------------------------------------------


def test_large_dataset_without_a_build_names_every_way(isolated: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as err:
        load_split("imagenette", "train")
    message = str(err.value)
    assert f"No prepared TFDS build of 'imagenette' in {isolated}" in message
    assert "imagenette2.tgz" in message and "--set data.source=tfds" in message
    assert "manual_dir" in message and "pip install 'jaxcnn[tf]'" in message


def test_imagenet_error_explains_the_manual_download(isolated: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as err:
        load_split("imagenet2012", "validation", source="archive")
    message = str(err.value)
    assert "no archive reader" in message
    assert "ILSVRC2012_img_train.tar" in message and "ILSVRC2012_img_val.tar" in message


def test_prepare_without_tensorflow_says_how_to_install(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tfds_source, "has_tensorflow", lambda: False)
    with pytest.raises(tfds_source.TensorFlowMissingError, match=r"needs TensorFlow.*pip install 'jaxcnn\[tf\]'"):
        load_split("cifar10", "train", source="tfds")


def test_official_files_dir_restores_debian_headers(isolated: Path, fashion_dir: Path) -> None:
    with tfds_source.official_files_dir("fashion_mnist", data_dir=fashion_dir) as folder:
        assert folder is not None
        for name, official_md5 in idx.OFFICIAL_MD5["fashion_mnist"].items():
            assert hashlib.md5((folder / name).read_bytes()).hexdigest() == official_md5
    if folder != fashion_dir:  # Debian's copies were restored into a temporary folder, now removed
        assert not folder.exists()


def test_official_files_dir_uses_official_files_in_place(isolated: Path, mnist_dir: Path) -> None:
    with tfds_source.official_files_dir("mnist", data_dir=mnist_dir) as folder:
        assert folder == mnist_dir
    with tfds_source.official_files_dir("cifar10", data_dir=isolated) as folder:
        assert folder is None


# ---------------------------------------------------------------------------------------------------------
# tfds.testing.mock_data (TensorFlow needed)
# ---------------------------------------------------------------------------------------------------------


@needs_tf
@pytest.mark.slow
def test_mock_cifar10_through_tfds_load_and_load_split(isolated: Path) -> None:
    import tensorflow_datasets as tfds

    isolated.mkdir(parents=True)
    with tfds.testing.mock_data(num_examples=12):
        # Iterated, not batch_size=-1: that aborts the process under mock_data.
        examples = list(tfds.as_numpy(tfds.load("cifar10", split="train", data_dir=os.fspath(isolated))))
        ds = load_split("cifar10", "train", source="tfds")
    assert len(examples) == 12
    assert isinstance(ds, ArrayDataset) and ds.name == "cifar10/train" and ds.num_classes == 10
    assert ds.images.shape == (12, 32, 32, 3) and ds.images.dtype == np.uint8 and ds.labels.dtype == np.int32
    np.testing.assert_array_equal(ds.images, np.stack([e["image"] for e in examples]))
    assert ds.labels.tolist() == [int(e["label"]) for e in examples]


@needs_tf
@pytest.mark.slow
def test_wrong_files_in_manual_dir_give_the_clear_error(isolated: Path, tmp_path: Path) -> None:
    manual = tmp_path / "manual"
    manual.mkdir()
    for name in idx.OFFICIAL_MD5["mnist"]:
        (manual / name).write_bytes(gzip.compress(b"not mnist"))
    with pytest.raises(DatasetNotFoundError) as err:
        tfds_source.prepare("mnist", manual_dir=manual)
    message = str(err.value)
    assert f"TFDS could not prepare 'mnist' from the files in {manual}: NonMatchingChecksumError" in message
    assert idx.DOWNLOAD_URLS["mnist"][0] in message and "--set data.data_dir=FOLDER" in message


# ---------------------------------------------------------------------------------------------------------
# Offline builds from the official files (TensorFlow needed; each about 35 s on 2 cores)
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist_build(tmp_path_factory: pytest.TempPathFactory, mnist_dir: Path) -> Path:
    if not tfds_source.has_tensorflow():
        pytest.skip("TensorFlow is not installed: building a TFDS dataset needs it")
    data_dir = tmp_path_factory.mktemp("tfds_mnist")
    builder = tfds_source.prepare("mnist", data_dir=data_dir, manual_dir=mnist_dir)
    assert {f.value for f in builder.info.available_file_formats()} == {"array_record"}
    return data_dir


@pytest.mark.slow
def test_mnist_builds_offline_from_the_shared_folder(mnist_build: Path, mnist_dir: Path) -> None:
    test = load_split("mnist", "test", data_dir=str(mnist_build), source="tfds")
    reference = load_split("mnist", "test", data_dir=str(mnist_dir), source="archive")
    assert test.images.shape == (10000, 28, 28, 1) and test.images.dtype == np.uint8
    assert by_content(test) == by_content(reference)
    train = load_split("mnist", "train", data_dir=str(mnist_build), source="tfds", limit=500)
    assert len(train) == 500
    assert_subset_of(train, load_split("mnist", "train", data_dir=str(mnist_dir), source="archive"))


@pytest.mark.slow
def test_array_record_build_reads_without_tensorflow(mnist_build: Path, mnist_dir: Path) -> None:
    script = NO_TENSORFLOW + textwrap.dedent(
        f"""
        import hashlib, sys
        from jaxcnn.data import load_split
        ds = load_split("mnist", "test", data_dir={str(mnist_build)!r}, source="tfds", limit=300)
        assert not any(m.split(".")[0] == "tensorflow" for m in sys.modules), "TensorFlow was imported"
        print(hashlib.md5(ds.images.tobytes() + ds.labels.astype("<i4").tobytes()).hexdigest())
        """
    )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    expected = load_split("mnist", "test", data_dir=str(mnist_build), source="tfds", limit=300)
    digest = hashlib.md5(expected.images.tobytes() + expected.labels.astype("<i4").tobytes()).hexdigest()
    assert out.stdout.strip().splitlines()[-1] == digest
    assert_subset_of(expected, load_split("mnist", "test", data_dir=str(mnist_dir), source="archive"))


@pytest.mark.slow
def test_random_access_source_over_a_build(mnist_build: Path, mnist_dir: Path) -> None:
    import tensorflow_datasets as tfds

    builder = tfds.builder("mnist", data_dir=os.fspath(mnist_build))
    source = tfds_source.TFDSRandomAccessSource(builder, "test", num_classes=10, name="mnist/test", limit=50)
    assert isinstance(source, RandomAccessSource)
    assert len(source) == 50 and source.num_classes == 10
    first = source[0]
    assert first["image"].shape == (28, 28, 1) and first["image"].dtype == np.uint8 and isinstance(first["label"], int)
    assert np.array_equal(source[-1]["image"], source[49]["image"])
    several = source.__getitems__([3, 1, 2])
    assert [e["label"] for e in several] == [source[i]["label"] for i in (3, 1, 2)]
    with pytest.raises(IndexError):
        source[50]
    reference = by_content(load_split("mnist", "test", data_dir=str(mnist_dir), source="archive"))
    assert all(reference[source[i]["image"].tobytes()] == source[i]["label"] for i in range(50))


@pytest.mark.slow
def test_fashion_mnist_builds_offline_from_debian_files(
    tmp_path: Path, isolated: Path, fashion_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not tfds_source.has_tensorflow():
        pytest.skip("TensorFlow is not installed: building a TFDS dataset needs it")
    # Only Debian's folder holds the files: TFDS must get header-restored copies to pass its checksum check.
    monkeypatch.setattr(locate, "SYSTEM_FOLDERS", {"fashion_mnist": (str(fashion_dir),)})
    test = load_split("fashion_mnist", "test", source="tfds")
    assert (isolated / "fashion_mnist").is_dir()
    assert by_content(test) == by_content(load_split("fashion_mnist", "test", source="archive"))
