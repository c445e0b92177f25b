"""The training run: config → data → model → compiled steps → loop → checkpoints / metrics → summary.json.

    summary = train(load_experiment("experiments/fashion_mnist_lenet5.py"), workdir="runs/fmnist")

A reader should be able to hold this file in their head: each stage is a call into the module that owns it, and
`_train_in` is the loop: for each compiled call, train, log, checkpoint, honour a stop signal, evaluate.

**Steps per call.** Each call trains up to the next log step (train.log_every_steps, epoch ends, checkpoint steps,
the last step), capped by train.steps_per_call and by train.max_seconds_per_call at the pace of the last call. The
first call trains one step (it compiles), the second one step (it measures the pace). The count never changes the
result: the calls run one compiled `lax.fori_loop` whose trip count is an argument.

**Stop signals.** After SIGTERM or SIGINT the running call finishes (at most about train.max_seconds_per_call),
its step is logged and saved, and the process exits with 128 + the signal number (143, 130).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jaxcnn.config import Config, config_to_dict, validate_config
from jaxcnn.data import DATASET_INFO, ArrayDataset, load_split
from jaxcnn.data.pipeline import DeviceEpochLoader, DeviceEvalSet
from jaxcnn.models import create_model, model_knobs
from jaxcnn.results.progress import Progress
from jaxcnn.results.writers import MetricsWriter, git_commit, write_json
from jaxcnn.train import checkpoint as ckpt_lib
from jaxcnn.train import parallel, transfer
from jaxcnn.train.optim import lr_at, make_optimizer
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


def step_options(cfg: Config, data: RunData, steps_per_epoch: int, freeze_stats: Any = None) -> StepOptions:
    """The train and eval steps' options, from the config: preprocessing, augmentation, loss, EMA, dtype."""
    d, o = cfg.data, cfg.optim
    return StepOptions(
        num_classes=data.num_classes, mean=data.mean, std=data.std, normalize=d.normalize,
        crop_padding=d.crop_padding, flip=d.flip, cutout=d.cutout, tta=d.tta,
        label_smoothing=o.label_smoothing, accum_steps=o.accum_steps, ema_decay=o.ema_decay, eval_ema=o.eval_ema,
        compute_dtype=jnp.dtype(cfg.train.compute_dtype), steps_per_epoch=steps_per_epoch, flip_seed=cfg.seed,
        check_finite=cfg.train.check_finite, freeze_stats=freeze_stats,
    )


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


def itstime(step: int, every: int | None, total: int | None = None) -> bool:
    """Whether something done every `every` steps (and at the last step, `total`) is due after `step`."""
    return bool((every and step % every == 0) or step == total)


class ThroughputTimer:
    """Times the compiled calls: images/s over the calls since the last `interval_images_per_s()` and over the
    run, the first call (it compiles) left out; and how many steps fit in `max_seconds` at the last call's pace."""

    def __init__(self, batch_size: int, max_seconds: float):
        self.batch_size = batch_size
        self.max_seconds = max_seconds
        self.calls = 0
        self.train_s = 0.0  # seconds in timed calls
        self.images = 0  # images trained in timed calls
        self._interval = [0.0, 0]  # seconds, images since the last interval_images_per_s()
        self._step_s: float | None = None  # seconds per step of the last timed call

    @contextlib.contextmanager
    def call(self, steps: int) -> Iterator[None]:
        """Times one compiled call of `steps` steps (the caller blocks on its result inside the block)."""
        t0 = time.perf_counter()
        yield
        seconds = time.perf_counter() - t0
        self.calls += 1
        if self.calls == 1:
            return
        self._step_s = seconds / steps
        self.train_s += seconds
        self.images += steps * self.batch_size
        self._interval[0] += seconds
        self._interval[1] += steps * self.batch_size

    def max_steps(self) -> int:
        """Steps the next call may train: 1 until a call has been timed (the first compiles, the second measures)."""
        if self._step_s is None:
            return 1
        return max(1, int(self.max_seconds / max(self._step_s, 1e-9)))

    def interval_images_per_s(self) -> float | None:
        """Images/s over the timed calls since the last read (None when none was timed), and starts a new interval."""
        seconds, images = self._interval
        self._interval = [0.0, 0]
        return images / seconds if seconds > 0 else None

    def images_per_s(self) -> float:
        return self.images / self.train_s if self.train_s > 0 else float("nan")


@dataclasses.dataclass
class Counters:
    """Where the loop is: the step reached and the metric sums of the calls since the last log."""

    step: int
    sums: list[tuple[Any, int]] = dataclasses.field(default_factory=list)  # (metric sums over `count` steps, count)

    def add(self, sums: Any, count: int) -> None:
        self.sums.append((sums, count))
        self.step += count

    def take_means(self) -> dict[str, float]:
        """Per-step means of the metrics since the last log (and starts a new log interval)."""
        host = jax.device_get([s for s, _ in self.sums])
        steps = sum(count for _, count in self.sums)
        self.sums = []
        return {k: float(sum(np.asarray(h[k]).mean() for h in host)) / steps for k in host[0]}


@dataclasses.dataclass
class Run:
    """What the loop needs, set up by `set_up_run`: the compiled steps, the data on the devices, the writers."""

    cfg: Config
    rundir: ckpt_lib.RunDirectory
    strategy: Any
    state: TrainState
    start_step: int
    total_steps: int
    steps_per_epoch: int
    n_params: int
    schedule: Any
    train_steps: Any  # (state, batches, first, count, key, step0) -> (state, metric sums)
    eval_step: Any
    loader: DeviceEpochLoader
    eval_sets: dict[str, DeviceEvalSet]
    checkpointer: ckpt_lib.RunCheckpointer
    writer: MetricsWriter
    progress: Progress
    base_key: Any = None  # the key of step t is fold_in(base_key, t)
    _epoch: tuple[int, int, Any] = (-1, 0, None)  # (epoch, first step in the arrays, the epoch's batches)

    def batches_at(self, step: int) -> tuple[Any, int]:
        """(the epoch's stacked batches on the devices, the index of `step`'s batch in them); fetched per epoch."""
        epoch, offset = divmod(step, self.steps_per_epoch)
        if self._epoch[0] != epoch:
            self._epoch = (epoch, offset, self.loader.epoch_arrays(epoch, start_step=offset))
        return self._epoch[2], offset - self._epoch[1]

    def is_log_step(self, step: int) -> bool:
        """Whether the loop logs (and may checkpoint and evaluate) after `step`: every train.log_every_steps, at
        epoch ends, at checkpoint steps and at the last step."""
        epoch_end = step % self.steps_per_epoch == 0
        return (itstime(step, max(1, self.cfg.train.log_every_steps), self.total_steps) or epoch_end
                or self.checkpointer.save_due(step, epoch_end))

    def steps_in_next_call(self, step: int, cap: int) -> int:
        """Steps the next compiled call trains: up to the next log step, at most `cap` and train.steps_per_call."""
        cap = min(cap, self.cfg.train.steps_per_call or cap)
        count = 1
        while count < cap and not self.is_log_step(step + count):
            count += 1
        return count

    def log_train(self, state: TrainState, counters: Counters, timer: ThroughputTimer) -> None:
        if self.cfg.train.check_finite:
            _raise_if_nonfinite(state, self.cfg)
        step, means, ips = counters.step, counters.take_means(), timer.interval_images_per_s()
        self.progress.update(step, step // self.steps_per_epoch, means, ips)
        record = {**means, "epoch": step / self.steps_per_epoch, "lr": lr_at(self.schedule, step)}
        self.writer.write("train", step, record if ips is None else {**record, "images_per_s": ips})

    def evaluate(self, state: TrainState, step: int) -> dict[str, dict[str, float]]:
        results = {name: evaluate(self.eval_step, state, es) for name, es in self.eval_sets.items()}
        for name, m in results.items():
            self.writer.write(name, step, m)
        self.checkpointer.record_metric(step, results)
        return results

    def close(self) -> None:
        self.progress.close()
        self.writer.close()
        self.checkpointer.close()


def _raise_if_nonfinite(state: TrainState, cfg: Config) -> None:
    step, what = (int(v) for v in jax.device_get(state.first_nonfinite).reshape(-1)[:2])
    if step < 0:
        return
    names = leaf_names(jax.device_get(state.params) if jax.process_count() == 1 else state.params)
    quantity = "the loss" if what == 0 else f"the gradient of {names[what - 1]}"
    o = cfg.optim
    hints = [f"a lower optim.lr (it is {o.lr:g})"]
    hints.append("optim.grad_clip_norm=1.0" if o.grad_clip_norm is None else
                 f"a lower optim.grad_clip_norm (it is {o.grad_clip_norm:g})")
    if cfg.train.compute_dtype != "float32":
        hints.append(f"train.compute_dtype=float32 (it is {cfg.train.compute_dtype})")
    raise NonFiniteError(
        f"step {step}: {quantity} is not finite (NaN or inf). Training stopped; parameters and checkpoints hold the "
        f"last finite state. Try {', '.join(hints[:-1])} or {hints[-1]}."
    )


def train(cfg: Config, workdir: str | Path) -> dict[str, Any]:
    """Runs the experiment `cfg` in `workdir` (resuming from its latest good checkpoint) and returns the summary."""
    t_start = time.perf_counter()
    validate_config(cfg)
    configure_xla_cpu()  # before JAX starts its backend: faster CPU kernels
    parallel.init_distributed(cfg.parallel)
    with ckpt_lib.RunDirectory(Path(workdir), main=jax.process_index() == 0) as rundir:
        return _train_in(cfg, rundir, t_start)


def _train_in(cfg: Config, rundir: ckpt_lib.RunDirectory, t_start: float) -> dict[str, Any]:
    run = set_up_run(cfg, rundir)
    state, counters = run.state, Counters(step=run.start_step)
    timer = ThroughputTimer(cfg.data.batch_size, cfg.train.max_seconds_per_call)
    spe = run.steps_per_epoch
    try:
        while counters.step < run.total_steps:
            step0 = counters.step
            count = run.steps_in_next_call(step0, timer.max_steps())
            batches, first = run.batches_at(step0)
            with timer.call(count):
                state, sums = run.train_steps(state, batches, first, count, run.base_key, step0)
                jax.block_until_ready(sums)  # one call in flight: a stop signal waits for this call only
            counters.add(sums, count)
            step = counters.step
            if not (run.is_log_step(step) or rundir.stop_requested):
                continue
            run.log_train(state, counters, timer)
            epoch_end = step % spe == 0
            run.checkpointer.maybe_save(state, step, epoch_end=epoch_end, strategy=run.strategy)
            if rundir.stop_requested:  # also one that arrived while logging
                run.checkpointer.save_now(state, step, strategy=run.strategy)
                rundir.say(f"stopped at step {step} on {rundir.stop_signal}; checkpoint saved, rerun the same command "
                           f"to resume")
                raise SystemExit(128 + rundir.stop_signum)
            if epoch_end and itstime(step // spe, cfg.train.eval_every_epochs) and step < run.total_steps:
                run.progress.write(_eval_line(step // spe, step, run.evaluate(state, step)))
        final = run.evaluate(state, counters.step)
        run.checkpointer.save_now(state, counters.step, strategy=run.strategy)
    finally:
        run.close()
    return write_summary(run, final, counters.step, timer, time.perf_counter() - t_start)


def set_up_run(cfg: Config, rundir: ckpt_lib.RunDirectory) -> Run:
    """Data, model, state (fresh, transferred or restored from the newest good checkpoint), compiled steps, writers."""
    workdir, main = rundir.path, rundir.main
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
    opts = step_options(cfg, data, steps_per_epoch, transfer.stats_freezer(variables, cfg.transfer, steps_per_epoch))
    run = Run(
        cfg=cfg, rundir=rundir, strategy=strategy, state=strategy.place_state(state), start_step=start_step,
        total_steps=total_steps, steps_per_epoch=steps_per_epoch, n_params=param_count(state.params),
        schedule=schedule,
        train_steps=strategy.compile_train_steps(make_train_step(opts, axis_name=strategy.axis_name)),
        eval_step=strategy.compile_eval_step(make_eval_step(opts, axis_name=strategy.axis_name)),
        loader=DeviceEpochLoader(data.train, cfg.data.batch_size, seed=cfg.seed, sharding=strategy.batch_sharding),
        eval_sets={name: DeviceEvalSet(ds, cfg.data.eval_batch_size, sharding=strategy.batch_sharding)
                   for name, ds in data.evals.items()},
        checkpointer=checkpointer,
        writer=MetricsWriter(workdir, enabled=main, resume_step=start_step),  # drops records past start_step
        progress=Progress(total_steps, start_step, enabled=main and cfg.train.progress),
        base_key=jax.random.PRNGKey(cfg.seed),
    )
    run.progress.write(
        f"{cfg.name or cfg.model['name']}: {cfg.model['name']} ({run.n_params:,} params) on {cfg.data.name} "
        f"({len(data.train.labels):,} train images), {total_steps} steps of {cfg.data.batch_size}, "
        f"{strategy.num_devices} device(s) [{jax.devices()[0].platform}], strategy {strategy.name}"
    )
    return run


def write_summary(run: Run, final: dict[str, dict[str, float]], step: int, timer: ThroughputTimer,
                  wall: float) -> dict[str, Any]:
    """summary.json (main process) and the closing line; returns the summary."""
    cfg = run.cfg
    summary = {
        "name": cfg.name,
        "model": cfg.model["name"],
        "dataset": cfg.data.name,
        "test_accuracy": final["test"]["accuracy"],
        "test_loss": final["test"]["loss"],
        "test_count": final["test"]["count"],
        **({"val_accuracy": final["val"]["accuracy"], "val_loss": final["val"]["loss"]} if "val" in final else {}),
        "params": run.n_params,
        "steps": step,
        "epochs": step / run.steps_per_epoch,
        "batch_size": cfg.data.batch_size,
        "wall_s": wall,
        "train_s": timer.train_s,
        "train_images_per_s": timer.images_per_s(),
        "jax_version": jax.__version__,
        "devices": [str(d.device_kind) for d in jax.devices()],
        "device_count": jax.device_count(),
        "process_count": jax.process_count(),
        "strategy": run.strategy.name,
        "git_commit": git_commit(),
        "resumed_from_step": run.start_step,
    }
    if run.rundir.main:
        write_json(run.rundir.path / "summary.json", summary)
    run.progress.write(
        f"done: test accuracy {summary['test_accuracy']:.4f}, test loss {summary['test_loss']:.4f} "
        f"on {summary['test_count']:,} images; {wall:.1f} s wall, {summary['train_images_per_s']:,.0f} train images/s "
        f"→ {run.rundir.path / 'summary.json'}"
    )
    return summary


def _eval_line(epoch: int, step: int, results: dict[str, dict[str, float]]) -> str:
    parts = [f"{name} acc {m['accuracy']:.4f} loss {m['loss']:.4f}" for name, m in results.items()]
    return f"epoch {epoch} (step {step}): " + ", ".join(parts)
