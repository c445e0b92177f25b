"""Device-resident epochs: the dataset goes to the devices as uint8 once per epoch, batches are slices of it.

    loader = DeviceEpochLoader(train, batch_size=512, seed=0, sharding=NamedSharding(mesh, P("data")))
    for epoch in range(epochs):
        for batch in loader.epoch(epoch):     # {'image': uint8 [B, H, W, C], 'label': int32 [B], 'index': int32 [B]}
            state, metrics = train_step(state, batch, rng)
    for batch in DeviceEvalSet(test, 1000, sharding):   # put once, iterate at every evaluation
        sums = eval_step(state, batch)            # batch also has 'mask': bool [B], False on padding

Per epoch the host permutes the uint8 images (a numpy take), reshapes them to [steps, B, H, W, C] and puts them
on the devices in one transfer, sharded along the batch axis (`P(None, 'data')`), so each device holds only its
part of every batch. A batch is then a jitted index into that array, which keeps the sharding and costs a
device-local copy of one batch. The order is a pure function of (seed, epoch), so a resumed run sees the same
batches (`start_step`).

With several processes (`jax.distributed`), each process transfers only the rows of every global batch that its
own devices hold (for the usual mesh over `jax.devices()`, process p of P holds rows [p*B/P, (p+1)*B/P)),
through `jax.make_array_from_process_local_data`; every process computes the same permutation from the seed.
"""

from __future__ import annotations

import math
from typing import Iterator

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec, Sharding, make_single_device_sharding

from jaxcnn.data.dataset import ArrayDataset

Batch = dict[str, jax.Array]


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of the `n` examples in `epoch`: int64 [n], a pure function of (seed, epoch, n)."""
    if n < 0 or epoch < 0 or seed < 0:
        raise ValueError(f"epoch_permutation: seed, epoch and n must be >= 0, got {seed}, {epoch}, {n}")
    return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int64)


def train_val_split(ds: ArrayDataset, val_size: int) -> tuple[ArrayDataset, ArrayDataset]:
    """(train, val): val is the last `val_size` examples of `ds`, train the rest (deterministic, no shuffle)."""
    if not 0 < val_size < len(ds):
        raise ValueError(
            f"val_size={val_size} must be between 1 and {len(ds) - 1} (the {ds.name} split has {len(ds)} examples)"
        )
    return ds.split(val_size)


# ---------------------------------------------------------------------------------------------------------
# Shardings
# ---------------------------------------------------------------------------------------------------------


def batch_sharding(sharding: Sharding | None) -> Sharding:
    """The loaders' batch sharding: None -> the first local device; NamedSharding(mesh, P('data', ...)) -> the
    same with only its leading entry (images [B, H, W, C] and labels [B] share it). Other axes must be unsharded."""
    if sharding is None:
        return make_single_device_sharding(jax.local_devices()[0])
    if isinstance(sharding, NamedSharding):
        if any(axis is not None for axis in tuple(sharding.spec)[1:]):
            raise ValueError(
                f"batch sharding {sharding.spec} shards more than the batch axis; the loaders shard only the "
                "leading axis: pass NamedSharding(mesh, P('data'))"
            )
        return NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[:1]))
    batch_shard_count(sharding)  # raises TypeError for kinds the loaders do not place
    return sharding


def batch_shard_count(sharding: Sharding) -> int:
    """How many parts `sharding` splits a batch's leading axis into (the data-parallel device count)."""
    if isinstance(sharding, NamedSharding):
        axes = sharding.spec[0] if len(sharding.spec) else None
        if axes is None:
            return 1
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        return math.prod(sharding.mesh.shape[a] for a in axes)
    if len(sharding.device_set) == 1:  # one device (make_single_device_sharding)
        return 1
    raise TypeError(
        f"batch sharding {sharding!r} is not supported: pass NamedSharding(mesh, P('data')) or None (one device)"
    )


def check_batch_size(batch_size: int, sharding: Sharding) -> None:
    """Raises ValueError unless `batch_size` splits evenly over the sharding's devices, naming valid sizes."""
    d = batch_shard_count(sharding)
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if batch_size % d:
        below, above = (batch_size // d) * d, (batch_size // d + 1) * d
        nearest = f"{below} or {above}" if below else f"{above}"
        raise ValueError(f"batch_size {batch_size} is not divisible by {d} devices; use {nearest}")


def stacked_sharding(sharding: Sharding) -> Sharding:
    """The sharding of [steps, B, ...]: the batch sharding with an unsharded steps axis in front."""
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec(None, *sharding.spec))
    return sharding


def process_rows(sharding: Sharding, batch_size: int) -> np.ndarray:
    """Rows of each global batch held by this process's devices: int64 [B_local], sorted.

    This is the order `jax.make_array_from_process_local_data` expects the process-local rows in.
    """
    rows: set[int] = set()
    for index in sharding.addressable_devices_indices_map((batch_size,)).values():
        rows.update(range(batch_size)[index[0]])
    return np.array(sorted(rows), dtype=np.int64)


def put_stacked(host: dict[str, np.ndarray], sharding: Sharding, batch_size: int) -> Batch:
    """Puts process-local [steps, B_local, ...] arrays as global [steps, B, ...] arrays, batch axis sharded.

    sharding: the batch sharding of [B, ...] arrays; batch_size: the global B. The stacked batches the multi-step
    train loop takes (`Strategy.compile_train_steps`).
    """
    stacked = stacked_sharding(sharding)
    return {
        k: jax.make_array_from_process_local_data(stacked, v, (v.shape[0], batch_size) + v.shape[2:])
        for k, v in host.items()
    }


@jax.jit
def take_batch(stacked: Batch, k: jax.Array) -> Batch:
    """Batch k of [steps, B, ...] arrays; the result keeps the batch-axis sharding."""
    return jax.tree.map(lambda a: a[k], stacked)


def _iterate_stacked(stacked: Batch) -> Iterator[Batch]:
    for k in range(next(iter(stacked.values())).shape[0]):
        yield take_batch(stacked, k)


# ---------------------------------------------------------------------------------------------------------
# Training epochs
# ---------------------------------------------------------------------------------------------------------


class DeviceEpochLoader:
    """Shuffled training batches from a dataset held on the devices as uint8.

    dataset: ArrayDataset (uint8 [N, H, W, C], int32 [N]); batch_size: the global batch B, split over the
    devices of `sharding` (NamedSharding(mesh, P('data')); None = the first local device); seed: with the
    epoch number, fixes the order (`epoch_permutation`).

    Each epoch yields `steps_per_epoch = N // B` batches {'image': uint8 [B, H, W, C], 'label': int32 [B],
    'index': int32 [B] (each example's row in `dataset`, for `augment.alternating_flip`)}. The last
    N mod B examples of the epoch's permutation are dropped (a partial batch would change the step's shapes and
    recompile it); they differ from epoch to epoch, so every example is still trained on.
    """

    def __init__(self, dataset: ArrayDataset, batch_size: int, seed: int = 0, *, sharding: Sharding | None = None):
        self.sharding = batch_sharding(sharding)
        check_batch_size(batch_size, self.sharding)
        if batch_size > len(dataset):
            raise ValueError(
                f"batch_size {batch_size} is larger than {dataset.name} ({len(dataset)} examples): "
                "no full batch fits in an epoch; lower batch_size"
            )
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.steps_per_epoch = len(dataset) // batch_size
        self._rows = process_rows(self.sharding, batch_size)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """The dataset rows of every global batch of `epoch`: int64 [steps_per_epoch, B] (host, all processes)."""
        n = self.steps_per_epoch * self.batch_size
        return epoch_permutation(self.seed, epoch, len(self.dataset))[:n].reshape(-1, self.batch_size)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """Batches start_step, ..., steps_per_epoch - 1 of `epoch` (start_step > 0 resumes mid-epoch).

        The epoch's remaining data is transferred (asynchronously) when this is called.
        """
        stacked = self.epoch_arrays(epoch, start_step)
        return iter(()) if stacked is None else _iterate_stacked(stacked)

    def epoch_arrays(self, epoch: int, start_step: int = 0) -> Batch | None:
        """The same batches stacked, as the multi-step train loop takes them: {'image': uint8 [S, B, H, W, C],
        'label': int32 [S, B], 'index': int32 [S, B]} with S = steps_per_epoch - start_step (batch axis on the
        loader's sharding); None when S = 0. Batch k of `epoch(epoch, start_step)` is entry k here."""
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step={start_step} must be in [0, {self.steps_per_epoch}] (steps per epoch)")
        indices = self.epoch_indices(epoch)[start_step:, self._rows]  # [steps, B_local]
        if indices.shape[0] == 0:
            return None
        host = {
            "image": self.dataset.images[indices],
            "label": self.dataset.labels[indices],
            "index": indices.astype(np.int32),
        }
        return put_stacked(host, self.sharding, self.batch_size)


# ---------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------


class DeviceEvalSet:
    """Every example of a dataset exactly once, in order, put on the devices once and reused.

    The batch size is `batch_size` rounded up to a multiple of the device count (and at most the dataset size
    rounded up the same way). The last batch is padded with zero images and label 0 up to the full batch;
    `mask` is False there, so sums over `mask` count each example once. Iterating yields {'image': uint8
    [B, H, W, C], 'label': int32 [B], 'mask': bool [B]}; `len()` is the number of batches.
    """

    def __init__(self, dataset: ArrayDataset, batch_size: int, *, sharding: Sharding | None = None):
        self.sharding = batch_sharding(sharding)
        if batch_size <= 0:
            raise ValueError(f"eval batch_size must be positive, got {batch_size}")
        if len(dataset) == 0:
            raise ValueError(f"{dataset.name} is empty: nothing to evaluate")
        d = batch_shard_count(self.sharding)
        n = len(dataset)
        self.dataset = dataset
        self.batch_size = min(-(-batch_size // d) * d, -(-n // d) * d)
        self.num_batches = -(-n // self.batch_size)
        self.num_examples = n
        rows = process_rows(self.sharding, self.batch_size)
        positions = np.arange(self.num_batches * self.batch_size).reshape(-1, self.batch_size)[:, rows]
        mask = positions < n
        safe = np.where(mask, positions, 0)
        host = {
            "image": np.where(mask[..., None, None, None], dataset.images[safe], np.uint8(0)),
            "label": np.where(mask, dataset.labels[safe], np.int32(0)).astype(np.int32),
            "mask": mask,
        }
        self._stacked = put_stacked(host, self.sharding, self.batch_size)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[Batch]:
        return _iterate_stacked(self._stacked)


def eval_batches(ds: ArrayDataset, batch_size: int, sharding: Sharding | None = None) -> Iterator[Batch]:
    """Iterates `DeviceEvalSet(ds, batch_size, sharding=sharding)` once (build the set to reuse it)."""
    return iter(DeviceEvalSet(ds, batch_size, sharding=sharding))

