"""Sweeps: run every variant of an experiment over seeds, each in its own workdir, and tabulate the results.

An experiment file may define `sweep()` returning its variants, built from the helpers here:

    def sweep():
        return product(grid({"model.pool": ["max", "avg", "l2"]}), seeds(3))

Each variant is a dict of dotted config keys → values (`model__pool=...` is accepted for `model.pool=...` as a
keyword). The key `seed` is kept apart, so that the report can average over seeds, and the key `_name` gives a
variant a readable name (`named("mlp-matched", {...})`); otherwise the name is `key=value,key=value`. A run
lives in `WORKDIR/<variant>/seed=<k>/` and holds the usual run files (config.json, metrics.jsonl, summary.json,
checkpoints/) plus `variant.json` (what the sweep asked for), `status.json` and, after a failure, `error.txt`.

    python -m jaxcnn sweep experiments/ablate_pooling.py --workdir runs/pooling [--parallel 2] [--set ...]

`--set key=value` applies to every variant. If the sweep itself varies that key, the sweep is narrowed to the
variants whose value equals the override (`--set model.pool=avg` runs only the avg variants, `--set seed=0` only
seed 0) rather than running identical copies. Rerunning a sweep skips runs with a summary.json, resumes an
interrupted run from its checkpoint and retries failed ones; a failed run is recorded and the others go on. A
finished run whose config differs from what the sweep now asks for stops the sweep with the differences listed.
With `--parallel N`, N runs go at once, each in a subprocess pinned to its own devices (CUDA_VISIBLE_DEVICES on
GPUs, one chip each on TPUs, one host-platform device each on CPU); their console output goes to the run's
`log.txt`.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import math
import os
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from jaxcnn.config import (
    RESUME_IGNORED_KEYS,
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    diff_configs,
    load_experiment,
    load_experiment_module,
    with_updates,
)
from jaxcnn.results.writers import write_json

SEED_KEY = "seed"
NAME_KEY = "_name"

Point = dict[str, Any]  # one variant as returned by sweep(): dotted config key → value (plus 'seed', '_name')
TrainFn = Callable[[Config, Path], Mapping[str, Any]]


# ---------------------------------------------------------------------------------------------------------
# Building sweeps
# ---------------------------------------------------------------------------------------------------------


def _axes(mapping: Mapping[str, Sequence[Any]] | None, kwargs: Mapping[str, Sequence[Any]]) -> dict[str, list]:
    axes: dict[str, list] = {}
    for key, values in [*(mapping or {}).items(), *kwargs.items()]:
        key = key.replace("__", ".")
        if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
            raise ConfigError(f"sweep axis {key!r}: expected a list of values, got {values!r}; write [{values!r}]")
        values = list(values)
        if not values:
            raise ConfigError(f"sweep axis {key!r} has no values")
        if key in axes:
            raise ConfigError(f"sweep axis {key!r} is given twice")
        axes[key] = values
    return axes


def grid(mapping: Mapping[str, Sequence[Any]] | None = None, /, **axes: Sequence[Any]) -> list[Point]:
    """Every combination of the axes' values (the first axis varies slowest).

    grid({"model.pool": ["max", "avg"], "optim.lr": [0.1, 0.01]}) → 4 variants; grid(model__pool=[...]) also works.
    """
    ax = _axes(mapping, axes)
    return [dict(zip(ax, combo)) for combo in itertools.product(*ax.values())]


def zip_(mapping: Mapping[str, Sequence[Any]] | None = None, /, **axes: Sequence[Any]) -> list[Point]:
    """The axes' values taken together, position by position (every axis must have the same length).

    zip_({"model.name": ["plain20", "resnet20"], "optim.lr": [0.05, 0.1]}) → 2 variants.
    """
    ax = _axes(mapping, axes)
    lengths = {k: len(v) for k, v in ax.items()}
    if len(set(lengths.values())) > 1:
        raise ConfigError(f"zip_: every axis needs the same number of values, got {lengths}; use grid() for all "
                          f"combinations")
    return [dict(zip(ax, combo)) for combo in zip(*ax.values())]


def seeds(n_or_values: int | Sequence[int]) -> list[Point]:
    """Seeds 0..n-1 (or the given seeds), as a sweep to combine with product()."""
    values = list(range(n_or_values)) if isinstance(n_or_values, int) else list(n_or_values)
    if not values or not all(isinstance(s, int) and not isinstance(s, bool) for s in values):
        raise ConfigError(f"seeds: expected a positive count or a list of ints, got {n_or_values!r}")
    return [{SEED_KEY: s} for s in values]


def named(name: str, updates: Mapping[str, Any] | None = None, /, **kwargs: Any) -> list[Point]:
    """One variant with a readable name instead of key=value,... (e.g. 'mlp-matched')."""
    point = {k.replace("__", "."): v for k, v in [*(updates or {}).items(), *kwargs.items()]}
    return [{NAME_KEY: name, **point}]


def product(*sweeps: Sequence[Point]) -> list[Point]:
    """Every combination of one variant from each sweep, merged (a key may appear in only one of them)."""
    out: list[Point] = [{}]
    for sweep in sweeps:
        merged = []
        for left in out:
            for right in sweep:
                clash = set(left) & set(right)
                if clash:
                    raise ConfigError(f"product: key(s) {sorted(clash)} appear in more than one of the combined "
                                      f"sweeps; each key may be varied by one of them only")
                merged.append({**left, **right})
        out = merged
    return out


def chain(*sweeps: Sequence[Point]) -> list[Point]:
    """The variants of each sweep one after another (e.g. two grids that do not share a structure)."""
    return [dict(p) for sweep in sweeps for p in sweep]


# ---------------------------------------------------------------------------------------------------------
# From points to runs
# ---------------------------------------------------------------------------------------------------------


def format_value(value: Any) -> str:
    """How a value appears in a variant name: 0.1, true, none, avg, 3-5 (for lists)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "-".join(format_value(v) for v in value)
    return str(value)


def variant_name(updates: Mapping[str, Any]) -> str:
    """'model.pool=avg,optim.lr=0.1' (usable as a folder name); 'base' when nothing is changed."""
    if not updates:
        return "base"
    name = ",".join(f"{k}={format_value(v)}" for k, v in updates.items())
    return re.sub(r"[\s/\\]+", "_", name)


@dataclasses.dataclass(frozen=True)
class Run:
    """One run of a sweep: a variant (its name and config updates) at one seed."""

    variant: str
    seed: int
    updates: tuple[tuple[str, Any], ...]  # dotted key → value, without the seed

    @property
    def relpath(self) -> str:
        return f"{self.variant}/seed={self.seed}"


def expand_sweep(points: Sequence[Point], default_seed: int = 0) -> list[Run]:
    """Turns sweep() points into runs; a point without 'seed' uses `default_seed`. Raises on duplicate runs."""
    runs: list[Run] = []
    seen: dict[tuple[str, int], Mapping[str, Any]] = {}
    for point in points:
        if not isinstance(point, Mapping):
            raise ConfigError(f"sweep(): every variant must be a dict of config keys, got {point!r}")
        updates = {k: v for k, v in point.items() if k not in (SEED_KEY, NAME_KEY)}
        seed = point.get(SEED_KEY, default_seed)
        name = point.get(NAME_KEY) or variant_name(updates)
        name = re.sub(r"[\s/\\]+", "_", str(name))
        if (name, seed) in seen:
            if seen[(name, seed)] == updates:
                raise ConfigError(f"sweep(): variant {name!r} with seed {seed} appears twice")
            raise ConfigError(f"sweep(): the name {name!r} is used by two different variants: "
                              f"{dict(seen[(name, seed)])} and {updates}")
        seen[(name, seed)] = updates
        runs.append(Run(name, int(seed), tuple(updates.items())))
    return runs


def sweep_points(module: Any) -> list[Point]:
    """The experiment module's sweep() (a single default point when it has none)."""
    if not hasattr(module, "sweep"):
        return [{}]
    points = module.sweep()
    if not isinstance(points, (list, tuple)) or not points:
        raise ConfigError(f"{module.__name__}.sweep() must return a non-empty list of variants (dicts), got {points!r}")
    return list(points)


def plan_sweep(experiment_path: str | Path, overrides: Sequence[str] = ()) -> list[tuple[Run, Config]]:
    """The runs of an experiment's sweep and their configs: get_config() ← --set overrides ← the variant.

    A variant that changes a key that `overrides` sets is left out (the override narrows the sweep); if that
    leaves nothing, a ConfigError lists the values the sweep has for that key.
    """
    base = load_experiment(experiment_path, overrides)
    runs = expand_sweep(sweep_points(load_experiment_module(experiment_path)), default_seed=base.seed)
    plan, dropped = [], []
    for run in runs:
        cfg = with_updates(base, dict(run.updates))
        cfg = dataclasses.replace(cfg, seed=run.seed)
        if overrides and apply_overrides(cfg, overrides) != cfg:
            dropped.append(run)
            continue
        plan.append((run, cfg))
    if not plan:
        keys = sorted({item.split("=", 1)[0].strip() for item in overrides})
        raise ConfigError(f"--set {' '.join(overrides)} leaves no run of this sweep: the sweep varies "
                          f"{', '.join(keys)} and no variant has that value; its variants are "
                          f"{sorted({r.variant for r in runs})} with seeds {sorted({r.seed for r in runs})}")
    if dropped:
        _say(f"sweep: --set narrows the sweep to {len(plan)} of {len(runs)} runs")
    return plan


# ---------------------------------------------------------------------------------------------------------
# Running one run (in this process or in a pinned subprocess)
# ---------------------------------------------------------------------------------------------------------


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def is_finished(run_dir: Path) -> bool:
    return (run_dir / "summary.json").is_file()


def finished_config_changes(run_dir: Path, cfg: Config) -> dict[str, tuple[Any, Any]]:
    """Keys whose value in a finished run's config.json differs from `cfg` ({key: (then, now)}), leaving out the
    keys that do not change a run's result (`jaxcnn.config.RESUME_IGNORED_KEYS`: the ones a resume may change)."""
    try:
        saved = json.loads((run_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    try:
        return diff_configs(config_from_dict(saved), cfg, ignore=RESUME_IGNORED_KEYS)
    except ConfigError as e:  # e.g. a knob renamed since the run was made
        return {"config": (f"(no longer valid: {e})", "(this sweep's)")}


def check_finished_runs(plan: Sequence[tuple[Run, Config]], workdir: Path) -> None:
    """Raises ConfigError if a finished run in `workdir` was made with another config than the sweep now asks for
    (the experiment file or --set changed): skipping it would report stale results under the new settings."""
    stale = []
    for run, cfg in plan:
        if is_finished(workdir / run.relpath):
            changes = finished_config_changes(workdir / run.relpath, cfg)
            if changes:
                what = ", ".join(f"{k} {a!r} then, {b!r} now" for k, (a, b) in changes.items())
                stale.append(f"  {run.relpath}: {what}")
    if stale:
        raise ConfigError(
            f"{len(stale)} finished run(s) in {workdir} were made with another config than this sweep's:\n"
            + "\n".join(stale[:10]) + ("\n  ..." if len(stale) > 10 else "")
            + f"\nUse a new --workdir, or delete those run folders to run them again with the new config."
        )


def prepare_run_dir(run: Run, cfg: Config, run_dir: Path, experiment: str) -> None:
    """Writes variant.json: what the sweep asked for, with the whole config (a subprocess trains from it)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "variant.json", {
        "experiment": experiment, "variant": run.variant, "seed": run.seed,
        "updates": dict(run.updates), "config": config_to_dict(cfg),
    })


def _read_status(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((run_dir / "status.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _write_status(run_dir: Path, status: str, **extra: Any) -> None:
    previous = _read_status(run_dir)
    record = {"status": status, "attempt": previous.get("attempt", 0) + (status == "running"),
              "started": previous.get("started"), "pid": previous.get("pid"), **extra}
    if status == "running":
        record["started"] = _now()
    else:
        record["finished"] = _now()
    write_json(run_dir / "status.json", record)


def record_failure(run_dir: Path, error: str, details: str) -> None:
    """status.json says 'failed' with the one-line error; error.txt holds the details (traceback or log tail)."""
    (run_dir / "error.txt").write_text(details if details.endswith("\n") else details + "\n")
    _write_status(run_dir, "failed", error=error)


def run_one(cfg: Config, run_dir: str | Path, train_fn: TrainFn) -> bool:
    """Trains `cfg` in `run_dir` (resuming from its checkpoint), recording the outcome; True if it finished.

    An exception is recorded (status.json + error.txt) and not raised, so the sweep goes on; an interruption
    (Ctrl-C, SIGTERM) is recorded as 'interrupted' and raised, so the sweep stops and can be rerun.
    `train_fn(cfg, run_dir) -> summary` trains (the CLI passes `jaxcnn.train.loop.train`).
    """
    run_dir = Path(run_dir)
    (run_dir / "error.txt").unlink(missing_ok=True)
    _write_status(run_dir, "running", pid=os.getpid())
    try:
        summary = train_fn(cfg, run_dir)
    except Exception as e:  # noqa: BLE001 - any failure of one run is recorded, the sweep goes on
        record_failure(run_dir, f"{type(e).__name__}: {e}".splitlines()[0], traceback.format_exc())
        return False
    except BaseException as e:  # KeyboardInterrupt, SystemExit from a stop signal: the sweep stops here
        _write_status(run_dir, "interrupted", error=f"{type(e).__name__}: {e}")
        raise
    _write_status(run_dir, "done", test_accuracy=summary.get("test_accuracy"))
    return True


def run_prepared(run_dir: str | Path, train_fn: TrainFn) -> int:
    """Trains the run described by RUN_DIR/variant.json (what a parallel sweep's child process does, through
    `python -m jaxcnn sweep-run RUN_DIR`); 0 if it finished, 1 if it failed (recorded in the run folder)."""
    run_dir = Path(run_dir)
    spec = json.loads((run_dir / "variant.json").read_text())
    try:
        cfg = config_from_dict(spec["config"])
    except ConfigError as e:
        record_failure(run_dir, f"ConfigError: {e}", traceback.format_exc())
        return 1
    return 0 if run_one(cfg, run_dir, train_fn) else 1


# ---------------------------------------------------------------------------------------------------------
# Devices for parallel runs
# ---------------------------------------------------------------------------------------------------------


def probe_devices(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The local accelerator as a fresh process sees it: {'platform', 'count', 'kind'} (this process keeps jax off
    the accelerator, so it does not hold device memory the runs need)."""
    code = ("import json, jax; d = jax.local_devices(); "
            "print(json.dumps({'platform': d[0].platform, 'count': len(d), 'kind': d[0].device_kind}))")
    env = dict(os.environ if env is None else env)
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"could not list the devices (python -c 'import jax; jax.local_devices()'):\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _with_cpu_device_count(xla_flags: str, count: int) -> str:
    flags = [f for f in xla_flags.split() if not f.startswith("--xla_force_host_platform_device_count")]
    return " ".join([*flags, f"--xla_force_host_platform_device_count={count}"])


def device_envs(parallel_runs: int, platform: str, device_count: int,
                base_env: Mapping[str, str] | None = None) -> list[dict[str, str]]:
    """One environment per concurrent run, each pinned to its own devices.

    gpu: CUDA_VISIBLE_DEVICES (ROCm: HIP_VISIBLE_DEVICES) gets an equal share of the visible GPUs (an existing
    CUDA_VISIBLE_DEVICES list is split, not the physical ids); tpu: one chip per run through libtpu's
    TPU_VISIBLE_CHIPS / TPU_CHIPS_PER_PROCESS_BOUNDS with a port each; cpu: JAX_PLATFORMS=cpu and one
    host-platform device per run.
    """
    base = dict(os.environ if base_env is None else base_env)
    if parallel_runs < 1:
        raise ValueError(f"--parallel {parallel_runs}: expected at least 1")
    if platform == "cpu":
        env = {**base, "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": _with_cpu_device_count(base.get("XLA_FLAGS", ""), 1)}
        return [dict(env) for _ in range(parallel_runs)]
    if parallel_runs > device_count:
        raise ValueError(f"--parallel {parallel_runs} needs at least {parallel_runs} {platform} devices, but only "
                         f"{device_count} are visible; lower --parallel")
    if platform in ("gpu", "cuda", "rocm"):
        var = "HIP_VISIBLE_DEVICES" if platform == "rocm" else "CUDA_VISIBLE_DEVICES"
        visible = [v for v in base.get(var, "").split(",") if v.strip()] or [str(i) for i in range(device_count)]
        per_run = len(visible) // parallel_runs
        return [{**base, var: ",".join(visible[k * per_run:(k + 1) * per_run]),
                 "XLA_PYTHON_CLIENT_PREALLOCATE": base.get("XLA_PYTHON_CLIENT_PREALLOCATE", "true")}
                for k in range(parallel_runs)]
    if platform == "tpu":
        envs = []
        for k in range(parallel_runs):
            port = str(8476 + k)
            envs.append({**base, "TPU_CHIPS_PER_PROCESS_BOUNDS": "1,1,1", "TPU_PROCESS_BOUNDS": "1,1,1",
                         "TPU_VISIBLE_CHIPS": str(k), "TPU_VISIBLE_DEVICES": str(k), "TPU_PROCESS_PORT": port,
                         "TPU_PROCESS_ADDRESSES": f"localhost:{port}",
                         "TPU_MESH_CONTROLLER_ADDRESS": f"localhost:{port}", "TPU_MESH_CONTROLLER_PORT": port})
        return envs
    raise ValueError(f"--parallel: do not know how to pin runs to {platform!r} devices; use --parallel 1")


# ---------------------------------------------------------------------------------------------------------
# Sweep progress
# ---------------------------------------------------------------------------------------------------------


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class SweepProgress:
    """Counts runs done / failed / skipped and estimates the time left from the runs finished in this session."""

    def __init__(self, name: str, total: int, parallel_runs: int = 1):
        self.name, self.total, self.parallel_runs = name, total, parallel_runs
        self.done = self.failed = self.skipped = 0
        self.durations: list[float] = []
        self.t0 = time.perf_counter()

    def finished(self, ok: bool, seconds: float | None = None) -> None:
        self.done += ok
        self.failed += not ok
        if seconds is not None:
            self.durations.append(seconds)

    def eta(self, running_elapsed: Sequence[float] = ()) -> float:
        """Seconds left: mean run time × runs left (the running ones counted by what they still need) / parallel."""
        if not self.durations:
            return float("nan")
        mean = sum(self.durations) / len(self.durations)
        waiting = self.total - self.done - self.failed - self.skipped - len(running_elapsed)
        work = waiting * mean + sum(max(mean - e, 0.0) for e in running_elapsed)
        return work / self.parallel_runs

    def line(self, running_elapsed: Sequence[float] = ()) -> str:
        finished = self.done + self.failed + self.skipped
        parts = [f"{finished}/{self.total} runs finished"]
        extra = [f"{n} {what}" for n, what in ((self.skipped, "already done"), (self.failed, "failed")) if n]
        if extra:
            parts[0] += f" ({', '.join(extra)})"
        parts.append(f"elapsed {format_duration(time.perf_counter() - self.t0)}")
        parts.append(f"ETA {format_duration(self.eta(running_elapsed))}")
        return f"sweep {self.name}: " + ", ".join(parts)


def run_progress(run_dir: Path, cfg: Config) -> str:
    """'epoch 1.50/3' (or 'step 120/400') from the run's latest logged train record."""
    path = run_dir / "metrics.jsonl"
    last = None
    if path.is_file():
        with open(path, "rb") as f:  # only the tail: metrics.jsonl grows with the run
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            for line in f.read().decode(errors="ignore").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if rec.get("kind") == "train":
                    last = rec
    if cfg.train.steps is not None:
        return f"step {last['step'] if last else 0}/{cfg.train.steps}"
    return f"epoch {float(last.get('epoch', 0.0)) if last else 0.0:.2f}/{cfg.train.epochs:g}"


# ---------------------------------------------------------------------------------------------------------
# The sweep
# ---------------------------------------------------------------------------------------------------------


def run_sweep(experiment_path: str | Path, overrides: Sequence[str] = (), workdir: str | Path = "runs/sweep",
              parallel_runs: int = 1, report: bool = True, *, train_fn: TrainFn) -> list[str]:
    """Runs every run of the experiment's sweep under `workdir`; returns the failed ones ('<variant>/seed=<k>').

    Finished runs (summary.json present) are skipped, interrupted ones resume from their checkpoints, failed
    ones are retried. With parallel_runs > 1, that many runs go at once in subprocesses pinned to separate
    devices. At the end (also after an interruption) results.csv, results.md and the plots are rebuilt.
    `train_fn(cfg, run_dir) -> summary` trains the runs in this process (the CLI passes `jaxcnn.train.loop.train`);
    parallel runs train in child processes, `python -m jaxcnn sweep-run RUN_DIR`, which use
    `jaxcnn.train.loop.train`.
    """
    workdir = Path(workdir)
    overrides = list(overrides)
    plan = plan_sweep(experiment_path, overrides)
    check_finished_runs(plan, workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    write_json(workdir / "sweep.json", {
        "experiment": str(experiment_path), "overrides": overrides, "created": _now(),
        "runs": [{"variant": r.variant, "seed": r.seed, "updates": dict(r.updates), "dir": r.relpath}
                 for r, _ in plan],
    })
    for run, cfg in plan:
        prepare_run_dir(run, cfg, workdir / run.relpath, str(experiment_path))
    progress = SweepProgress(Path(experiment_path).stem, len(plan), parallel_runs)
    todo = []
    for run, cfg in plan:
        if is_finished(workdir / run.relpath):
            progress.skipped += 1
        else:
            todo.append((run, cfg))
    if progress.skipped:
        _say(f"sweep: {progress.skipped} of {len(plan)} runs already finished in {workdir}; skipping them")
    failed: list[str] = []
    try:
        if parallel_runs <= 1:
            _run_sequential(todo, workdir, progress, failed, train_fn)
        else:
            _run_parallel(todo, workdir, progress, failed, parallel_runs)
    finally:
        if report:
            try:
                from jaxcnn.results.report import build_report

                paths = build_report(workdir)
                _say(f"sweep: report in {paths['markdown']}")
            except Exception as e:  # noqa: BLE001 - a report problem must not hide the sweep's own outcome
                _say(f"sweep: could not build the report ({type(e).__name__}: {e}); "
                     f"rerun `python -m jaxcnn report {workdir}`")
    _say(progress.line() + (f"; failed: {', '.join(failed)} (see error.txt in each)" if failed else ""))
    return failed


def _run_sequential(todo: list[tuple[Run, Config]], workdir: Path, progress: SweepProgress,
                    failed: list[str], train_fn: TrainFn) -> None:
    for run, cfg in todo:
        run_dir = workdir / run.relpath
        _say(f"{progress.line()} — starting {run.relpath}")
        t0 = time.perf_counter()
        ok = run_one(cfg, run_dir, train_fn)
        progress.finished(ok, time.perf_counter() - t0)
        if not ok:
            failed.append(run.relpath)
            error = _read_status(run_dir).get("error")
            _say(f"sweep: {run.relpath} FAILED: {error} (details: {run_dir / 'error.txt'})")


def _log_tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def _run_parallel(todo: list[tuple[Run, Config]], workdir: Path, progress: SweepProgress, failed: list[str],
                  parallel_runs: int, status_every_s: float = 30.0) -> None:
    if not todo:
        return
    info = probe_devices()
    envs = device_envs(parallel_runs, info["platform"], info["count"])
    _say(f"sweep: {parallel_runs} runs at once, each pinned to its own {info['platform']} device(s) "
         f"({info['count']} x {info['kind']} visible); per-run output in <run>/log.txt")
    pending = collections.deque(todo)
    active: dict[int, tuple[subprocess.Popen, Run, Config, float, Any]] = {}
    last_status = time.perf_counter()
    try:
        while pending or active:
            for slot in range(parallel_runs):
                if slot in active or not pending:
                    continue
                run, cfg = pending.popleft()
                run_dir = workdir / run.relpath
                log = open(run_dir / "log.txt", "a")
                log.write(f"==== {_now()} {run.relpath} on slot {slot}\n")
                log.flush()
                proc = subprocess.Popen([sys.executable, "-m", "jaxcnn", "sweep-run", str(run_dir)],
                                        env=envs[slot], stdout=log, stderr=subprocess.STDOUT)
                active[slot] = (proc, run, cfg, time.perf_counter(), log)
                _say(f"{progress.line(_elapsed(active))} — started {run.relpath} (slot {slot})")
            time.sleep(0.5)
            for slot, (proc, run, cfg, t0, log) in list(active.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                log.close()
                del active[slot]
                run_dir = workdir / run.relpath
                ok = rc == 0 and is_finished(run_dir)
                if not ok and _read_status(run_dir).get("status") != "failed":
                    # The child died without recording why (killed, out of memory): record it from its log.
                    record_failure(run_dir, f"the run's process exited with code {rc}", _log_tail(run_dir / "log.txt"))
                progress.finished(ok, time.perf_counter() - t0)
                if ok:
                    _say(f"{progress.line(_elapsed(active))} — finished {run.relpath}")
                else:
                    failed.append(run.relpath)
                    _say(f"{progress.line(_elapsed(active))} — {run.relpath} FAILED: "
                         f"{_read_status(run_dir).get('error')} (details: {run_dir / 'error.txt'})")
            if active and time.perf_counter() - last_status > status_every_s:
                last_status = time.perf_counter()
                running = ", ".join(f"{r.relpath} {run_progress(workdir / r.relpath, c)}"
                                    for _, r, c, _, _ in active.values())
                _say(f"{progress.line(_elapsed(active))}; running: {running}")
    except BaseException as e:
        # Ctrl-C reaches the children too (same process group); otherwise ask them to stop (SIGTERM: the train loop
        # saves a checkpoint and exits). Either way give them time to save, then make sure they are gone.
        for proc, run, _, _, log in active.values():
            if not isinstance(e, KeyboardInterrupt):
                proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
        raise


def _elapsed(active: Mapping[int, tuple]) -> list[float]:
    now = time.perf_counter()
    return [now - entry[3] for entry in active.values()]
