"""The training run: config → data → model → compiled steps → loop → checkpoints / metrics → summary.json.

    summary = train(load_experiment("experiments/fashion_mnist_lenet5.py"), workdir="runs/fmnist")

A reader should be able to hold this file in their head: each stage is a call into the module that owns it.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jaxcnn.config import Config, ConfigError, config_to_dict
from jaxcnn.data import DATASET_INFO, ArrayDataset, load_split
from jaxcnn.data.pipeline import DeviceEpochLoader, DeviceEvalSet
from jaxcnn.models import create_model, model_knobs
from jaxcnn.results.progress import Progress
from jaxcnn.results.writers import MetricsWriter, git_commit, write_json
from jaxcnn.train import checkpoint as ckpt_lib
from jaxcnn.train import parallel, transfer
from jaxcnn.train.optim import make_optimizer
from jaxcnn.train.state import TrainState, create_train_state, init_variables, leaf_names, param_count
from jaxcnn.train.step import StepOptions, make_eval_step, make_train_step
from jaxcnn.backends import configure_process as configure_xla_cpu


class NonFiniteError(FloatingPointError):
    """Training produced a non-finite loss or gradient; the message names the step and the quantity."""


@dataclasses.dataclass
class RunData:
    """The run's datasets (uint8 arrays on the host) and what the steps need to know about them."""

    train: ArrayDataset
    evals: dict[str, ArrayDataset]  # 'test' and, with data.val_size, 'val'
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


def load_data(cfg: Config) -> RunData:
    """Loads the train and test splits named in `cfg.data` (and carves the validation split)."""
    d = cfg.data
    train = load_split(d.name, "train", data_dir=d.data_dir, source=d.source, limit=d.train_limit)
    test = load_split(d.name, "test", data_dir=d.data_dir, source=d.source, limit=d.test_limit)
    evals = {"test": test}
    if d.val_size:
        if d.val_size >= len(train.labels):
            raise ValueError(f"data.val_size={d.val_size} leaves no training data ({len(train.labels)} examples)")
        train, evals["val"] = train.split(d.val_size)
    info = DATASET_INFO[d.name]
    return RunData(train, evals, train.num_classes, tuple(info.mean), tuple(info.std))


def build_model(cfg: Config, num_classes: int, extra: dict[str, Any] | None = None) -> Any:
    """Creates the configured model; the strategy's knobs (BatchNorm axis name) and the compute dtype are added."""
    knobs = {k: v for k, v in cfg.model.items() if k != "name"}
    available = model_knobs(cfg.model["name"])
    if cfg.train.compute_dtype != "float32" and "dtype" in available:
        knobs.setdefault("dtype", cfg.train.compute_dtype)
    for k, v in (extra or {}).items():
        if k in available:
            knobs[k] = v
    return create_model(cfg.model["name"], num_classes=num_classes, **knobs)


def total_steps_of(cfg: Config, steps_per_epoch: int) -> int:
    if cfg.train.steps is not None:
        return int(cfg.train.steps)
    return max(1, math.ceil(cfg.train.epochs * steps_per_epoch))


def evaluate(eval_step: Any, state: TrainState, eval_set: DeviceEvalSet) -> dict[str, float]:
    """Loss and accuracy over every example of the split exactly once (padded batches are masked)."""
    sums = [eval_step(state, batch) for batch in eval_set]
    totals = jax.device_get(jax.tree_util.tree_map(lambda *xs: sum(xs), *sums))
    count = float(np.asarray(totals["count"]).sum())
    return {
        "loss": float(np.asarray(totals["loss_sum"]).sum()) / count,
        "accuracy": float(np.asarray(totals["correct"]).sum()) / count,
        "count": int(round(count)),
    }


def _mean_metrics(history: list[tuple[dict[str, Any], int]]) -> dict[str, float]:
    """Per-step means from (metric sums over `count` steps, count) pairs."""
    host = jax.device_get([sums for sums, _ in history])
    steps = sum(count for _, count in history)
    return {k: float(sum(np.asarray(h[k]).mean() for h in host)) / steps for k in host[0]}


def _raise_if_nonfinite(state: TrainState) -> None:
    step, what = (int(v) for v in jax.device_get(state.first_nonfinite).reshape(-1)[:2])
    if step < 0:
        return
    names = leaf_names(jax.device_get(state.params) if jax.process_count() == 1 else state.params)
    quantity = "the loss" if what == 0 else f"the gradient of {names[what - 1]}"
    raise NonFiniteError(
        f"step {step}: {quantity} is not finite (NaN or inf). Training stopped; parameters and checkpoints hold the "
        f"last finite state. Try a lower optim.lr, optim.grad_clip_norm, or train.compute_dtype=float32."
    )


def train(cfg: Config, workdir: str | Path) -> dict[str, Any]:
    """Runs the experiment `cfg` in `workdir` (resuming from its latest good checkpoint) and returns the summary."""
    t_start = time.perf_counter()
    configure_xla_cpu()  # before JAX starts its backend: faster CPU kernels (jaxcnn/train/xla_flags.py)
    parallel.init_distributed(cfg.parallel)
    workdir = Path(workdir)
    main = jax.process_index() == 0
    with ckpt_lib.RunDirectory(workdir, main=main) as rundir:
        return _train_in(cfg, rundir, main, t_start)


def _train_in(cfg: Config, rundir: "ckpt_lib.RunDirectory", main: bool, t_start: float) -> dict[str, Any]:
    workdir = rundir.path
    if cfg.train.steps_per_call < 0:
        raise ConfigError(f"train.steps_per_call={cfg.train.steps_per_call}: use 0 (every step up to the next log, "
                          "checkpoint or evaluation point in one call) or a positive cap")
    data = load_data(cfg)
    strategy = parallel.make_strategy(cfg.parallel, cfg.data.batch_size, accum_steps=cfg.optim.accum_steps)
    model = build_model(cfg, data.num_classes, strategy.model_overrides)
    steps_per_epoch = len(data.train.labels) // cfg.data.batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"data.batch_size={cfg.data.batch_size} is larger than the training set ({len(data.train.labels)} "
            f"examples); lower data.batch_size or raise data.train_limit"
        )
    total_steps = total_steps_of(cfg, steps_per_epoch)

    # Model, optimizer and initial state (from scratch, or from another run's parameters for transfer learning).
    variables = init_variables(model, (1, *data.train.images.shape[1:]), cfg.seed)
    init_report = None
    if cfg.transfer.init_from:
        variables, init_report = transfer.load_pretrained(variables, cfg.transfer.init_from)
    tx, schedule = make_optimizer(cfg.optim, cfg.schedule, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
    tx = transfer.apply_freeze(tx, variables["params"], cfg.transfer, steps_per_epoch)  # no-op without freeze patterns
    state = create_train_state(model, tx, variables, ema=cfg.optim.ema_decay is not None)
    n_params = param_count(state.params)

    # Resume: the latest good checkpoint, its data position, and a check that the config matches.
    checkpointer = ckpt_lib.RunCheckpointer(workdir, cfg, main=main, steps_per_epoch=steps_per_epoch)
    restored = checkpointer.restore(state) if cfg.checkpoint.resume else None
    start_step = 0
    if restored is not None:
        state, start_step = restored
        rundir.say(f"resuming from checkpoint at step {start_step} of {total_steps} in {workdir}")
    elif main:
        write_json(workdir / "config.json", config_to_dict(cfg))
        if init_report is not None:
            rundir.say(init_report.describe())

    # Steps, compiled for the chosen strategy; data resident on the devices.
    opts = StepOptions(
        num_classes=data.num_classes, mean=data.mean, std=data.std, normalize=cfg.data.normalize,
        crop_padding=cfg.data.crop_padding, flip=cfg.data.flip, cutout=cfg.data.cutout, tta=cfg.data.tta,
        label_smoothing=cfg.optim.label_smoothing, accum_steps=cfg.optim.accum_steps,
        ema_decay=cfg.optim.ema_decay, eval_ema=cfg.optim.eval_ema,
        compute_dtype=jnp.dtype(cfg.train.compute_dtype), steps_per_epoch=steps_per_epoch, flip_seed=cfg.seed,
        check_finite=cfg.train.check_finite,
        freeze_stats=transfer.stats_freezer(variables, cfg.transfer, steps_per_epoch),
    )
    train_steps = strategy.compile_train_steps(make_train_step(opts, axis_name=strategy.axis_name))
    eval_step = strategy.compile_eval_step(make_eval_step(opts, axis_name=strategy.axis_name))
    state = strategy.place_state(state)
    loader = DeviceEpochLoader(data.train, cfg.data.batch_size, seed=cfg.seed, sharding=strategy.batch_sharding)
    eval_sets = {
        name: DeviceEvalSet(ds, cfg.data.eval_batch_size, sharding=strategy.batch_sharding)
        for name, ds in data.evals.items()
    }

    writer = MetricsWriter(workdir, enabled=main)
    progress = Progress(total_steps, start_step, cfg.data.batch_size, enabled=main and cfg.train.progress)
    base_key = jax.random.PRNGKey(cfg.seed)
    log_every = max(1, cfg.train.log_every_steps)

    def is_boundary(s: int) -> bool:
        """Whether the loop logs (and may checkpoint / evaluate) after step s."""
        end = s % steps_per_epoch == 0
        return s % log_every == 0 or s >= total_steps or end or checkpointer.save_due(s, end)

    def steps_to_boundary(s: int) -> int:
        """How many steps the next call trains from step s: up to the next boundary, at most steps_per_call."""
        cap = cfg.train.steps_per_call or total_steps
        n = 1
        while n < cap and not is_boundary(s + n):
            n += 1
        return n

    eval_every = cfg.train.eval_every_epochs
    history: list[tuple[dict[str, Any], int]] = []  # (metric sums, steps) per call since the last log
    train_time = 0.0  # seconds spent in training steps after the first (compile) step
    timed_images = 0
    last_eval: dict[str, dict[str, float]] = {}
    step = start_step
    epoch = step // steps_per_epoch
    progress.write(
        f"{cfg.name or cfg.model['name']}: {cfg.model['name']} ({n_params:,} params) on {cfg.data.name} "
        f"({len(data.train.labels):,} train images), {total_steps} steps of {cfg.data.batch_size}, "
        f"{strategy.num_devices} device(s) [{jax.devices()[0].platform}], strategy {strategy.name}"
    )

    try:
        t_interval = time.perf_counter()
        steps_in_interval = 0
        while step < total_steps:
            epoch = step // steps_per_epoch
            offset = step - epoch * steps_per_epoch
            batches = loader.epoch_arrays(epoch, start_step=offset)  # the epoch's remaining batches, on the devices
            first = 0
            while offset + first < steps_per_epoch and step < total_steps:
                # The first call trains one step (it includes compilation: kept out of images/s), later ones every
                # step up to the next log / checkpoint / evaluation point, in one compiled call.
                count = 1 if step == start_step else steps_to_boundary(step)
                state, sums = train_steps(state, batches, first, count, base_key, step)
                history.append((sums, count))
                step += count
                first += count
                steps_in_interval += count
                if step == start_step + 1:  # the first step includes compilation: keep it out of images/s
                    jax.block_until_ready(state.step)
                    t_interval, steps_in_interval = time.perf_counter(), 0
                    progress.reset_clock()
                end_of_epoch = step % steps_per_epoch == 0
                # Also at checkpoint steps (exact every_steps) and right after a SIGTERM/SIGINT (stop after this call).
                if is_boundary(step) or rundir.stop_requested:
                    mean = _mean_metrics(history)
                    history.clear()
                    now = time.perf_counter()
                    train_time += now - t_interval
                    timed_images += steps_in_interval * cfg.data.batch_size
                    if cfg.train.check_finite:
                        _raise_if_nonfinite(state)
                    ips = progress.update(step, epoch, mean)
                    writer.write("train", step, {**mean, "epoch": step / steps_per_epoch,
                                                 "lr": float(schedule(step)), "images_per_s": ips})
                    checkpointer.maybe_save(state, step, epoch_end=end_of_epoch, strategy=strategy)
                    if rundir.stop_requested:
                        checkpointer.save_now(state, step, strategy=strategy)
                        rundir.say(f"stopped at step {step} on {rundir.stop_signal}; checkpoint saved, rerun the same "
                                   f"command to resume")
                        raise SystemExit(128 + rundir.stop_signum)
                    do_eval = end_of_epoch and eval_every and (step // steps_per_epoch) % eval_every == 0
                    if do_eval and step < total_steps:
                        for name, es in eval_sets.items():
                            last_eval[name] = evaluate(eval_step, state, es)
                            writer.write(name, step, last_eval[name])
                        progress.write(_eval_line(step // steps_per_epoch, step, last_eval))
                        checkpointer.record_metric(step, last_eval)
                    progress.reset_clock()
                    t_interval, steps_in_interval = time.perf_counter(), 0
        final = {name: evaluate(eval_step, state, es) for name, es in eval_sets.items()}
        for name, m in final.items():
            writer.write(name, step, m)
        checkpointer.record_metric(step, final)
        checkpointer.save_now(state, step, strategy=strategy)
    finally:
        progress.close()
        writer.close()
        checkpointer.close()

    wall = time.perf_counter() - t_start
    summary = {
        "name": cfg.name,
        "model": cfg.model["name"],
        "dataset": cfg.data.name,
        "test_accuracy": final["test"]["accuracy"],
        "test_loss": final["test"]["loss"],
        "test_count": final["test"]["count"],
        **({"val_accuracy": final["val"]["accuracy"], "val_loss": final["val"]["loss"]} if "val" in final else {}),
        "params": n_params,
        "steps": step,
        "epochs": step / steps_per_epoch,
        "batch_size": cfg.data.batch_size,
        "wall_s": wall,
        "train_s": train_time,
        "train_images_per_s": timed_images / train_time if train_time > 0 else float("nan"),
        "jax_version": jax.__version__,
        "devices": [str(d.device_kind) for d in jax.devices()],
        "device_count": jax.device_count(),
        "process_count": jax.process_count(),
        "strategy": strategy.name,
        "git_commit": git_commit(),
        "resumed_from_step": start_step,
    }
    if main:
        write_json(workdir / "summary.json", summary)
    progress.write(
        f"done: test accuracy {summary['test_accuracy']:.4f}, test loss {summary['test_loss']:.4f} "
        f"on {summary['test_count']:,} images; {wall:.1f} s wall, {summary['train_images_per_s']:,.0f} train images/s "
        f"→ {workdir / 'summary.json'}"
    )
    return summary


def _eval_line(epoch: int, step: int, results: dict[str, dict[str, float]]) -> str:
    parts = [f"{name} acc {m['accuracy']:.4f} loss {m['loss']:.4f}" for name, m in results.items()]
    return f"epoch {epoch} (step {step}): " + ", ".join(parts)
