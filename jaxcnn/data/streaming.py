"""Streaming input for datasets too large to hold decoded: grain reads, decodes and crops in the background.

    source = load_split("imagenet2012", "train")      # a RandomAccessSource: source[i] -> {'image', 'label'}
    loader = StreamingLoader(source, batch_size=256, seed=0, sharding=NamedSharding(mesh, P("data")),
                             transform=RandomResizedCrop(224), num_threads=16)
    for batch in loader.epoch(epoch):                 # {'image': uint8 [B, 224, 224, 3], 'label', 'index'}
        ...

Per epoch, every process computes the same permutation (`pipeline.epoch_permutation`) and reads the indices
p, p + P, p + 2P, ... of it (process p of P). A grain pipeline maps `source[i]` -> decode (encoded PNG/JPEG
bytes or an array) -> `transform` (resize/crop to a fixed size) and stacks the batch, `num_threads` batches at a
time in reader threads, optionally inside `num_workers` worker processes (grain interleaves their outputs back
into the same order, so the batches do not depend on the thread or worker count). A background thread keeps
`prefetch` batches in flight to the devices (`jax.make_array_from_process_local_data` with the batch sharding).

As with the device-resident loader, an epoch has N // B global batches (the rest of the permutation is dropped)
and `start_step` resumes mid-epoch with exactly the remaining batches.
"""

from __future__ import annotations

import io
import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import grain
import jax
import numpy as np
from jax.sharding import Sharding
from PIL import Image

from jaxcnn.data.dataset import RandomAccessSource
from jaxcnn.data.pipeline import Batch, batch_sharding, check_batch_size, epoch_permutation, process_rows

# transform(image uint8 [h, w, c], rng) -> uint8 [H, W, C] of one fixed shape.
Transform = Callable[[np.ndarray, np.random.Generator], np.ndarray]


# ---------------------------------------------------------------------------------------------------------
# Decoding and per-example transforms (run in the background threads / worker processes)
# ---------------------------------------------------------------------------------------------------------


def decode_image(value: Any) -> np.ndarray:
    """An image as uint8 [H, W, C]: encoded bytes (PNG, JPEG, ...) are decoded with PIL; grayscale keeps C=1,
    anything else becomes RGB. Arrays [H, W] or [H, W, C] pass through."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        with Image.open(io.BytesIO(value)) as im:
            im = im if im.mode in ("L", "RGB") else im.convert("RGB")
            value = np.asarray(im)
    array = np.asarray(value)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.dtype != np.uint8 or array.ndim != 3:
        raise ValueError(f"decode_image: expected uint8 [H, W, C] or encoded bytes, got {array.dtype} {array.shape}")
    return array


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of uint8 [h, w, c] to [height, width, c] (PIL, antialiased when shrinking)."""
    if image.shape[:2] == (height, width):
        return image
    squeeze = image.shape[2] == 1
    im = Image.fromarray(image[:, :, 0] if squeeze else image)
    out = np.asarray(im.resize((width, height), Image.BILINEAR))
    return out[:, :, None] if squeeze else out


@dataclass(frozen=True)
class CenterCrop:
    """Evaluation transform: resize the shorter side to round(size / crop_fraction), crop the centre size x size."""

    size: int
    crop_fraction: float = 0.875

    def __call__(self, image: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        h, w = image.shape[:2]
        short = round(self.size / self.crop_fraction)
        scale = short / min(h, w)
        rh, rw = max(self.size, round(h * scale)), max(self.size, round(w * scale))
        image = _resize(image, rh, rw)
        top, left = (rh - self.size) // 2, (rw - self.size) // 2
        return image[top : top + self.size, left : left + self.size]


@dataclass(frozen=True)
class RandomResizedCrop:
    """Training transform (Inception-style): a random window covering `scale` of the area with aspect ratio in
    `ratio` (log-uniform), resized to size x size. Falls back to a centre crop after 10 failed draws."""

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        h, w = image.shape[:2]
        for _ in range(10):
            area = h * w * rng.uniform(*self.scale)
            aspect = np.exp(rng.uniform(np.log(self.ratio[0]), np.log(self.ratio[1])))
            ch, cw = round(np.sqrt(area / aspect)), round(np.sqrt(area * aspect))
            if 0 < ch <= h and 0 < cw <= w:
                top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
                return _resize(image[top : top + ch, left : left + cw], self.size, self.size)
        return CenterCrop(self.size, 1.0)(image)


@dataclass(frozen=True)
class _LoadExample:
    """index -> {'image': uint8 [H, W, C], 'label': int32, 'index': int32}; picklable for worker processes.

    The transform's generator is seeded by (seed, epoch, index), so an example's crop does not depend on
    which thread or process loads it.
    """

    source: RandomAccessSource
    transform: Transform | None
    seed: int
    epoch: int

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        record = self.source[index]
        image = decode_image(record["image"])
        if self.transform is not None:
            image = self.transform(image, np.random.default_rng([self.seed, self.epoch, index]))
        return {"image": image, "label": np.int32(record["label"]), "index": np.int32(index)}


def _stack(examples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    try:
        return {k: np.stack([e[k] for e in examples]) for k in examples[0]}
    except ValueError as err:
        shapes = sorted({e["image"].shape for e in examples})
        raise ValueError(
            f"images in a batch have different shapes {shapes}: pass a transform that makes one size, "
            "e.g. transform=CenterCrop(224) or RandomResizedCrop(224)"
        ) from err


# ---------------------------------------------------------------------------------------------------------
# Prefetch to the devices
# ---------------------------------------------------------------------------------------------------------


def prefetch_to_device(
    host_batches: Iterator[Mapping[str, np.ndarray]],
    sharding: Sharding,
    global_batch_size: int,
    size: int = 2,
) -> Iterator[Batch]:
    """Moves process-local host batches ([B_local, ...] arrays) to the devices in a background thread.

    Keeps up to `size` batches transferred ahead of the consumer. Each batch becomes global [B, ...] arrays with
    `sharding` (`jax.make_array_from_process_local_data`). An error in the producer is re-raised here; closing
    the returned generator stops the thread.
    """
    done = object()
    slots: queue.Queue[Any] = queue.Queue(maxsize=size)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for host in host_batches:
                batch = {
                    k: jax.make_array_from_process_local_data(sharding, v, (global_batch_size,) + v.shape[1:])
                    for k, v in host.items()
                }
                if not put(batch):
                    return
            put(done)
        except BaseException as err:  # handed to the consumer, which re-raises it
            put(err)

    thread = threading.Thread(target=produce, name="jaxcnn-prefetch-to-device", daemon=True)
    thread.start()
    try:
        while True:
            item = slots.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=10)


def _mark_absl_flags_parsed() -> None:
    """grain <= 0.2.18's worker processes read an absl flag, which raises UnparsedFlagAccessError in programs
    that do not start through absl.app (google/grain#1355, fixed upstream by google/grain#1362). Marking the
    flags parsed keeps every flag at its default, as grain intends in that state."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


# ---------------------------------------------------------------------------------------------------------
# The loader
# ---------------------------------------------------------------------------------------------------------


class StreamingLoader:
    """Shuffled batches from a random-access source, decoded in the background, prefetched to the devices.

    source: `len(source)`, `source[i] -> {'image': uint8 [h, w, c] or encoded bytes, 'label': int}`.
    batch_size: the global batch B (divisible by the device count of `sharding`; None = the first local
    device). transform: `(image, rng) -> uint8 [H, W, C]` of one shape for all examples (`CenterCrop`,
    `RandomResizedCrop`, or None when the source's images already share a shape). num_threads: reader threads
    per process (or per worker), each loading a whole batch; num_workers: worker processes (0 = threads only;
    above 0 the source and transform must pickle, and starting the workers costs seconds per epoch); prefetch:
    batches kept in flight to the devices.

    `epoch(e, start_step)` yields {'image': uint8 [B, H, W, C], 'label': int32 [B], 'index': int32 [B]}.
    """

    def __init__(
        self,
        source: RandomAccessSource,
        batch_size: int,
        seed: int = 0,
        *,
        sharding: Sharding | None = None,
        transform: Transform | None = None,
        num_threads: int = 8,
        num_workers: int = 0,
        prefetch: int = 2,
    ):
        self.sharding = batch_sharding(sharding)
        check_batch_size(batch_size, self.sharding)
        if batch_size > len(source):
            raise ValueError(
                f"batch_size {batch_size} is larger than the source ({len(source)} examples): lower batch_size"
            )
        self.source = source
        self.batch_size = batch_size
        self.seed = seed
        self.transform = transform
        self.num_threads = num_threads
        self.num_workers = num_workers
        self.prefetch = prefetch
        self.steps_per_epoch = len(source) // batch_size
        self.local_batch_size = len(process_rows(self.sharding, batch_size))

    def __len__(self) -> int:
        return self.steps_per_epoch

    def process_indices(
        self, epoch: int, process_index: int | None = None, process_count: int | None = None
    ) -> np.ndarray:
        """The source indices this process reads in `epoch`, in order: int64 [steps_per_epoch * B_local].

        Process p of P reads entries p, p + P, ... of the epoch's permutation; batch k is the k-th run of
        B_local of them.
        """
        p = jax.process_index() if process_index is None else process_index
        count = jax.process_count() if process_count is None else process_count
        mine = epoch_permutation(self.seed, epoch, len(self.source))[p::count]
        return mine[: self.steps_per_epoch * self.local_batch_size]

    def host_batches(self, epoch: int, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """This process's batches of `epoch` on the host (numpy [B_local, ...]), from `start_step` on."""
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step={start_step} must be in [0, {self.steps_per_epoch}] (steps per epoch)")
        indices = self.process_indices(epoch)[start_step * self.local_batch_size :]
        if len(indices) == 0:
            return iter(())
        load = _LoadExample(self.source, self.transform, self.seed, epoch)
        # Each reader thread loads a whole batch: grain's per-element hand-off between threads costs more than
        # reading a small image, so threads work on different batches, `num_threads` batches in flight.
        batches = (
            grain.MapDataset.source(indices.tolist())
            .map(load)
            .batch(self.local_batch_size, drop_remainder=True, batch_fn=_stack)
            .to_iter_dataset(grain.ReadOptions(num_threads=self.num_threads, prefetch_buffer_size=self.num_threads))
        )
        if self.num_workers:
            _mark_absl_flags_parsed()
            batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.num_workers))
        return iter(batches)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """Global batches start_step, ..., steps_per_epoch - 1 of `epoch`, on the devices."""
        return self._device_batches(self.host_batches(epoch, start_step))

    def _device_batches(self, host: Iterator[dict[str, np.ndarray]]) -> Iterator[Batch]:
        try:
            yield from prefetch_to_device(host, self.sharding, self.batch_size, self.prefetch)
        finally:
            close = getattr(host, "close", None)
            if close is not None:
                close()
