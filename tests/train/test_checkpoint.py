"""Checkpoints: exact round trip, retention (last K + best), every kind of damage, non-finite state, config checks,
and the run directory (unwritable, full, locked by another process, signals)."""

from __future__ import annotations

import dataclasses
import errno
import glob
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcnn.config import CheckpointConfig, Config, OptimConfig, TrainConfig
from jaxcnn.train import checkpoint as ckpt_lib
from jaxcnn.train.checkpoint import (
    ConfigMismatchError,
    RunCheckpointer,
    RunDirectory,
    WorkdirError,
)
from jaxcnn.train.state import create_train_state, init_variables


class TinyNet(nn.Module):
    """Conv → BatchNorm → mean → Dense: every kind of state (params, batch_stats, optimizer moments, EMA)."""

    classes: int = 3

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Conv(4, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = nn.Dense(512)(x.mean((1, 2)))  # a kernel of 8 KiB: stored in its own data file, not inlined
        return nn.Dense(self.classes)(x)


def fresh_state(seed: int = 0):
    model = TinyNet()
    return create_train_state(model, optax.adam(1e-3), init_variables(model, (1, 8, 8, 1), seed), ema=True)


def state_at(step: int, seed: int = 0):
    """A state whose every leaf is a distinct function of `step` (so steps are told apart bit for bit)."""
    s = fresh_state(seed)
    rng = np.random.default_rng(step)

    def fill(x):
        x = np.asarray(x)
        if np.issubdtype(x.dtype, np.floating):
            return jnp.asarray(rng.standard_normal(x.shape).astype(x.dtype))
        return jnp.asarray(x)

    s = jax.tree_util.tree_map(fill, s)
    return s.replace(step=jnp.asarray(step, jnp.int32), first_nonfinite=jnp.full((2,), -1, jnp.int32))


def host_leaves(state):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(state)]


def assert_same_state(a, b):
    """Same pytree structure (static fields aside: each state has its own optax functions), same bits."""
    a, b = flax.serialization.to_state_dict(a), flax.serialization.to_state_dict(b)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(host_leaves(a), host_leaves(b)):
        assert x.dtype == y.dtype and np.array_equal(x, y)


def cfg_with(**checkpoint) -> Config:
    return Config(checkpoint=CheckpointConfig(**{"async_save": True, **checkpoint}))


def save_steps(workdir, cfg, steps, **kw):
    ck = RunCheckpointer(workdir, cfg, steps_per_epoch=5, **kw)
    for s in steps:
        assert ck.save_now(state_at(s), s)
    ck.close()
    return ck


# ---------------------------------------------------------------------------------------------------------
# Round trip and retention
# ---------------------------------------------------------------------------------------------------------


def test_round_trip_is_bit_exact_and_records_the_data_position(tmp_path):
    cfg = cfg_with()
    save_steps(tmp_path, cfg, [7])
    ck = RunCheckpointer(tmp_path, cfg, steps_per_epoch=5)
    state, step = ck.restore(fresh_state(seed=1))  # a template with other values: only its shapes count
    ck.close()
    assert step == 7
    assert_same_state(state, state_at(7))
    assert state.apply_fn is not None and state.tx is not None
    meta = ckpt_lib.read_step(tmp_path / "checkpoints" / "7")[1]
    assert (meta["epoch"], meta["step_in_epoch"], meta["steps_per_epoch"]) == (1, 2, 5)
    assert meta["rng"]["seed"] == cfg.seed and meta["config"]["optim"]["lr"] == cfg.optim.lr


def test_no_checkpoint_and_disabled_checkpoints_restore_nothing(tmp_path):
    assert RunCheckpointer(tmp_path, cfg_with()).restore(fresh_state()) is None
    off = RunCheckpointer(tmp_path / "off", cfg_with(enabled=False))
    assert not off.save_now(state_at(3), 3) and off.restore(fresh_state()) is None
    assert not (tmp_path / "off" / "checkpoints").exists()


def test_save_due_every_steps_and_epoch_ends(tmp_path):
    ck = RunCheckpointer(tmp_path, cfg_with(every_steps=4, every_epoch=True))
    assert [s for s in range(1, 13) if ck.save_due(s, epoch_end=(s % 5 == 0))] == [4, 5, 8, 10, 12]
    ck = RunCheckpointer(tmp_path / "b", cfg_with(every_steps=None, every_epoch=False))
    assert not any(ck.save_due(s, epoch_end=True) for s in range(1, 10))


def test_keeps_the_last_k(tmp_path):
    save_steps(tmp_path, cfg_with(keep=2), [5, 10, 15, 20])
    assert ckpt_lib.list_steps(tmp_path / "checkpoints") == [15, 20]


def test_keeps_the_best_by_metric_besides_the_last_k(tmp_path):
    cfg = cfg_with(keep=2, keep_best_metric="test_accuracy")
    ck = RunCheckpointer(tmp_path, cfg, steps_per_epoch=5)
    for s, acc in [(5, 0.5), (10, 0.9), (15, 0.7), (20, 0.6), (25, 0.8)]:
        ck.maybe_save(state_at(s), s, epoch_end=True)
        ck.record_metric(s, {"test": {"accuracy": acc, "loss": 1 - acc}})
    ck.close()
    assert ckpt_lib.list_steps(tmp_path / "checkpoints") == [10, 20, 25]
    # The record survives a restart: a new checkpointer still keeps step 10.
    ck = RunCheckpointer(tmp_path, cfg, steps_per_epoch=5)
    ck.save_now(state_at(30), 30)
    ck.close()
    assert ckpt_lib.list_steps(tmp_path / "checkpoints") == [10, 25, 30]
    # 'val_loss' is minimised.
    ck = RunCheckpointer(tmp_path / "v", cfg_with(keep=1, keep_best_metric="val_loss"))
    for s, loss in [(1, 0.3), (2, 0.1), (3, 0.2)]:
        ck.save_now(state_at(s), s)
        ck.record_metric(s, {"test": {"accuracy": 0.0, "loss": 9.0}, "val": {"accuracy": 0.0, "loss": loss}})
    ck.close()
    assert ckpt_lib.list_steps(tmp_path / "v" / "checkpoints") == [2, 3]


def test_a_bad_best_metric_name_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="keep_best_metric='accuracy'.*test_accuracy"):
        RunCheckpointer(tmp_path, cfg_with(keep_best_metric="accuracy"))


def test_save_now_skips_a_step_already_saved(tmp_path):
    ck = RunCheckpointer(tmp_path, cfg_with())
    assert ck.maybe_save(state_at(5), 5, epoch_end=True)
    assert not ck.save_now(state_at(5), 5)
    ck.close()


def test_resume_false_moves_old_checkpoints_aside(tmp_path):
    save_steps(tmp_path, cfg_with(), [5])
    ck = RunCheckpointer(tmp_path, cfg_with(resume=False))
    assert ck.saved_steps() == []
    ck.close()
    moved = glob.glob(str(tmp_path / "checkpoints_replaced_*" / "5"))
    assert len(moved) == 1


# ---------------------------------------------------------------------------------------------------------
# Damage
# ---------------------------------------------------------------------------------------------------------


def _largest_array_file(step_dir: Path) -> Path:
    files = [Path(f) for f in glob.glob(str(step_dir / "state" / "**" / "d" / "*"), recursive=True)]
    return max(files, key=lambda f: f.stat().st_size)


def damage_missing_metadata(step_dir: Path) -> None:
    (step_dir / "state" / "_METADATA").unlink()


def damage_missing_manifest(step_dir: Path) -> None:
    (step_dir / "state" / "manifest.ocdbt").unlink()


def damage_truncated_array_file(step_dir: Path) -> None:
    f = _largest_array_file(step_dir)
    os.truncate(f, f.stat().st_size // 2)


def damage_corrupted_array_file(step_dir: Path) -> None:
    f = _largest_array_file(step_dir)
    size = f.stat().st_size
    with open(f, "r+b") as fh:
        fh.seek(size // 2)
        fh.write(b"\xff" * (size - size // 2))


def damage_half_written(step_dir: Path) -> None:
    """What a save killed midway leaves: the step folder still under Orbax's temporary name, incomplete."""
    tmp = step_dir.parent / f"{step_dir.name}.orbax-checkpoint-tmp-1732600000"
    step_dir.rename(tmp)
    (tmp / "_CHECKPOINT_METADATA").unlink()
    shutil.rmtree(tmp / "meta")


DAMAGE = {
    "missing _METADATA": damage_missing_metadata,
    "missing manifest.ocdbt": damage_missing_manifest,
    "truncated array file": damage_truncated_array_file,
    "corrupted array file": damage_corrupted_array_file,
    "half-written step": damage_half_written,
}


# TensorStore may finish a failed read's callbacks after Orbax closed its event loop: harmless noise.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_latest_step_falls_back_and_is_moved_aside(tmp_path, kind, capsys):
    cfg = cfg_with(keep=2)
    save_steps(tmp_path, cfg, [10, 20])
    ckpts = tmp_path / "checkpoints"
    DAMAGE[kind](ckpts / "20")

    ck = RunCheckpointer(tmp_path, cfg, steps_per_epoch=5)
    state, step = ck.restore(fresh_state())
    assert step == 10
    assert_same_state(state, state_at(10))
    err = capsys.readouterr().err
    assert "warning: checkpoint at step 20" in err, err
    assert ck.warnings and "step 20" in ck.warnings[0]
    if kind == "half-written step":  # a save that never finished: Orbax's clean-up deletes it
        assert not (tmp_path / "checkpoints_damaged").exists()
    else:
        moved = list((tmp_path / "checkpoints_damaged").iterdir())
        assert len(moved) == 1 and moved[0].name.startswith("20")
    assert not any(p.name.startswith("20") for p in ckpts.iterdir())

    # Training goes on from 10: the next saves (keep=2) never delete the good step 10 for the damaged 20.
    ck.maybe_save(state_at(15), 15, epoch_end=True)
    ck.close()
    assert ckpt_lib.list_steps(ckpts) == [10, 15]
    ck = RunCheckpointer(tmp_path, cfg, steps_per_epoch=5)
    state, step = ck.restore(fresh_state())
    ck.close()
    assert step == 15 and not ck.warnings


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_every_step_damaged_restores_nothing(tmp_path):
    cfg = cfg_with()
    save_steps(tmp_path, cfg, [10])
    damage_truncated_array_file(tmp_path / "checkpoints" / "10")
    ck = RunCheckpointer(tmp_path, cfg)
    assert ck.restore(fresh_state()) is None
    ck.save_now(state_at(3), 3)
    ck.close()
    assert ckpt_lib.list_steps(tmp_path / "checkpoints") == [3]


# ---------------------------------------------------------------------------------------------------------
# Non-finite state, config changes
# ---------------------------------------------------------------------------------------------------------


def test_non_finite_state_is_never_saved(tmp_path):
    cfg = cfg_with()
    save_steps(tmp_path, cfg, [10])
    before = {p: p.read_bytes() for p in (tmp_path / "checkpoints" / "10").rglob("*") if p.is_file()}
    ck = RunCheckpointer(tmp_path, cfg)
    flagged = state_at(15).replace(first_nonfinite=jnp.array([13, 0], jnp.int32))
    nan = state_at(16)
    nan = nan.replace(params=jax.tree_util.tree_map(lambda x: x.at[..., 0].set(jnp.nan), nan.params))
    assert not ck.save_now(flagged, 15)
    assert not ck.save_now(nan, 16)
    ck.close()
    assert any("not saving step 15" in w and "non-finite step 13" in w for w in ck.warnings)
    assert any("not saving step 16" in w and "params/BatchNorm_0/bias" in w for w in ck.warnings)
    assert ckpt_lib.list_steps(tmp_path / "checkpoints") == [10]
    after = {p: p.read_bytes() for p in (tmp_path / "checkpoints" / "10").rglob("*") if p.is_file()}
    assert after == before


def test_a_changed_config_is_refused_listing_the_keys_unless_allowed(tmp_path, capsys):
    cfg = cfg_with()
    save_steps(tmp_path, cfg, [10])
    changed = dataclasses.replace(
        cfg,
        optim=OptimConfig(lr=0.05),  # changes the result
        train=TrainConfig(progress=False, log_every_steps=7),  # does not
        name="renamed",
    )
    with pytest.raises(ConfigMismatchError) as e:
        RunCheckpointer(tmp_path, changed).restore(fresh_state())
    msg = str(e.value)
    assert "optim.lr: 0.1 in the checkpoint, 0.05 now" in msg
    assert "train.progress" not in msg and "log_every_steps" not in msg and "name" not in msg.split("\n", 1)[1]
    assert "checkpoint.allow_config_change=true" in msg

    allowed = dataclasses.replace(changed, checkpoint=CheckpointConfig(allow_config_change=True))
    ck = RunCheckpointer(tmp_path, allowed)
    _, step = ck.restore(fresh_state())
    ck.close()
    assert step == 10 and "optim.lr" in ck.warnings[0]

    # Only ignored keys changed: no error, no warning.
    quiet = dataclasses.replace(cfg, train=TrainConfig(progress=False), checkpoint=CheckpointConfig(keep=5))
    ck = RunCheckpointer(tmp_path, quiet)
    assert ck.restore(fresh_state())[1] == 10 and not ck.warnings
    ck.close()


def test_a_changed_training_set_size_is_refused(tmp_path):
    cfg = cfg_with()
    save_steps(tmp_path, cfg, [10])
    with pytest.raises(ConfigMismatchError, match="steps_per_epoch.*5 in the checkpoint, 6 now"):
        RunCheckpointer(tmp_path, cfg, steps_per_epoch=6).restore(fresh_state())


# ---------------------------------------------------------------------------------------------------------
# The run directory
# ---------------------------------------------------------------------------------------------------------


def test_run_directory_creates_the_workdir_and_releases_everything(tmp_path):
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with RunDirectory(tmp_path / "a" / "b") as rd:
        assert rd.path.is_dir()
        assert f"pid {os.getpid()}" in (rd.path / ".lock").read_text()
        assert signal.getsignal(signal.SIGTERM) != before[0]
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    assert [p.name for p in (tmp_path / "a" / "b").iterdir()] == [".lock"]  # the probe file is gone
    with RunDirectory(tmp_path / "a" / "b"):  # the lock was released
        pass


def test_a_file_where_the_workdir_should_be_is_a_clear_error(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(WorkdirError, match="exists and is not a directory"):
        RunDirectory(tmp_path / "f").__enter__()
    with pytest.raises(WorkdirError, match="cannot create workdir"):
        RunDirectory(tmp_path / "f" / "run").__enter__()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; the probe test covers it")
def test_a_read_only_workdir_is_a_clear_error(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(WorkdirError, match="not writable"):
            RunDirectory(ro).__enter__()
    finally:
        ro.chmod(0o700)


def test_a_failing_probe_write_is_a_clear_error(tmp_path, monkeypatch):
    """What a full disk or read-only mount does to the probe (simulated: tests may run as root)."""
    real_fsync = os.fsync

    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(WorkdirError, match="No space left on device.*the disk is full"):
        RunDirectory(tmp_path / "w").__enter__()
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert list((tmp_path / "w").iterdir()) == []  # the probe was cleaned up

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(WorkdirError, match="Read-only file system.*not writable"):
        RunDirectory(tmp_path / "w").__enter__()


def test_a_nearly_full_disk_is_a_clear_error(tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(ckpt_lib.shutil, "disk_usage", lambda p: usage._replace(free=10 * 2**20))
    with pytest.raises(WorkdirError, match=r"only 10\.0 MiB free"):
        RunDirectory(tmp_path / "w").__enter__()


@pytest.mark.multiprocess
def test_a_second_run_in_the_same_workdir_is_refused_naming_the_first(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from jaxcnn.train.checkpoint import RunDirectory
            with RunDirectory({str(tmp_path)!r}):
                print("locked", flush=True)
                sys.stdin.readline()
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(WorkdirError, match=rf"in use by another run \(process pid {holder.pid} on "):
            RunDirectory(tmp_path).__enter__()
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    with RunDirectory(tmp_path):  # free again once the first run ended
        pass


def test_sigterm_and_sigint_only_request_a_stop(tmp_path):
    with RunDirectory(tmp_path) as rd:
        assert not rd.stop_requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert rd.stop_requested and rd.stop_signal == "SIGTERM" and rd.stop_signum == signal.SIGTERM
        with pytest.raises(SystemExit) as e:  # the same signal again: stop at once
            os.kill(os.getpid(), signal.SIGTERM)
        assert e.value.code == 128 + signal.SIGTERM
    with RunDirectory(tmp_path) as rd:
        os.kill(os.getpid(), signal.SIGINT)
        assert rd.stop_requested and rd.stop_signal == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
