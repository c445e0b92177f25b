"""Training throughput of one jaxcnn model on the current device: images/s and compile time.

    python benchmarks/train_throughput.py --model resnet20 --batch 128
    python benchmarks/train_throughput.py --model resnet56 --batch 128 --steps 5 --rounds 3
    python benchmarks/train_throughput.py --model resnet50 --batch 64 --image-size 224 --dtype bfloat16   # GPU

It times the training loop `jaxcnn train` runs: `make_train_step(StepOptions(...))` compiled by the 'jit' strategy
of `jaxcnn.train.parallel` as several steps per call (`compile_train_steps`, state donated), SGD with Nesterov momentum and weight decay from
`jaxcnn.train.optim.make_optimizer`, uint8 batches resident on the device and turned into floats inside the
step. Prints the compile time (lowering + XLA compilation of the step), then images/s as the median over
`--rounds` rounds of `--steps` steps each, after `--warmup` untimed steps.

`--model` takes the benchmark names below (they fix the input size and the CIFAR heads) or any registry name
(`python -m jaxcnn models`), which then gets `--image-size` x `--image-size` x 3 inputs.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

if __package__ in (None, ""):  # run as a script: import the sibling modules and this checkout's jaxcnn
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# Benchmark name -> (registry name, model knobs, input [H, W, C]).
BENCH_MODELS: dict[str, tuple[str, dict[str, Any], tuple[int, int, int]]] = {
    "resnet20": ("resnet20", {}, (32, 32, 3)),
    "resnet56": ("resnet56", {}, (32, 32, 3)),
    "lenet5": ("lenet5", {}, (28, 28, 1)),
    "mlp": ("mlp", {}, (28, 28, 1)),
    "vgg11": ("vgg11_bn", {"head": "gap", "head_hidden": (), "dropout": 0.0}, (32, 32, 3)),
    "resnet18": ("resnet18", {"num_classes": 1000}, (224, 224, 3)),  # ImageNet heads, as torchvision's
    "resnet50": ("resnet50", {"num_classes": 1000}, (224, 224, 3)),
}

LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 5e-4


def bench_spec(name: str, image_size: int = 32, num_classes: int = 10) -> tuple[str, dict[str, Any], tuple[int, int, int]]:
    """(registry name, knobs, input [H, W, C]) for a benchmark name or a registry name."""
    if name in BENCH_MODELS:
        registry_name, knobs, shape = BENCH_MODELS[name]
        if registry_name in ("resnet18", "resnet50") and image_size != 32:
            shape = (image_size, image_size, 3)
        return registry_name, {"num_classes": num_classes, **knobs}, shape
    return name, {"num_classes": num_classes}, (image_size, image_size, 3)


@dataclass
class JaxTrainer:
    """jaxcnn's compiled training loop with its state and device-resident stacked batches; `run(n)` trains n steps.

    As in `jaxcnn train`, steps run several per compiled call (`Strategy.compile_train_steps`): run(n) makes
    ceil(n / S) calls over the S stacked batches, each call as many steps as remain in the stack.
    """

    steps_fn: Any
    state: Any
    batches: dict[str, Any]  # stacked [S, B, ...]
    compile_s: float
    params: int
    batch_size: int
    step: int = 0

    def run(self, steps: int) -> None:
        import jax

        key = jax.random.PRNGKey(0)
        stack = next(iter(self.batches.values())).shape[0]
        while steps > 0:
            first = self.step % stack
            count = min(steps, stack - first)
            self.state, sums = self.steps_fn(self.state, self.batches, first, count, key, self.step)
            self.step += count
            steps -= count
        jax.block_until_ready((self.state, sums))


def make_jax_trainer(name: str, batch_size: int, *, dtype: str = "float32", image_size: int = 32, seed: int = 0,
                     num_batches: int | None = None) -> JaxTrainer:
    """Builds model, optimizer, state and the compiled train step exactly as `jaxcnn.train.loop.train` does."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxcnn.config import OptimConfig, ParallelConfig, ScheduleConfig
    from jaxcnn.data.pipeline import put_stacked
    from jaxcnn.models import create_model
    from jaxcnn.train import parallel
    from jaxcnn.train.optim import make_optimizer
    from jaxcnn.train.state import create_train_state, init_variables, param_count
    from jaxcnn.train.step import StepOptions, make_train_step

    registry_name, knobs, (h, w, c) = bench_spec(name, image_size)
    if dtype != "float32":
        knobs["dtype"] = dtype
    model = create_model(registry_name, **knobs)
    strategy = parallel.make_strategy(ParallelConfig(strategy="jit", num_devices=1), batch_size)
    optim = OptimConfig(name="sgd", lr=LR, momentum=MOMENTUM, nesterov=True, weight_decay=WEIGHT_DECAY,
                        weight_decay_mask="all")
    tx, _ = make_optimizer(optim, ScheduleConfig(name="constant"), steps_per_epoch=100, total_steps=10_000)
    state = create_train_state(model, tx, init_variables(model, (1, h, w, c), seed))
    opts = StepOptions(num_classes=knobs["num_classes"], mean=(127.5,) * c, std=(64.0,) * c,
                       compute_dtype=jnp.dtype(dtype), steps_per_epoch=100)
    steps_fn = strategy.compile_train_steps(make_train_step(opts, axis_name=strategy.axis_name))
    state = strategy.place_state(state)
    if num_batches is None:  # as many as fit in about 256 MB of uint8 images (the loop runs over them in one call)
        num_batches = max(4, min(64, (256 << 20) // (batch_size * h * w * c)))
    rng = np.random.default_rng(seed)
    host = {"image": rng.integers(0, 256, (num_batches, batch_size, h, w, c), dtype=np.uint8),
            "label": rng.integers(0, knobs["num_classes"], (num_batches, batch_size), dtype=np.int32)}
    batches = put_stacked(host, strategy.batch_sharding, batch_size)
    jitted = steps_fn.__wrapped__
    key = jax.random.PRNGKey(0)
    t0 = time.perf_counter()
    compiled = jitted.lower(state, batches, 0, 1, key, 0).compile()
    compile_s = time.perf_counter() - t0
    return JaxTrainer(compiled, state, batches, compile_s, param_count(state.params), batch_size)


def machine_line() -> str:
    """jax version, device, CPU count and load average, for the printed figures."""
    import jax

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    device = jax.devices()[0]
    return (f"jax {jax.__version__} on {device.platform} ({device.device_kind}), python {platform.python_version()}, "
            f"{os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


def time_rounds(run: Any, steps: int, rounds: int, batch_size: int) -> list[float]:
    """images/s of each of `rounds` timed calls of run(steps)."""
    rates = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        run(steps)
        rates.append(steps * batch_size / (time.perf_counter() - t0))
    return rates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet20", help=f"one of {', '.join(BENCH_MODELS)} or a registry name")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds; the median is reported")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
    parser.add_argument("--image-size", type=int, default=32, help="input size for registry names / ImageNet nets")
    args = parser.parse_args(argv)

    from jaxcnn.backends import configure_process

    configure_process()  # what `jaxcnn train` does before JAX starts its backend
    trainer = make_jax_trainer(args.model, args.batch, dtype=args.dtype, image_size=args.image_size)
    print(machine_line())
    print(f"{args.model}: {trainer.params:,} parameters, batch {args.batch}, {args.dtype}; "
          f"compile {trainer.compile_s:.1f} s")
    trainer.run(args.warmup)
    rates = time_rounds(trainer.run, args.steps, args.rounds, args.batch)
    print(f"{args.model}: {statistics.median(rates):,.1f} images/s (median of {args.rounds} rounds of {args.steps} "
          f"steps; min {min(rates):,.1f}, max {max(rates):,.1f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
