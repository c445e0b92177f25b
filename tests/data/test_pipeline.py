"""Input pipelines: device-resident epochs, eval sets with masks, and the grain streaming loader.

Runs on the eight fake CPU devices of tests/conftest.py; batch contents are checked against the host arrays
indexed by plain NumPy.
"""

import io
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from PIL import Image

from jaxcnn.data.dataset import ArrayDataset
from jaxcnn.data.pipeline import (
    DeviceEpochLoader,
    DeviceEvalSet,
    check_batch_size,
    epoch_permutation,
    eval_batches,
    train_val_split,
)
from jaxcnn.data.streaming import CenterCrop, RandomResizedCrop, StreamingLoader, decode_image, prefetch_to_device


@pytest.fixture(scope="module")
def sharding():
    assert jax.device_count() == 8, "tests/conftest.py should give eight fake CPU devices"
    return NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P("data"))


def _dataset(n, h=4, w=3, c=1, seed=0):
    """Images whose first pixel encodes the row (row % 251), labels = row: contents are checkable."""
    images = np.random.default_rng(seed).integers(0, 256, (n, h, w, c), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(n) % 251
    return ArrayDataset(images, np.arange(n, dtype=np.int32), num_classes=n, name=f"synthetic{n}")


def _host(batch):
    return {k: np.asarray(v) for k, v in batch.items()}


# --- the epoch order --------------------------------------------------------------------------------------


def test_epoch_permutation_covers_every_example_once_and_changes_per_epoch():
    n = 1000
    orders = [epoch_permutation(seed=3, epoch=e, n=n) for e in range(3)]
    for order in orders:
        assert order.dtype == np.int64
        np.testing.assert_array_equal(np.sort(order), np.arange(n))
    assert not np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[1], orders[2])
    np.testing.assert_array_equal(epoch_permutation(3, 1, n), orders[1])  # a pure function of (seed, epoch)
    assert not np.array_equal(epoch_permutation(4, 1, n), orders[1])


# --- training epochs --------------------------------------------------------------------------------------


def test_batches_are_sharded_over_eight_devices_and_match_the_host_permutation(sharding):
    ds = _dataset(1000)
    loader = DeviceEpochLoader(ds, batch_size=96, seed=1, sharding=sharding)
    assert loader.steps_per_epoch == 10 == len(loader)  # 1000 // 96; the last 40 are dropped
    order = epoch_permutation(1, 2, 1000)[: 10 * 96].reshape(10, 96)
    batches = list(loader.epoch(2))
    assert len(batches) == 10
    for k, batch in enumerate(batches):
        image = batch["image"]
        assert image.shape == (96, 4, 3, 1) and image.dtype == np.uint8
        assert batch["label"].dtype == np.int32 and batch["index"].dtype == np.int32
        assert image.sharding.is_equivalent_to(sharding, image.ndim)
        shards = image.addressable_shards
        assert len(shards) == 8 and {s.device for s in shards} == set(jax.devices())
        for shard in shards:
            assert shard.data.shape == (12, 4, 3, 1)
            np.testing.assert_array_equal(np.asarray(shard.data), ds.images[order[k][shard.index[0]]])
        host = _host(batch)
        np.testing.assert_array_equal(host["image"], ds.images[order[k]])
        np.testing.assert_array_equal(host["label"], ds.labels[order[k]])
        np.testing.assert_array_equal(host["index"], order[k])
    seen = np.concatenate([_host(b)["index"] for b in batches])
    assert len(np.unique(seen)) == 960


def test_epochs_differ_and_repeat_exactly(sharding):
    loader = DeviceEpochLoader(_dataset(200), 40, seed=0, sharding=sharding)
    first = [_host(b)["index"] for b in loader.epoch(0)]
    again = [_host(b)["index"] for b in loader.epoch(0)]
    second = [_host(b)["index"] for b in loader.epoch(1)]
    np.testing.assert_array_equal(np.stack(first), np.stack(again))
    assert not np.array_equal(np.stack(first), np.stack(second))


@pytest.mark.parametrize("start_step", [0, 1, 4, 7])
def test_resume_yields_exactly_the_remaining_batches(sharding, start_step):
    loader = DeviceEpochLoader(_dataset(300), 40, seed=9, sharding=sharding)
    full = [_host(b) for b in loader.epoch(5)]
    resumed = [_host(b) for b in loader.epoch(5, start_step=start_step)]
    assert len(resumed) == loader.steps_per_epoch - start_step
    for a, b in zip(full[start_step:], resumed):
        for key in ("image", "label", "index"):
            np.testing.assert_array_equal(a[key], b[key])


def test_resume_past_the_end_is_an_error(sharding):
    loader = DeviceEpochLoader(_dataset(100), 16, sharding=sharding)
    assert list(loader.epoch(0, start_step=loader.steps_per_epoch)) == []
    with pytest.raises(ValueError, match=r"start_step=7 must be in \[0, 6\]"):
        loader.epoch(0, start_step=7)


def test_batch_size_not_divisible_by_devices_is_a_clear_error(sharding):
    with pytest.raises(ValueError, match="^batch_size 100 is not divisible by 8 devices; use 96 or 104$"):
        DeviceEpochLoader(_dataset(500), 100, sharding=sharding)
    with pytest.raises(ValueError, match="^batch_size 5 is not divisible by 8 devices; use 8$"):
        check_batch_size(5, sharding)
    with pytest.raises(ValueError, match="larger than synthetic10"):
        DeviceEpochLoader(_dataset(10), 16, sharding=sharding)


def test_a_two_axis_mesh_shards_the_batch_over_data_and_replicates_over_model():
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    ds = _dataset(100)
    loader = DeviceEpochLoader(ds, 12, seed=3, sharding=NamedSharding(mesh, P("data", None, None, None)))
    order = loader.epoch_indices(0)
    for k, batch in enumerate(loader.epoch(0)):
        shards = batch["image"].addressable_shards
        assert len(shards) == 8 and len({s.index[0].start for s in shards}) == 4  # 4 parts, each on 2 devices
        for shard in shards:
            assert shard.data.shape[0] == 3
            np.testing.assert_array_equal(np.asarray(shard.data), ds.images[order[k][shard.index[0]]])
    with pytest.raises(ValueError, match="is not divisible by 4 devices; use 8 or 12"):
        DeviceEpochLoader(ds, 10, sharding=NamedSharding(mesh, P("data")))
    with pytest.raises(ValueError, match="shards more than the batch axis"):
        DeviceEpochLoader(ds, 16, sharding=NamedSharding(mesh, P("data", "model")))


def test_default_device_when_no_sharding_is_given():
    ds = _dataset(50)
    batch = next(iter(DeviceEpochLoader(ds, 10, seed=2).epoch(0)))
    assert batch["image"].devices() == {jax.local_devices()[0]}
    np.testing.assert_array_equal(np.asarray(batch["image"]), ds.images[epoch_permutation(2, 0, 50)[:10]])


# --- evaluation -------------------------------------------------------------------------------------------


def test_eval_batches_count_every_example_once_when_no_device_count_divides(sharding):
    ds = _dataset(1001)
    batches = [_host(b) for b in eval_batches(ds, 96, sharding)]
    assert len(batches) == 11  # ceil(1001 / 96)
    for b in batches:
        assert b["image"].shape == (96, 4, 3, 1) and b["mask"].shape == (96,) and b["mask"].dtype == bool
    mask = np.concatenate([b["mask"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    images = np.concatenate([b["image"] for b in batches])
    assert mask.sum() == 1001 and not mask[1001:].any()
    np.testing.assert_array_equal(np.sort(labels[mask]), np.arange(1001))
    np.testing.assert_array_equal(images[mask], ds.images)
    assert not images[~mask].any() and not labels[~mask].any()  # zero padding


def test_eval_set_rounds_the_batch_up_is_sharded_and_is_reusable(sharding):
    ds = _dataset(300)
    eval_set = DeviceEvalSet(ds, 100, sharding=sharding)
    assert eval_set.batch_size == 104 and len(eval_set) == 3
    first = list(eval_set)
    assert all(len(b["mask"].addressable_shards) == 8 for b in first)
    for a, b in zip(first, eval_set):
        np.testing.assert_array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
    assert DeviceEvalSet(_dataset(20), 1000, sharding=sharding).batch_size == 24  # not larger than needed


def test_train_val_split_takes_the_last_examples():
    ds = _dataset(100)
    train, val = train_val_split(ds, 10)
    assert len(train) == 90 and len(val) == 10
    np.testing.assert_array_equal(val.labels, np.arange(90, 100))
    np.testing.assert_array_equal(train.images, ds.images[:90])
    with pytest.raises(ValueError, match="val_size=100"):
        train_val_split(ds, 100)


# --- several processes ------------------------------------------------------------------------------------

_PROCESS_SCRIPT = textwrap.dedent(
    """
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax
    jax.distributed.initialize(sys.argv[2], num_processes=2, process_id=int(sys.argv[1]))
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from jaxcnn.data.dataset import ArrayDataset
    from jaxcnn.data.pipeline import DeviceEpochLoader, DeviceEvalSet

    sharding = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P("data"))
    images = (np.arange(203)[:, None, None, None] % 251 * np.ones((1, 2, 2, 1))).astype(np.uint8)
    ds = ArrayDataset(images, np.arange(203, dtype=np.int32), 203, "synthetic")
    loader = DeviceEpochLoader(ds, 16, seed=5, sharding=sharding)
    order = loader.epoch_indices(1)
    p = jax.process_index()
    for k, batch in enumerate(loader.epoch(1, start_step=2), start=2):
        for shard in batch["image"].addressable_shards:
            rows = order[k][shard.index[0]]
            assert 8 * p <= shard.index[0].start < 8 * (p + 1), (p, shard.index)
            assert (np.asarray(shard.data)[:, 0, 0, 0] == rows % 251).all()
    eval_set = DeviceEvalSet(ds, 24, sharding=sharding)
    local = [int(np.asarray(s.data).sum()) for b in eval_set for s in b["mask"].addressable_shards]
    print("MASKED", sum(local))
    """
)


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_each_put_only_their_rows_of_every_batch(tmp_path):
    script = tmp_path / "process.py"
    script.write_text(_PROCESS_SCRIPT)
    address = f"localhost:{_free_port()}"
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(p), address], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for p in range(2)
    ]
    outputs = [proc.communicate(timeout=120)[0] for proc in procs]
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out
    masked = [int(line.split()[1]) for out in outputs for line in out.splitlines() if line.startswith("MASKED")]
    assert len(masked) == 2 and sum(masked) == 203  # each example evaluated once over both processes


# --- streaming --------------------------------------------------------------------------------------------


class ArraySource:
    """A random-access source over in-memory arrays: source[i] -> {'image': uint8 [H, W, C], 'label': int}."""

    num_classes = 10
    name = "array_source"

    def __init__(self, n, h=6, w=5, c=3):
        self.images = np.random.default_rng(0).integers(0, 256, (n, h, w, c), dtype=np.uint8)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": i % 10}


class PngSource:
    """PNG-encoded images of varying sizes, decoded by the loader's workers; image i is filled with i % 251."""

    num_classes = 10
    name = "png_source"

    def __init__(self, n, fail_at=None):
        rng = np.random.default_rng(1)
        self.encoded = []
        for i in range(n):
            h, w = int(rng.integers(20, 40)), int(rng.integers(20, 40))
            buffer = io.BytesIO()
            Image.fromarray(np.full((h, w, 3), i % 251, np.uint8)).save(buffer, "PNG")
            self.encoded.append(buffer.getvalue())
        self.fail_at = fail_at

    def __len__(self):
        return len(self.encoded)

    def __getitem__(self, i):
        if i == self.fail_at:
            raise OSError(f"example {i} is unreadable")
        return {"image": self.encoded[i], "label": i % 10}


def test_streaming_batches_follow_the_epoch_permutation_and_are_sharded(sharding):
    source = ArraySource(203)
    loader = StreamingLoader(source, 32, seed=4, sharding=sharding, num_threads=2)
    assert loader.steps_per_epoch == 6
    order = epoch_permutation(4, 3, 203)[: 6 * 32].reshape(6, 32)  # one process reads every entry
    batches = list(loader.epoch(3))
    assert len(batches) == 6
    for k, batch in enumerate(batches):
        assert len(batch["image"].addressable_shards) == 8
        assert batch["image"].sharding.is_equivalent_to(sharding, 4)
        host = _host(batch)
        np.testing.assert_array_equal(host["index"], order[k])
        np.testing.assert_array_equal(host["image"], source.images[order[k]])
        np.testing.assert_array_equal(host["label"], order[k] % 10)
    resumed = [_host(b)["index"] for b in loader.epoch(3, start_step=4)]
    np.testing.assert_array_equal(np.stack(resumed), order[4:])


def test_streaming_splits_the_permutation_between_processes():
    loader = StreamingLoader(ArraySource(100), 8)
    order = epoch_permutation(0, 0, 100)
    parts = [loader.process_indices(0, process_index=p, process_count=4) for p in range(4)]
    for p, part in enumerate(parts):
        np.testing.assert_array_equal(part, order[p::4][: len(part)])
    assert len(np.unique(np.concatenate(parts))) == sum(len(part) for part in parts)


def test_streaming_decodes_pngs_and_crops_them_to_one_size(sharding):
    source = PngSource(40)
    loader = StreamingLoader(source, 16, seed=1, sharding=sharding, transform=CenterCrop(16), num_threads=2)
    batches = [_host(b) for b in loader.epoch(0)]
    assert len(batches) == 2
    for b in batches:
        assert b["image"].shape == (16, 16, 16, 3) and b["image"].dtype == np.uint8
        expected = (b["index"] % 251).astype(np.uint8)[:, None, None, None]
        np.testing.assert_array_equal(b["image"], np.broadcast_to(expected, b["image"].shape))


def test_streaming_needs_a_transform_for_images_of_different_sizes(sharding):
    loader = StreamingLoader(PngSource(16), 8, sharding=sharding, num_threads=2)
    with pytest.raises(ValueError, match="different shapes"):
        list(loader.epoch(0))


def test_streaming_reraises_a_reader_error(sharding):
    loader = StreamingLoader(PngSource(32, fail_at=5), 8, sharding=sharding, transform=CenterCrop(8), num_threads=2)
    with pytest.raises(OSError, match="example 5 is unreadable"):
        list(loader.epoch(0))


def test_streaming_random_crops_are_reproducible(sharding):
    source = ArraySource(64, h=24, w=20)
    loader = StreamingLoader(source, 16, seed=2, sharding=sharding, transform=RandomResizedCrop(8), num_threads=2)
    a = [_host(b)["image"] for b in loader.epoch(1)]
    b = [_host(b)["image"] for b in loader.epoch(1)]
    np.testing.assert_array_equal(np.stack(a), np.stack(b))
    assert a[0].shape == (16, 8, 8, 3)


@pytest.mark.slow
def test_streaming_with_worker_processes_gives_the_same_batches(sharding):
    source = PngSource(48)
    kwargs = dict(seed=7, sharding=sharding, transform=CenterCrop(12), num_threads=2)
    threads = [_host(b) for b in StreamingLoader(source, 16, **kwargs).epoch(2)]
    workers = [_host(b) for b in StreamingLoader(source, 16, num_workers=2, **kwargs).epoch(2)]
    assert len(threads) == len(workers) == 3
    for a, b in zip(threads, workers):
        np.testing.assert_array_equal(a["index"], b["index"])
        np.testing.assert_array_equal(a["image"], b["image"])


def test_prefetch_stops_when_the_consumer_stops(sharding):
    produced = []

    def host_batches():
        for k in range(1000):
            produced.append(k)
            yield {"x": np.full((8, 2), k, np.float32)}

    stream = prefetch_to_device(host_batches(), sharding, 8, size=2)
    assert float(next(stream)["x"][0, 0]) == 0.0
    stream.close()
    assert len(produced) <= 5  # the one taken, two in flight, one being put, one being made


# --- per-example transforms -------------------------------------------------------------------------------


def test_center_crop_without_resizing_is_the_middle_window():
    image = np.random.default_rng(0).integers(0, 256, (32, 40, 3), dtype=np.uint8)
    out = CenterCrop(16, crop_fraction=0.5)(image)  # shorter side already 16 / 0.5 = 32: no resize
    np.testing.assert_array_equal(out, image[8:24, 12:28])


def test_random_resized_crop_of_the_whole_square_image_is_the_image():
    image = np.random.default_rng(0).integers(0, 256, (10, 10, 1), dtype=np.uint8)
    out = RandomResizedCrop(10, scale=(1.0, 1.0), ratio=(1.0, 1.0))(image, np.random.default_rng(0))
    np.testing.assert_array_equal(out, image)


def test_decode_image_keeps_grayscale_as_one_channel():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    buffer = io.BytesIO()
    Image.fromarray(gray).save(buffer, "PNG")
    np.testing.assert_array_equal(decode_image(buffer.getvalue()), gray[:, :, None])
    np.testing.assert_array_equal(decode_image(gray), gray[:, :, None])
    with pytest.raises(ValueError, match="expected uint8"):
        decode_image(np.zeros((2, 2, 3), np.float32))
