"""Whole runs on a slice of real MNIST: exact resume after a real SIGKILL, SIGTERM preemption, non-finite losses,
config changes, a locked or unwritable workdir, and a resume onto another device count.

The reference for a resumed run is the same run done in one go (bit-identical on the CPU with the same devices).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxcnn.config import load_experiment
from jaxcnn.results import writers
from jaxcnn.train import checkpoint as ckpt_lib
from jaxcnn.train.checkpoint import ConfigMismatchError, RunDirectory, WorkdirError
from jaxcnn.train.state import leaf_names

REPO = Path(__file__).resolve().parents[2]
EXPERIMENT = REPO / "experiments" / "mnist_lenet5.py"

# 640 images in batches of 32: 20 steps per epoch. LeNet-5 with BatchNorm, dropout, random crops and an EMA, so that
# every part of the state and every random draw must come back exactly.
SMALL = [
    "data.train_limit=640", "data.test_limit=200", "data.batch_size=32", "data.eval_batch_size=200",
    "data.crop_padding=2", "model.norm=batch", "model.dropout=0.1", "optim.ema_decay=0.9",
    "schedule.warmup_epochs=0.1", "train.log_every_steps=1", "train.progress=false",
]


def sets(*overrides: str) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def leaves_of(workdir: Path, step: int) -> dict[str, np.ndarray]:
    """Every array of the checkpoint at `step` (params, batch_stats, opt_state, ema_params, ...) by name."""
    tree, _ = ckpt_lib.read_step(workdir / "checkpoints" / str(step))
    return dict(zip(leaf_names(tree), (np.asarray(x) for x in jax.tree_util.tree_leaves(tree))))


def assert_bit_identical(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not (a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]))]
    assert not differ, f"not bit-identical: {differ}"


def run_cli(workdir: Path, mnist_dir: Path, overrides: list[str], *, kill_at: int | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m jaxcnn train` in a subprocess; with kill_at, the process SIGKILLs itself right after step
    kill_at has been logged (before that step's checkpoint decision), a deterministic point for a real kill."""
    driver = textwrap.dedent("""
        import os, signal, sys
        from jaxcnn.results import writers
        kill_at = int(sys.argv[1])
        write = writers.MetricsWriter.write
        def write_then_die(self, kind, step, values):
            write(self, kind, step, values)
            if kind == "train" and step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        writers.MetricsWriter.write = write_then_die
        from jaxcnn.cli import main
        sys.exit(main(sys.argv[2:]))
    """)
    args = ["train", str(EXPERIMENT), "--workdir", str(workdir),
            *sets(*SMALL, f"data.data_dir={mnist_dir}", *overrides)]
    return subprocess.run([sys.executable, "-c", driver, str(kill_at or -1), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_killed_and_resumed_run_is_bit_identical_to_one_go(tmp_path, mnist_dir):
    overrides = ["train.steps=40", "checkpoint.every_steps=6", "checkpoint.keep=2"]  # saves at 6, 12, 18, 20 (epoch)
    one_go = run_cli(tmp_path / "one_go", mnist_dir, overrides)
    assert one_go.returncode == 0, one_go.stderr[-3000:]

    killed = run_cli(tmp_path / "resumed", mnist_dir, overrides, kill_at=23)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    steps = ckpt_lib.list_steps(tmp_path / "resumed" / "checkpoints")
    assert steps[-1] in (18, 20) and 23 not in steps  # killed 3 steps past the last checkpoint
    logged = [r["step"] for r in writers.read_jsonl(tmp_path / "resumed" / "metrics.jsonl") if r.get("kind") == "train"]
    assert max(logged) == 23

    resumed = run_cli(tmp_path / "resumed", mnist_dir, overrides)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from checkpoint at step {steps[-1]} of 40" in resumed.stderr
    summary = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert summary["steps"] == 40 and summary["resumed_from_step"] == steps[-1]
    assert_bit_identical(leaves_of(tmp_path / "one_go", 40), leaves_of(tmp_path / "resumed", 40))


@pytest.mark.slow
@pytest.mark.multiprocess
def test_sigterm_finishes_the_step_saves_and_the_rerun_resumes(tmp_path, mnist_dir):
    workdir = tmp_path / "run"
    args = [sys.executable, "-m", "jaxcnn", "train", str(EXPERIMENT), "--workdir", str(workdir),
            *sets(*SMALL, f"data.data_dir={mnist_dir}", "train.steps=300", "checkpoint.every_steps=1000",
                  "checkpoint.every_epoch=false")]
    proc = subprocess.Popen(args, cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # wait until training is under way
        if metrics.exists() and any(r.get("kind") == "train" for r in writers.read_jsonl(metrics)):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    last = max(r["step"] for r in writers.read_jsonl(metrics) if r.get("kind") == "train")
    assert last < 300
    assert f"stopped at step {last} on SIGTERM; checkpoint saved" in err
    assert ckpt_lib.list_steps(workdir / "checkpoints") == [last]  # no checkpoint was due: this one is the stop's

    rerun = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming from checkpoint at step {last} of 300" in rerun.stderr
    assert json.loads((workdir / "summary.json").read_text())["steps"] == 300


# ---------------------------------------------------------------------------------------------------------
# In-process runs
# ---------------------------------------------------------------------------------------------------------


def config(mnist_dir: Path, *overrides: str):
    return load_experiment(EXPERIMENT, [*SMALL, f"data.data_dir={mnist_dir}", *overrides])


@pytest.fixture(scope="module")
def ten_steps(tmp_path_factory, mnist_dir):
    """A finished 10-step run (checkpoint at 10); tests copy it."""
    from jaxcnn.train.loop import train

    workdir = tmp_path_factory.mktemp("ten") / "run"
    train(config(mnist_dir, "train.steps=10", "checkpoint.every_steps=5"), workdir)
    return workdir


def copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    (dst / ".lock").unlink(missing_ok=True)
    return dst


def file_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_a_non_finite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(ten_steps, tmp_path, mnist_dir):
    from jaxcnn.train.loop import NonFiniteError, train

    workdir = copy_run(ten_steps, tmp_path / "run")
    before = file_bytes(workdir / "checkpoints")
    cfg = config(mnist_dir, "train.steps=20", "checkpoint.every_steps=5", "optim.lr=1e10",
                 "checkpoint.allow_config_change=true")
    with pytest.raises(NonFiniteError, match=r"step 1[0-4]: (the loss|the gradient of \S+) is not finite"):
        train(cfg, workdir)
    # The run stopped before its next checkpoint (15): the last good one is there, byte for byte as it was.
    assert file_bytes(workdir / "checkpoints") == before


@pytest.mark.slow
def test_a_resume_with_a_changed_config_lists_the_keys(ten_steps, tmp_path, mnist_dir, capsys):
    from jaxcnn.train.loop import train

    workdir = copy_run(ten_steps, tmp_path / "run")
    with pytest.raises(ConfigMismatchError) as e:
        train(config(mnist_dir, "train.steps=10", "checkpoint.every_steps=5", "optim.lr=0.01",
                     "data.crop_padding=0", "train.log_every_steps=3"), workdir)
    msg = str(e.value)
    assert "optim.lr: 0.05 in the checkpoint, 0.01 now" in msg and "data.crop_padding: 2 in the checkpoint, 0 now" in msg
    assert "log_every_steps" not in msg
    # Keys that do not change the result are free; the allow flag lets the others through.
    summary = train(config(mnist_dir, "train.steps=10", "checkpoint.every_steps=5", "train.log_every_steps=3",
                           "checkpoint.keep=4"), workdir)
    assert summary["resumed_from_step"] == 10
    summary = train(config(mnist_dir, "train.steps=12", "checkpoint.every_steps=5",
                           "checkpoint.allow_config_change=true"), workdir)
    assert summary["resumed_from_step"] == 10 and summary["steps"] == 12
    assert "train.steps: 10 in the checkpoint, 12 now" in capsys.readouterr().err


def test_a_second_run_in_the_same_workdir_is_refused_before_training(tmp_path, mnist_dir):
    from jaxcnn.train.loop import train

    with RunDirectory(tmp_path / "run"), pytest.raises(WorkdirError, match="in use by another run"):
        train(config(mnist_dir, "train.steps=2"), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_an_unwritable_workdir_is_refused_before_training(tmp_path, mnist_dir):
    from jaxcnn.train.loop import train

    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(WorkdirError, match="cannot create workdir"):
        train(config(mnist_dir, "train.steps=2"), tmp_path / "file" / "run")


@pytest.mark.slow
def test_resume_onto_another_device_count(tmp_path, mnist_dir, monkeypatch):
    """Stopped (SIGTERM) on 8 devices with pmap, resumed on 1 device: it ends close to the run done in one go on 8
    devices (not bit-identical: the device count changes the order of float sums). The reverse direction, and real
    processes with 8 and 1 devices, are in test_checkpoint_devices.py."""
    from jaxcnn.train.loop import train

    assert jax.device_count() == 8
    # No dropout or crops: pmap draws them per device, single for the whole batch.
    # 20 steps: the runs part at step 12 and then drift apart as float rounding grows (BatchNorm's sums differ between
    # flax's pmap layer and oneDNN's single-device kernels); by step 30 this lr's spikes have amplified it to ~1%.
    common = ("train.steps=20", "checkpoint.every_steps=100", "checkpoint.every_epoch=false", "model.dropout=0.0",
              "data.crop_padding=0")
    one_go = train(config(mnist_dir, *common, "parallel.strategy=pmap"), tmp_path / "one_go")
    assert one_go["device_count"] == 8

    write = writers.MetricsWriter.write

    def stop_at_12(self, kind, step, values):
        write(self, kind, step, values)
        if kind == "train" and step == 12:
            signal.raise_signal(signal.SIGTERM)

    for first, second in [("pmap", "single")]:
        workdir = tmp_path / f"{first}_then_{second}"
        monkeypatch.setattr(writers.MetricsWriter, "write", stop_at_12)
        with pytest.raises(SystemExit) as e:
            train(config(mnist_dir, *common, f"parallel.strategy={first}"), workdir)
        assert e.value.code == 128 + signal.SIGTERM
        monkeypatch.setattr(writers.MetricsWriter, "write", write)
        assert ckpt_lib.list_steps(workdir / "checkpoints") == [12]
        summary = train(config(mnist_dir, *common, f"parallel.strategy={second}"), workdir)
        assert summary["resumed_from_step"] == 12 and summary["strategy"] == second
        ref, got = leaves_of(tmp_path / "one_go", 20), leaves_of(workdir, 20)
        for k in ref:
            np.testing.assert_allclose(got[k], ref[k], rtol=2e-3, atol=2e-4, err_msg=k)


@pytest.mark.slow
def test_steps_per_call_changes_nothing_but_the_calls(tmp_path, mnist_dir):
    """One step per call (log every step) and several per call (up to the log / checkpoint / epoch points, capped
    at 7) train the same state bit for bit: the loop body is one compiled computation whatever the count."""
    from jaxcnn.train.loop import train

    common = ("train.steps=30", "checkpoint.every_steps=12", "checkpoint.every_epoch=false")
    train(config(mnist_dir, *common, "train.log_every_steps=1"), tmp_path / "one")
    many = train(config(mnist_dir, *common, "train.log_every_steps=25", "train.steps_per_call=7"), tmp_path / "many")
    assert many["steps"] == 30
    assert_bit_identical(leaves_of(tmp_path / "one", 30), leaves_of(tmp_path / "many", 30))
    logged = [r["step"] for r in writers.read_jsonl(tmp_path / "many" / "metrics.jsonl") if r.get("kind") == "train"]
    assert logged == [12, 20, 24, 25, 30]  # checkpoint 12, epoch end 20, checkpoint 24, log 25, the end 30


def test_a_negative_steps_per_call_is_refused_before_anything_is_written(tmp_path, mnist_dir):
    from jaxcnn.config import ConfigError
    from jaxcnn.train.loop import train

    with pytest.raises(ConfigError, match="train.steps_per_call=-1"):
        train(config(mnist_dir, "train.steps=2", "train.steps_per_call=-1"), tmp_path / "run")
    assert not (tmp_path / "run" / "config.json").exists()
