"""`python -m jaxcnn train` end to end on a small slice of real Fashion-MNIST, and the CLI's clear errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = "experiments/fashion_mnist_lenet5.py"


def run_cli(*args, env_extra=None, timeout=300):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "jaxcnn", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_train_end_to_end_on_a_real_slice(tmp_path, fashion_dir):
    workdir = tmp_path / "run"
    r = run_cli("train", EXPERIMENT, "--workdir", str(workdir),
                "--set", "data.train_limit=2048", "--set", "data.test_limit=1000", "--set", "data.eval_batch_size=300",
                "--set", "train.epochs=2", "--set", "train.log_every_steps=8", "--set", "optim.lr=0.05",
                "--set", "model.pool=avg")
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = json.loads((workdir / "config.json").read_text())
    assert cfg["model"] == {"name": "lenet5", "act": "relu", "pool": "avg"}
    assert cfg["optim"]["lr"] == 0.05 and cfg["data"]["train_limit"] == 2048
    summary = json.loads((workdir / "summary.json").read_text())
    for key in ("test_accuracy", "test_loss", "params", "wall_s", "train_images_per_s", "jax_version", "devices",
                "git_commit"):
        assert key in summary, key
    assert summary["params"] == 61_706
    assert summary["test_count"] == 1000  # 1000 test images in batches of 300: every one counted once
    assert summary["test_accuracy"] > 0.5  # two epochs (one of warm-up) on 2k images; chance is 0.1
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    kinds = {r["kind"] for r in records}
    assert {"train", "test"} <= kinds
    train_steps = [r["step"] for r in records if r["kind"] == "train"]
    assert train_steps == sorted(train_steps) and train_steps[-1] == 32
    assert list((workdir / "tb").glob("events.out.tfevents.*")), "no TensorBoard event file"
    assert "test accuracy" in r.stderr and "wall" in r.stderr


def test_tensorboard_reads_the_event_files(tmp_path):
    from tensorboardX import SummaryWriter  # noqa: F401  (the writer library)

    from jaxcnn.results.writers import MetricsWriter

    w = MetricsWriter(tmp_path)
    w.write("train", 5, {"loss": 0.5, "accuracy": 0.9})
    w.close()
    event_files = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert event_files
    # Read back with TensorBoard's own event format (protobuf records) through tensorboardX's reader-compatible proto.
    from tensorboardX.proto import event_pb2

    data = event_files[0].read_bytes()
    pos, tags = 0, set()
    import struct

    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        ev = event_pb2.Event()
        ev.ParseFromString(data[pos + 12:pos + 12 + length])
        tags |= {v.tag for v in ev.summary.value}
        pos += 12 + length + 4
    assert {"train/loss", "train/accuracy"} <= tags


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--set", "optim.lr=fast"], ["optim.lr", "float"]),
        (["--set", "model.pool=median"], ["model.pool", "max", "avg", "l2"]),
        (["--set", "optim.lrate=0.1"], ["optim.lrate", "valid keys"]),
        (["--set", "model.name=resnet7"], ["resnet7"]),
    ],
)
def test_cli_config_errors_are_one_clear_line(args, fragments):
    r = run_cli("train", EXPERIMENT, *args, timeout=600)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    for f in fragments:
        assert f in r.stderr


def test_missing_dataset_is_a_clear_error(tmp_path):
    r = run_cli("train", "experiments/mnist_lenet5.py", "--workdir", str(tmp_path / "w"),
                "--set", f"data.data_dir={tmp_path / 'empty'}", env_extra={"JAXCNN_DATA_DIR": str(tmp_path / "none")},
                timeout=600)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "train-images-idx3-ubyte.gz" in r.stderr


def test_models_command_lists_the_registry():
    r = run_cli("models", timeout=600)
    assert r.returncode == 0
    names = [line.split()[0] for line in r.stdout.splitlines()]
    assert "lenet5" in names and "mlp" in names
