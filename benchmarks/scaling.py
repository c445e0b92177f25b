"""Step time and images/s of the train step for 1, 2, 4, 8 devices under each parallel strategy.

    python benchmarks/scaling.py                                 # resnet20, 32 images per device, 32x32x3
    python benchmarks/scaling.py --model lenet5 --image 28,28,1 --per-device-batch 64 --steps 20
    python benchmarks/scaling.py --global-batch 256              # strong scaling: the same global batch

Every row runs jaxcnn's real path: `make_strategy` → `compile_train_steps(make_train_step(...))` (the timed
steps in one call, as `jaxcnn train` runs them) → `place_state`, stacked batches on `strategy.batch_sharding`. `compile s` is the first call (tracing + XLA
compilation); `step ms` is the mean over `--steps` further steps, waited for on the device; `images/s` is the
global batch over that. By default the batch per device is fixed (weak scaling), so ideal scaling keeps the
step time flat and multiplies images/s by the device count.

On a machine without accelerators the script asks XLA for 8 fake CPU devices. They share the same CPU cores,
so their rows measure the strategies' overhead (collectives, dispatch), not a speed-up: expect images/s to stay
flat or drop with more devices. On a multi-GPU or TPU machine the rows show the real scaling.
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    # only the host (CPU) platform is affected; accelerators are used as they are
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import argparse
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcnn.config import ConfigError, OptimConfig, ParallelConfig, ScheduleConfig
from jaxcnn.data.pipeline import put_stacked
from jaxcnn.models import create_model
from jaxcnn.train import parallel
from jaxcnn.train.optim import make_optimizer
from jaxcnn.train.state import create_train_state, init_variables
from jaxcnn.train.step import StepOptions, make_train_step


def time_strategy(
    name: str, n: int, batch: int, args: argparse.Namespace, variables: dict[str, Any]
) -> dict[str, float] | str:
    """One row: compile seconds, mean step milliseconds, images/s; or why the row was skipped."""
    try:
        strategy = parallel.make_strategy(ParallelConfig(strategy=name, num_devices=n), batch)
    except ConfigError as e:
        return f"skipped: {e}"
    model = create_model(args.model, num_classes=10, **model_knobs(args), **strategy.model_overrides)
    tx, _ = make_optimizer(OptimConfig(name="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4),
                           ScheduleConfig(name="constant"), steps_per_epoch=100, total_steps=10_000)
    state = strategy.place_state(create_train_state(model, tx, variables))
    opts = StepOptions(num_classes=10, mean=(125.0,) * args.image[2], std=(60.0,) * args.image[2],
                       compute_dtype=jnp.dtype(args.dtype))
    steps_fn = strategy.compile_train_steps(make_train_step(opts, axis_name=strategy.axis_name))
    rng = np.random.default_rng(0)
    total = args.steps + 2  # compile + warm-up + timed steps, one stacked batch each
    host = {"image": rng.integers(0, 256, (total, batch, *args.image)).astype(np.uint8),
            "label": rng.integers(0, 10, (total, batch)).astype(np.int32)}
    rows = strategy.process_rows(batch)
    batches = put_stacked({k: v[:, rows] for k, v in host.items()}, strategy.batch_sharding, batch)
    key = jax.random.PRNGKey(0)
    start = time.perf_counter()
    state, metrics = steps_fn(state, batches, 0, 1, key, 0)
    jax.block_until_ready((state, metrics))
    compile_s = time.perf_counter() - start
    state, metrics = steps_fn(state, batches, 1, 1, key, 1)  # one more warm-up step
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    state, metrics = steps_fn(state, batches, 2, args.steps, key, 2)  # the timed steps, in one call as jaxcnn train
    jax.block_until_ready((state, metrics))
    step_s = (time.perf_counter() - start) / args.steps
    return {"compile_s": compile_s, "step_ms": 1e3 * step_s, "images_per_s": batch / step_s}


def model_knobs(args: argparse.Namespace) -> dict[str, Any]:
    return {"dtype": args.dtype} if args.dtype != "float32" else {}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--image", default="32,32,3", help="H,W,C of the synthetic images")
    p.add_argument("--per-device-batch", type=int, default=32, help="weak scaling: the global batch is n × this")
    p.add_argument("--global-batch", type=int, default=None, help="strong scaling: this global batch for every n")
    p.add_argument("--devices", default="1,2,4,8")
    p.add_argument("--strategies", default=",".join(parallel.STRATEGIES))
    p.add_argument("--steps", type=int, default=10, help="timed steps per row (after compilation and one warm-up)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = p.parse_args()
    args.image = tuple(int(v) for v in args.image.split(","))
    counts = [int(v) for v in args.devices.split(",")]
    strategies = args.strategies.split(",")

    platform = jax.devices()[0].platform
    kinds = sorted({d.device_kind for d in jax.devices()})
    print(f"jax {jax.__version__}, {jax.device_count()} {platform} device(s) ({', '.join(kinds)}), "
          f"{jax.process_count()} process(es); model {args.model}, images {args.image}, {args.dtype}")
    if platform == "cpu":
        print("NOTE: these are fake CPU devices sharing the same cores: the rows show each strategy's overhead, "
              "not a speed-up (images/s is expected to stay flat or fall as devices are added).")
    scaling = f"global batch {args.global_batch}" if args.global_batch else f"{args.per_device_batch} images per device"
    print(f"{scaling}; step time is the mean of {args.steps} steps after compilation and one warm-up step\n")

    model = create_model(args.model, num_classes=10, **model_knobs(args))
    variables = jax.device_get(init_variables(model, (1, *args.image), seed=0))

    header = f"{'strategy':<10} {'devices':>7} {'batch':>6} {'compile s':>10} {'step ms':>9} {'images/s':>10} {'per device':>11}"
    print(header)
    print("-" * len(header))
    for name in strategies:
        for n in counts:
            if name == "single" and n != 1:
                continue
            if n > jax.device_count():
                print(f"{name:<10} {n:>7}   skipped: only {jax.device_count()} devices")
                continue
            batch = args.global_batch or args.per_device_batch * n
            row = time_strategy(name, n, batch, args, variables)
            if isinstance(row, str):
                print(f"{name:<10} {n:>7} {batch:>6}   {row}")
                continue
            print(f"{name:<10} {n:>7} {batch:>6} {row['compile_s']:>10.1f} {row['step_ms']:>9.1f} "
                  f"{row['images_per_s']:>10.0f} {row['images_per_s'] / n:>11.0f}", flush=True)


if __name__ == "__main__":
    main()
