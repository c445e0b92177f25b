"""Checkpoints and the run directory: save, keep, and restore the newest good step; lock, probe and signals.

    with RunDirectory(workdir, main=True) as rundir:          # probe, lock, SIGTERM/SIGINT → rundir.stop_requested
        ckpt = RunCheckpointer(workdir, cfg, main=True, steps_per_epoch=spe)
        restored = ckpt.restore(fresh_state)                  # (state, step) of the newest good step, or None
        ...
        ckpt.maybe_save(state, step, epoch_end=..., strategy=strategy)
        ckpt.record_metric(step, {"test": {"accuracy": 0.91, "loss": 0.3}})
        ckpt.close()

A workdir holds:

    .lock                              the pid of the run that holds it (fcntl.flock, released on exit)
    checkpoints/<step>/state/          the TrainState's array leaves (Orbax StandardSave, OCDBT): params,
                                       batch_stats, opt_state, ema_params, step, first_nonfinite
    checkpoints/<step>/meta/metadata   JSON: step, data position, RNG, config, the checksum of every array (JsonSave)
    checkpoints/metrics.json           {step: value of checkpoint.keep_best_metric}
    checkpoints_damaged/<step>/        steps found damaged at restore, moved out of Orbax's sight
    checkpoints_replaced_<time>/       old checkpoints moved away by a run with checkpoint.resume=false

**What makes a resume exact.** The state pytree holds every array a step reads; the rest is a function of
the step: the step's random key is `fold_in(PRNGKey(seed), step)` and the order of an epoch is a pure function
of (seed, epoch), so the data position is epoch = step // steps_per_epoch, offset = step % steps_per_epoch.
The metadata records these (and the config) so a person can read them; restoring needs only the step.

**Checksums.** Each save records the CRC-32 of every array's bytes (C order), by leaf path
('opt_state/1/0/trace/head/fc1/kernel'), in the step's meta/metadata (format 2). They are computed from the very
host arrays handed to Orbax, and they sit in the same step folder, which Orbax gives its final name only once every
item is written: a finished step always has them, and an unfinished one is never read. Every restore recomputes
them over the restored arrays; a mismatch is damage like any other. Steps written without checksums (format 1)
restore with one warning that they cannot be verified. Cost, measured 2026-12-06 on the 2-core Xeon (loaded by
other jobs; Python 3.11, zlib.crc32): ResNet-50's train state (25.6M parameters + BatchNorm statistics + SGD
momentum: 430 arrays, 205 MB) takes 0.86 s (0.24 GB/s; best of 5, with a load average of 11 on the
2 cores: an upper figure) to hash, once per save and once per restore.

**Damage.** Orbax's manager neither skips a damaged step (`latest_step()` still names it, `restore` raises or,
for a missing `_METADATA`, silently succeeds) nor protects the good one from retention (its policies count the
damaged step as one of the newest). So `restore` checks each step, newest first: the files every finished step
has, a full restore of its arrays onto the template's shapes, the checksums, finite values, and the recorded step.
A damaged step gets one warning naming it (and the leaf, for a checksum) and is moved to `checkpoints_damaged/`,
so later saves and retention only ever see good steps. Orbax's own log lines about it are silenced. A
half-written `<step>.orbax-checkpoint-tmp*` folder (a save that never finished) is named in a warning and deleted
by Orbax (`cleanup_tmp_directories`).

**Retention** is Orbax's: `AnyPreservationPolicy` of `LatestN(checkpoint.keep)` and, with
checkpoint.keep_best_metric, `BestN(n=1)` over the metrics recorded by `record_metric` (the loop evaluates a step
after saving it, so the policy reads the values recorded by then rather than those passed to `save`). Orbax
applies it at each save.

**Saves** write host (numpy) copies of the state, so the result does not depend on the device count or on
buffers donated by the next step; the write itself is asynchronous with `checkpoint.async_save`.
`checkpoint.every_steps` is exact: the loop asks `save_due(step, epoch_end)` after every step.

**Multi-process runs** (within reason): every process calls every method (Orbax coordinates the writes); only
the main process prints, writes `metrics.json`, takes the lock and moves damaged steps. The saved state is
replicated, so every process restores the whole of it onto the host and verifies the checksums of everything it
restored (every leaf). A preemption signal must reach every process (as schedulers send it) for them to stop at
the same step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import sys
import threading
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Self

import flax.serialization
import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import (
    AnyPreservationPolicy,
    BestN,
    LatestN,
    PolicyCheckpointInfo,
)

from jaxcnn.config import (
    RESUME_IGNORED_KEYS,
    Config,
    ConfigError,
    config_from_dict,
    config_to_dict,
    diff_configs,
)
from jaxcnn.train.state import TrainState, leaf_names

STATE_ITEM = "state"
META_ITEM = "meta"
# 1: no checksums; 2: meta/metadata holds a checksum of every array (CHECKSUM_ALGORITHM of its bytes, by leaf path).
FORMAT_VERSION = 2
CHECKSUM_ALGORITHM = "crc32"
_TMP_SUFFIX = ".orbax-checkpoint-tmp"  # Orbax's name for a step folder whose save has not finished


class WorkdirError(RuntimeError):
    """The workdir cannot hold a run: unwritable, (nearly) full, or in use by another run."""

    jaxcnn_user_error = True  # the CLI prints the message alone (jaxcnn.errors)


class ConfigMismatchError(ConfigError):
    """A resume whose config differs from the checkpoint's in keys that change the result."""


class CheckpointDamagedError(RuntimeError):
    """A checkpoint step failed its checks (used inside restore; damaged steps are moved aside, not raised)."""


def _print(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------
# The run directory: probe, lock, signals
# ---------------------------------------------------------------------------------------------------------


class RunDirectory:
    """The workdir of one run, held for its duration (a context manager).

    On enter: creates `path`, checks that it is writable (writes and fsyncs a probe file) and has at least
    `min_free_bytes` free, takes an exclusive non-blocking `fcntl.flock` on `path/.lock` (main process only; the
    pid is written into it) and installs SIGTERM/SIGINT handlers that only set `stop_requested`, `stop_signal`
    ('SIGTERM') and `stop_signum`. A second signal of the same kind stops at once (KeyboardInterrupt for SIGINT,
    SystemExit(128 + signum) for SIGTERM), without a checkpoint. On exit the handlers are restored and the lock
    released. Handlers are installed only from the main thread (Python allows no other).

    Errors (WorkdirError) say what is wrong and how to fix it, before any training starts. flock works between
    processes on one machine (and on most network filesystems with lock support); it does not see a run on
    another machine over NFS without lockd.
    """

    def __init__(self, workdir: str | Path, main: bool = True, *, min_free_bytes: int = 256 * 2**20):
        self.path = Path(workdir)
        self.main = main
        self.min_free_bytes = int(min_free_bytes)
        self.stop_requested = False
        self.stop_signal: str | None = None
        self.stop_signum: int | None = None
        self._lock_fd: int | None = None
        self._old_handlers: dict[int, Any] = {}

    # -- context manager ------------------------------------------------------------------------------------

    def __enter__(self) -> Self:
        self._create_and_probe()
        if self.main:
            self._lock()
        try:
            self._install_handlers()
        except BaseException:
            self._unlock()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore_handlers()
        self._unlock()

    def say(self, text: str) -> None:
        """Prints a line to stderr (main process only)."""
        if self.main:
            _print(text)

    # -- checks -----------------------------------------------------------------------------------------------

    def _create_and_probe(self) -> None:
        p = self.path
        if p.exists() and not p.is_dir():
            raise WorkdirError(f"workdir {str(p)!r} exists and is not a directory; choose another --workdir")
        try:
            p.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise WorkdirError(
                f"cannot create workdir {str(p)!r}: {e.strerror or e} ({type(e).__name__}); choose a --workdir in a "
                f"writable place"
            ) from e
        probe = p / f".write_probe.{socket.gethostname()}.{os.getpid()}"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, b"\0" * 4096)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.remove(probe)
        except OSError as e:
            try:
                probe.unlink(missing_ok=True)
            except OSError:
                pass
            hint = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "it is not writable"
            raise WorkdirError(
                f"workdir {str(p)!r} cannot hold a run: writing a probe file failed ({e.strerror or e}), so {hint}; "
                f"free space there or choose another --workdir"
            ) from e
        free = shutil.disk_usage(p).free
        if free < self.min_free_bytes:
            raise WorkdirError(
                f"workdir {str(p)!r} has only {free / 2**20:.1f} MiB free (a run needs at least "
                f"{self.min_free_bytes / 2**20:.0f} MiB for checkpoints and logs); free space or choose another "
                f"--workdir"
            )

    def _lock(self) -> None:
        lock_path = self.path / ".lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            try:
                holder = os.pread(fd, 256, 0).decode(errors="replace").strip()
            finally:
                os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise WorkdirError(f"cannot lock {str(lock_path)!r}: {e.strerror or e}") from e
            who = f"process {holder}" if holder else "another process (pid not yet written)"
            raise WorkdirError(
                f"workdir {str(self.path)!r} is in use by another run ({who} holds {lock_path.name}); wait for it to "
                f"finish, stop it, or choose another --workdir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        os.fsync(fd)
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            try:
                os.ftruncate(self._lock_fd, 0)
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            finally:
                os.close(self._lock_fd)
                self._lock_fd = None

    # -- signals ----------------------------------------------------------------------------------------------

    def _handle(self, signum: int, frame: Any) -> None:
        if self.stop_requested and signum == self.stop_signum:
            # A second signal of the same kind: the user insists; stop now, without a checkpoint.
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        self.stop_requested = True
        self.stop_signum = signum
        self.stop_signal = signal.Signals(signum).name
        if self.main:  # os.write: print() may be mid-write to stderr (the progress bar) when a signal arrives
            os.write(2, f"\n{self.stop_signal} received: finishing the running compiled call (at most about "
                        f"train.max_seconds_per_call), then saving a checkpoint and stopping (send it again to stop at "
                        f"once, without saving)\n".encode())

    def _install_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old_handlers[sig] = signal.signal(sig, self._handle)

    def _restore_handlers(self) -> None:
        for sig, old in self._old_handlers.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
        self._old_handlers.clear()


# ---------------------------------------------------------------------------------------------------------
# State ↔ host tree
# ---------------------------------------------------------------------------------------------------------


def _host_array(x: Any) -> Any:
    if isinstance(x, jax.Array):
        if not x.is_fully_addressable:
            if not x.is_fully_replicated:
                raise ValueError(
                    f"cannot checkpoint an array of shape {x.shape} sharded across processes; strategy.unreplicate "
                    f"should return a replicated host view"
                )
            x = x.addressable_data(0)
        return np.asarray(jax.device_get(x))
    if isinstance(x, (np.ndarray, np.generic, int, float, bool)):
        return np.asarray(x)
    return x


def state_to_tree(state: TrainState) -> dict[str, Any]:
    """The TrainState's pytree fields as nested dicts of numpy arrays (static apply_fn/tx left out).

    Keys: step, params, batch_stats, opt_state, ema_params, first_nonfinite. Optax states (namedtuples, tuples)
    become dicts, as `flax.serialization.to_state_dict` writes them.
    """
    tree = flax.serialization.to_state_dict(state)
    return jax.tree_util.tree_map(_host_array, tree)


def tree_to_state(template: TrainState, tree: Mapping[str, Any]) -> TrainState:
    """Inverse of `state_to_tree`: the template's structure and static fields, the tree's values (as jax arrays)."""
    state = flax.serialization.from_state_dict(template, dict(tree))
    return jax.tree_util.tree_map(jax.numpy.asarray, state)


def _restore_template(template: TrainState) -> dict[str, Any]:
    """numpy placeholders of the template's shapes and dtypes: Orbax restores into host numpy arrays, so a
    checkpoint saved on any number of devices restores onto any other (the loop then places the state)."""
    shapes = jax.eval_shape(lambda s: s, flax.serialization.to_state_dict(template))
    return jax.tree_util.tree_map(lambda s: np.empty(s.shape, s.dtype), shapes)


# The parts of a state checked for NaN/inf (optimizer states may legitimately hold inf, e.g. a best-so-far value).
_FINITE_PARTS = ("params", "batch_stats", "ema_params")


def _nonfinite_leaf(tree: Mapping[str, Any]) -> str | None:
    """The name ('params/Conv_0/kernel') of the first floating leaf of params / batch_stats / ema_params holding
    NaN or inf, or None."""
    parts = {k: tree[k] for k in _FINITE_PARTS if k in tree}
    for name, x in zip(leaf_names(parts), jax.tree_util.tree_leaves(parts)):
        a = np.asarray(x)
        if (a.dtype.kind == "f" or a.dtype.name == "bfloat16") and not np.all(np.isfinite(a.astype(np.float32))):
            return name
    return None


def leaf_checksums(tree: Any) -> dict[str, str]:
    """{'params/Conv_0/kernel': hex digest, ...}: CHECKSUM_ALGORITHM of each leaf's bytes (C order), by leaf path."""
    return {name: _digest(x) for name, x in zip(leaf_names(tree), jax.tree_util.tree_leaves(tree))}


def _digest(x: Any) -> str:
    data = np.ascontiguousarray(np.asarray(x)).reshape(-1).view(np.uint8)  # any dtype (bfloat16 too) as raw bytes
    return f"{zlib.crc32(data):08x}"


def _mismatched_leaf(tree: Any, recorded: Mapping[str, str]) -> str | None:
    """The path of the first leaf of `tree` whose bytes do not hash to its recorded checksum (or that has none)."""
    for name, x in zip(leaf_names(tree), jax.tree_util.tree_leaves(tree)):
        if recorded.get(name) != _digest(x):
            return name
    return None


@contextlib.contextmanager
def _orbax_quiet() -> Any:
    """Silences Orbax's own log lines (absl, e.g. 'Metadata file does not exist') while damaged steps are probed:
    each damage gets one jaxcnn warning instead."""
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        absl_logger.setLevel(level)


# ---------------------------------------------------------------------------------------------------------
# Reading one step (shared with transfer learning)
# ---------------------------------------------------------------------------------------------------------


def list_steps(directory: str | Path) -> list[int]:
    """Steps with a finished folder `<step>/` under a checkpoints directory, ascending."""
    d = Path(directory)
    if not d.is_dir():
        return []
    return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit())


def _missing_files(step_dir: Path) -> list[str]:
    """Files every finished step written by `RunCheckpointer` has; the names of those missing."""
    need = [
        "_CHECKPOINT_METADATA",
        f"{STATE_ITEM}/_METADATA",
        f"{STATE_ITEM}/manifest.ocdbt",
        f"{META_ITEM}/metadata",
    ]
    missing = [n for n in need if not (step_dir / n).is_file()]
    if not missing and not any((step_dir / STATE_ITEM).glob("ocdbt.process_*")):
        missing.append(f"{STATE_ITEM}/ocdbt.process_*")
    return missing


def read_step(step_dir: str | Path, template_tree: Any | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state tree, metadata) of one checkpoint step folder, checked; raises CheckpointDamagedError.

    template_tree: numpy placeholders (shapes/dtypes) to restore into, or None to restore the tree as saved.
    Checks: the files of a finished step are there, every array restores (truncated data fails here), every
    array's bytes match the checksum recorded at save (a flipped bit or swapped data files fail here; steps of
    format 1 have no checksums and pass unverified: `meta.get("format", 1)` says which), params / batch_stats /
    ema_params are finite, and the recorded step matches the folder name.
    """
    step_dir = Path(step_dir)
    missing = _missing_files(step_dir)
    if missing:
        raise CheckpointDamagedError(f"missing {', '.join(missing)}")
    try:
        meta = json.loads((step_dir / META_ITEM / "metadata").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointDamagedError(f"unreadable {META_ITEM}/metadata ({e})") from e
    try:
        with _orbax_quiet(), ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
            if template_tree is None:
                tree = ckptr.restore(step_dir / STATE_ITEM)
            else:
                tree = ckptr.restore(step_dir / STATE_ITEM, args=ocp.args.StandardRestore(template_tree))
    except Exception as e:  # Orbax and TensorStore raise many types for damaged data
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointDamagedError(f"restoring its arrays failed: {type(e).__name__}: {first_line[:300]}") from e
    if meta.get("format", 1) >= 2:
        recorded = (meta.get("checksums") or {}).get("leaves")
        if not recorded:
            raise CheckpointDamagedError(f"{META_ITEM}/metadata records no checksums (format {meta['format']} has "
                                         f"them)")
        bad = _mismatched_leaf(tree, recorded)
        if bad is not None:
            raise CheckpointDamagedError(f"the bytes of {bad} do not match the checksum recorded when it was saved")
    bad = _nonfinite_leaf(tree)
    if bad is not None:
        raise CheckpointDamagedError(f"non-finite values in {bad}")
    if step_dir.name.isdigit():
        recorded = {meta.get("step"), int(np.asarray(tree.get("step", meta.get("step"))))}
        if recorded != {int(step_dir.name)}:
            raise CheckpointDamagedError(f"it records step(s) {sorted(recorded, key=str)}, not {step_dir.name}")
    return tree, meta


def newest_good_step(
    directory: str | Path, template_tree: Any | None = None, on_damaged: Any = None
) -> tuple[int, dict[str, Any], dict[str, Any]] | None:
    """(step, tree, meta) of the newest step that passes `read_step`, or None.

    on_damaged(step, reason) is called for each damaged step found on the way (newest first).
    """
    for step in reversed(list_steps(directory)):
        try:
            tree, meta = read_step(Path(directory) / str(step), template_tree)
        except CheckpointDamagedError as e:
            if on_damaged is not None:
                on_damaged(step, str(e))
            continue
        return step, tree, meta
    return None


# ---------------------------------------------------------------------------------------------------------
# The run's checkpointer
# ---------------------------------------------------------------------------------------------------------


def _metric_key(name: str) -> tuple[str, str, bool]:
    """'test_accuracy' → ('test', 'accuracy', higher_is_better=True); 'val_loss' → ('val', 'loss', False)."""
    split, _, metric = name.partition("_")
    if split not in ("test", "val") or metric not in ("accuracy", "loss"):
        raise ConfigError(
            f"checkpoint.keep_best_metric={name!r}: expected SPLIT_METRIC with SPLIT 'test' or 'val' and METRIC "
            f"'accuracy' or 'loss', e.g. 'test_accuracy' or 'val_loss'"
        )
    return split, metric, metric == "accuracy"


class RunCheckpointer:
    """The run's checkpoints under `workdir/checkpoints` (see the module docstring).

    steps_per_epoch: recorded as the data position in each checkpoint and checked on resume (a changed dataset
    size moves every epoch boundary); None if unknown (not recorded, not checked).
    """

    def __init__(self, workdir: str | Path, cfg: Config, main: bool = True, *, steps_per_epoch: int | None = None):
        c = cfg.checkpoint
        self.cfg = cfg
        self.main = main
        self.enabled = bool(c.enabled)
        self.workdir = Path(workdir)
        self.directory = self.workdir / "checkpoints"
        self.damaged_directory = self.workdir / "checkpoints_damaged"
        self.steps_per_epoch = steps_per_epoch
        self.warnings: list[str] = []  # every warning printed, for callers and tests
        if c.keep < 1:
            raise ConfigError(
                f"checkpoint.keep={c.keep} must be >= 1 (to write no checkpoints, set checkpoint.enabled=false)"
            )
        if c.every_steps is not None and c.every_steps < 1:
            raise ConfigError(f"checkpoint.every_steps={c.every_steps} must be >= 1 (or None)")
        self.keep = int(c.keep)
        self._best = _metric_key(c.keep_best_metric) if c.keep_best_metric else None
        self._metrics: dict[int, float] = {}
        self._manager: ocp.CheckpointManager | None = None
        self._closed = False
        if not self.enabled:
            return
        if not c.resume and list_steps(self.directory):
            self._move_previous_run_aside()
        self._metrics = self._read_metrics()
        self._warn_half_written()
        with _orbax_quiet():  # it reads every step's metadata: a damaged one is reported by `restore`
            self._manager = ocp.CheckpointManager(
                self.directory.absolute(),
                options=ocp.CheckpointManagerOptions(
                    create=True,
                    enable_async_checkpointing=bool(c.async_save),
                    cleanup_tmp_directories=True,  # deletes half-written `<step>.orbax-checkpoint-tmp*` folders
                    preservation_policy=self._retention(),
                ),
                item_names=(STATE_ITEM, META_ITEM),
            )

    # -- messages ---------------------------------------------------------------------------------------------

    def _warn(self, text: str) -> None:
        self.warnings.append(text)
        if self.main:
            _print(f"warning: {text}")

    # -- restore ----------------------------------------------------------------------------------------------

    def restore(self, state_template: TrainState) -> tuple[TrainState, int] | None:
        """(state, step) from the newest good checkpoint, or None when there is none (or checkpoints are off).

        state_template: a fresh state on the host / default device (its shapes, dtypes, structure and static
        fields are used; the values are not). The returned state holds jax arrays on the default device; place it
        with the strategy. Damaged steps are warned about and moved aside; a config that differs in keys that
        change the result raises ConfigMismatchError (unless checkpoint.allow_config_change).
        """
        if not self.enabled:
            return None
        template_tree = _restore_template(state_template)

        def damaged(step: int, reason: str) -> None:
            dest = self._move_aside(self.directory / str(step), str(step))
            self._warn(f"checkpoint at step {step} in {self.directory} is damaged ({reason}); moved it to {dest} "
                       f"and falling back to an older step")

        found = newest_good_step(self.directory, template_tree, on_damaged=damaged)
        assert self._manager is not None
        with _orbax_quiet():
            self._manager.reload()  # forget the steps moved aside: retention must never count them
        if found is None:
            return None
        step, tree, meta = found
        self._check_config(meta, step)
        if meta.get("format", 1) < 2:
            self._warn(f"checkpoint at step {step} in {self.directory} has no checksums (written by an older jaxcnn): "
                       f"its arrays cannot be verified")
        return tree_to_state(state_template, tree), step

    def _check_config(self, meta: Mapping[str, Any], step: int) -> None:
        saved_dict = meta.get("config")
        diffs: dict[str, tuple[Any, Any]] = {}
        if saved_dict is None:
            diffs["config"] = ("(not recorded)", "(this run's)")
        else:
            try:
                diffs = diff_configs(config_from_dict(saved_dict), self.cfg, ignore=RESUME_IGNORED_KEYS)
            except ConfigError as e:  # e.g. a model knob renamed since the checkpoint was written
                diffs["config"] = (f"(no longer valid: {e})", "(this run's)")
        saved_spe = meta.get("steps_per_epoch")
        if self.steps_per_epoch is not None and saved_spe is not None and saved_spe != self.steps_per_epoch:
            diffs["steps_per_epoch (from the training set size and batch size)"] = (saved_spe, self.steps_per_epoch)
        if not diffs:
            return
        lines = "\n".join(f"  {k}: {a!r} in the checkpoint, {b!r} now" for k, (a, b) in diffs.items())
        if self.cfg.checkpoint.allow_config_change:
            self._warn(f"resuming from step {step} with a changed config (checkpoint.allow_config_change=true):\n"
                       f"{lines}")
            return
        raise ConfigMismatchError(
            f"the checkpoint at step {step} in {self.directory} was saved with a different config; these keys change "
            f"the result:\n{lines}\nRerun with the checkpoint's values, use a fresh --workdir, or allow it with "
            f"--set checkpoint.allow_config_change=true"
        )

    # -- moving things aside ----------------------------------------------------------------------------------

    def _move_aside(self, src: Path, name: str) -> Path:
        dest = self.damaged_directory / name
        i = 1
        while dest.exists():
            dest = self.damaged_directory / f"{name}.{i}"
            i += 1
        if self.main and src.exists():
            self.damaged_directory.mkdir(parents=True, exist_ok=True)
            os.replace(src, dest)
        return dest

    def _warn_half_written(self) -> None:
        """Names the half-written step folders (a save that never finished) that Orbax's clean-up deletes."""
        if not self.directory.is_dir():
            return
        for p in sorted(self.directory.iterdir()):
            step, tmp, _ = p.name.partition(_TMP_SUFFIX)
            if tmp and p.is_dir():
                self._warn(f"checkpoint at step {step} in {self.directory} was half-written ({p.name}, a save that "
                           f"never finished); deleting it")

    def _move_previous_run_aside(self) -> None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        dest = self.workdir / f"checkpoints_replaced_{stamp}"
        if self.main:
            os.replace(self.directory, dest)
            _print(f"checkpoint.resume=false: moved the existing checkpoints to {dest}; starting from step 0")

    # -- saving -----------------------------------------------------------------------------------------------

    def save_due(self, step: int, epoch_end: bool) -> bool:
        """Whether `step` is a checkpoint step: a multiple of checkpoint.every_steps, or an epoch end with
        checkpoint.every_epoch."""
        c = self.cfg.checkpoint
        if not self.enabled:
            return False
        return bool((c.every_steps and step % c.every_steps == 0) or (epoch_end and c.every_epoch))

    def maybe_save(self, state: TrainState, step: int, *, epoch_end: bool, strategy: Any = None) -> bool:
        """Saves if `save_due(step, epoch_end)`; True if a save was started."""
        if not self.save_due(step, epoch_end):
            return False
        return self._save(state, step, strategy)

    def save_now(self, state: TrainState, step: int, *, strategy: Any = None) -> bool:
        """Saves `step` unless checkpoints are off or it is already saved (the final save, preemption)."""
        if not self.enabled or step in self.saved_steps():
            return False
        return self._save(state, step, strategy)

    def saved_steps(self) -> list[int]:
        """Steps saved or being saved, ascending."""
        return sorted(self._manager.all_steps()) if self._manager is not None else []

    def _save(self, state: TrainState, step: int, strategy: Any) -> bool:
        assert self._manager is not None
        host = strategy.unreplicate(state) if strategy is not None else state
        tree = state_to_tree(host)
        first_bad = int(np.asarray(tree["first_nonfinite"]).reshape(-1)[0])
        bad_leaf = _nonfinite_leaf(tree)
        if first_bad >= 0 or bad_leaf is not None:
            where = f"non-finite values in {bad_leaf}" if bad_leaf else f"a non-finite step {first_bad}"
            self._warn(f"not saving step {step}: the state has {where}; the last good checkpoint is kept as it was")
            return False
        if int(np.asarray(tree["step"])) != step:
            raise ValueError(f"asked to save step {step} but the state is at step {int(np.asarray(tree['step']))}")
        # The checksums are of the very host arrays handed to Orbax; they sit in the same step folder, which Orbax
        # renames to its final name only once every item is written, so no finished step lacks them.
        meta = {**self._metadata(step), "checksums": {"algorithm": CHECKSUM_ALGORITHM, "leaves": leaf_checksums(tree)}}
        self._manager.save(
            step,
            args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(tree), META_ITEM: ocp.args.JsonSave(meta)}),
            force=True,
        )
        return True

    def _metadata(self, step: int) -> dict[str, Any]:
        spe = self.steps_per_epoch
        return {
            "format": FORMAT_VERSION,
            "step": step,
            "steps_per_epoch": spe,
            # The data position: the epoch's order is a pure function of (seed, epoch).
            "epoch": step // spe if spe else None,
            "step_in_epoch": step % spe if spe else None,
            # The RNG: the key of step t is fold_in(PRNGKey(seed), t); nothing else is drawn.
            "rng": {"seed": self.cfg.seed, "key_of_step": "fold_in(PRNGKey(seed), step)"},
            "config": config_to_dict(self.cfg),
            "jax_version": jax.__version__,
            "device_count": jax.device_count(),
            "process_count": jax.process_count(),
            "saved_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }

    # -- the best step and retention --------------------------------------------------------------------------

    def record_metric(self, step: int, results: Mapping[str, Mapping[str, float]]) -> None:
        """Records the eval results of `step` ({'test': {'accuracy': .., 'loss': ..}, 'val': ...}); only the value
        named by checkpoint.keep_best_metric is kept (for choosing the best step to keep)."""
        if not self.enabled or self._best is None:
            return
        split, metric, _ = self._best
        if split not in results or metric not in results[split]:
            self._warn(f"checkpoint.keep_best_metric={self.cfg.checkpoint.keep_best_metric!r}: step {step} has no "
                       f"{split} {metric} (splits evaluated: {', '.join(results) or 'none'}); add data.val_size for "
                       f"'val_*' metrics")
            return
        self._metrics[int(step)] = float(results[split][metric])
        if self.main:
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp = self.directory / f".metrics.json.{os.getpid()}"
            tmp.write_text(json.dumps({str(k): v for k, v in sorted(self._metrics.items())}))
            os.replace(tmp, self.directory / "metrics.json")

    def _retention(self) -> AnyPreservationPolicy:
        """Orbax's policy for the steps to keep: the newest `checkpoint.keep`, plus the best by keep_best_metric."""
        policies: list[Any] = [LatestN(n=self.keep)]
        if self._best is not None:
            best = BestN(get_metric_fn=float, reverse=not self._best[2], n=1, keep_checkpoints_without_metrics=False)
            policies.append(_WithRecordedMetrics(best, self._metrics))
        return AnyPreservationPolicy(policies)

    def _read_metrics(self) -> dict[int, float]:
        path = self.directory / "metrics.json"
        if not path.is_file():
            return {}
        try:
            return {int(k): float(v) for k, v in json.loads(path.read_text()).items()}
        except (ValueError, OSError) as e:
            self._warn(f"ignoring unreadable {path} ({e}); the best step is chosen among new evaluations only")
            return {}

    def close(self) -> None:
        """Waits for the last save and releases Orbax's resources (idempotent)."""
        if self._manager is None or self._closed:
            return
        self._closed = True
        self._manager.close()


@dataclasses.dataclass
class _WithRecordedMetrics:
    """Runs an Orbax preservation policy with the metrics recorded by `record_metric`, by step.

    Orbax's BestN reads the metrics passed to `save`, but the loop evaluates a step after saving it.
    """

    policy: Any
    metrics: Mapping[int, float]

    def should_preserve(self, checkpoints: list[PolicyCheckpointInfo], *, context: Any) -> list[bool]:
        recorded = dict(self.metrics)
        infos = [dataclasses.replace(c, metrics=recorded.get(c.step)) for c in checkpoints]
        return self.policy.should_preserve(infos, context=context)
