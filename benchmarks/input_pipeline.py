"""Images per second of each input path, beside the train step's, to show which one limits a run.

    python benchmarks/input_pipeline.py                         # batch 128, all local devices
    python benchmarks/input_pipeline.py --batch-size 512 --threads 4 --png-images 4096

Rows (each is the rate at which batches reach the devices, ready for a step):
  device-resident      DeviceEpochLoader over a synthetic CIFAR-sized array (one epoch, including its transfer)
  + augment/preprocess the same batches through a jitted augment_batch (crop 4, alternating flip, cutout 8)
                       + preprocess, i.e. the input part of the compiled train step
  eval set             DeviceEvalSet iteration (data already resident)
  streaming (arrays)   StreamingLoader over in-memory uint8 arrays (grain threads, prefetch to device)
  streaming (PNG)      StreamingLoader decoding PNGs of 36..48 px and centre-cropping to 32 in the workers
  mnist / fashion_mnist  DeviceEpochLoader over the real training arrays, when they are found locally
  train step           jaxcnn.train.step's jitted step (lenet5 on 28x28x1) for the same batch size
The input path is not the bottleneck while its rate is well above the train step's.
"""

from __future__ import annotations

import argparse
import io
import time
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from PIL import Image

from jaxcnn.data import augment
from jaxcnn.data.dataset import DATASET_INFO, ArrayDataset, DatasetNotFoundError
from jaxcnn.data.sources import load_split
from jaxcnn.data.pipeline import DeviceEpochLoader, DeviceEvalSet
from jaxcnn.data.streaming import CenterCrop, StreamingLoader


def images_per_second(batches: Callable[[], Iterable[dict]], batch_size: int, repeats: int = 2) -> float:
    """Best of `repeats` passes over `batches()`: images / seconds, each batch waited for on the device."""
    best = 0.0
    for _ in range(repeats):
        start, count = time.perf_counter(), 0
        for batch in batches():
            jax.block_until_ready(batch)
            count += batch_size
        best = max(best, count / (time.perf_counter() - start))
    return best


class ArraySource:
    """source[i] -> {'image': uint8 [H, W, C], 'label': int} over in-memory arrays."""

    num_classes, name = 10, "arrays"

    def __init__(self, images: np.ndarray):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": i % 10}


class PngSource(ArraySource):
    """Random-noise PNGs (they compress as badly as photos) of 36..48 px per side, decoded by the loader."""

    name = "pngs"

    def __init__(self, n: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        encoded = []
        for _ in range(n):
            h, w = rng.integers(36, 49, 2)
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buffer, "PNG")
            encoded.append(buffer.getvalue())
        self.images = encoded


def train_step_rate(batch_size: int, sharding: NamedSharding, steps: int) -> tuple[str, float]:
    """Images/s of the jitted train step (lenet5, Fashion-MNIST shapes) on `sharding`'s devices."""
    from jaxcnn.config import OptimConfig, ScheduleConfig
    from jaxcnn.models import create_model
    from jaxcnn.train.optim import make_optimizer
    from jaxcnn.train.state import create_train_state, init_variables
    from jaxcnn.train.step import StepOptions, make_train_step

    info = DATASET_INFO["fashion_mnist"]
    model = create_model("lenet5", num_classes=10)
    tx, _ = make_optimizer(OptimConfig(), ScheduleConfig(name="constant"), steps_per_epoch=100, total_steps=10_000)
    state = create_train_state(model, tx, init_variables(model, (1, 28, 28, 1), seed=0))
    state = jax.device_put(state, NamedSharding(sharding.mesh, P()))
    opts = StepOptions(num_classes=10, mean=info.mean, std=info.std, crop_padding=2, flip="random")
    step = jax.jit(make_train_step(opts))
    ds = ArrayDataset(
        np.random.default_rng(0).integers(0, 256, (batch_size * 4, 28, 28, 1), dtype=np.uint8),
        np.random.default_rng(1).integers(0, 10, batch_size * 4, dtype=np.int32),
        10,
        "synthetic",
    )
    batches = list(DeviceEpochLoader(ds, batch_size, sharding=sharding).epoch(0))
    state, metrics = step(state, batches[0], jax.random.PRNGKey(0))  # compile
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for i in range(steps):
        state, metrics = step(state, batches[i % len(batches)], jax.random.PRNGKey(i))
    jax.block_until_ready(metrics)
    return "train step (lenet5, 28x28x1, crop+flip)", steps * batch_size / (time.perf_counter() - start)


class _Rows:
    """Prints each measurement as it comes, aligned."""

    def append(self, row: tuple[str, float]) -> None:
        name, rate = row
        print(f"  {name:<56}  {rate:>12,.0f} images/s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=128, help="global batch (default 128)")
    parser.add_argument("--examples", type=int, default=20_000, help="synthetic 32x32x3 dataset size")
    parser.add_argument("--png-images", type=int, default=2048, help="synthetic PNGs for the streaming row")
    parser.add_argument("--threads", type=int, default=4, help="grain reader threads")
    parser.add_argument("--workers", type=int, default=0, help="grain worker processes (0 = threads only)")
    parser.add_argument("--train-steps", type=int, default=30, help="timed train steps (0 skips the row)")
    args = parser.parse_args()

    b = args.batch_size
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    rng = np.random.default_rng(0)
    cifar = ArrayDataset(
        rng.integers(0, 256, (args.examples, 32, 32, 3), dtype=np.uint8),
        rng.integers(0, 10, args.examples, dtype=np.int32),
        10,
        "synthetic-cifar",
    )
    print(f"batch size {b} on {jax.device_count()} x {jax.devices()[0].device_kind} (jax {jax.__version__})")
    rows = _Rows()

    loader = DeviceEpochLoader(cifar, b, seed=0, sharding=sharding)
    rows.append((f"device-resident epoch ({args.examples}x32x32x3)", images_per_second(lambda: loader.epoch(0), b)))

    info = DATASET_INFO["cifar10"]

    @jax.jit
    def augment_and_preprocess(batch: dict, key: jax.Array) -> jax.Array:
        images = augment.augment_batch(
            batch["image"], key, crop_padding=4, flip="alternating", cutout=8, epoch=1, indices=batch["index"]
        )
        return augment.preprocess(images, mean=info.mean, std=info.std, dtype=jnp.float32)

    def augmented() -> Iterable[jax.Array]:
        for k, batch in enumerate(loader.epoch(1)):
            yield augment_and_preprocess(batch, jax.random.PRNGKey(k))

    rows.append(("  + augment (crop 4, alt. flip, cutout 8) + preprocess", images_per_second(augmented, b)))

    eval_set = DeviceEvalSet(cifar, b, sharding=sharding)
    rows.append(("eval set iteration (resident)", images_per_second(lambda: iter(eval_set), eval_set.batch_size)))

    stream_options = dict(sharding=sharding, num_threads=args.threads, num_workers=args.workers)
    streaming = StreamingLoader(ArraySource(cifar.images), b, **stream_options)
    rate = images_per_second(lambda: streaming.epoch(0), b, 1)
    rows.append((f"streaming, in-memory arrays ({args.threads} threads, {args.workers} workers)", rate))

    png_loader = StreamingLoader(PngSource(args.png_images), b, transform=CenterCrop(32, 32 / 40), **stream_options)
    rate = images_per_second(lambda: png_loader.epoch(0), b, 1)
    rows.append((f"streaming, PNG decode + crop ({args.png_images} images)", rate))

    for name in ("mnist", "fashion_mnist"):
        try:
            real = load_split(name, "train")
        except DatasetNotFoundError:
            rows.append((f"{name} (not found locally: skipped)", float("nan")))
            continue
        real_loader = DeviceEpochLoader(real, b, seed=0, sharding=sharding)
        rows.append((f"{name} train, device-resident epoch", images_per_second(lambda: real_loader.epoch(0), b)))

    if args.train_steps:
        try:
            rows.append(train_step_rate(b, sharding, args.train_steps))
        except Exception as error:  # the step is another stage's code: report it, keep the input rows
            print(f"  train step failed, so it has no row: {type(error).__name__}: {str(error).splitlines()[0]}")


if __name__ == "__main__":
    main()
