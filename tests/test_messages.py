"""The messages a user meets: a bad train.steps on the command line, a non-finite loss, a JAXCNN_DATA_DIR without the
dataset (the damaged-checkpoint message is in tests/train/test_checkpoint_integrity.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from jaxcnn.config import Config, OptimConfig, TrainConfig

REPO = Path(__file__).resolve().parents[1]


def test_a_negative_train_steps_names_the_key_on_the_command_line(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    r = subprocess.run([sys.executable, "-m", "jaxcnn", "train", "experiments/fashion_mnist_lenet5.py", "--workdir",
                        str(tmp_path / "w"), "--set", "train.steps=-5"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "train.steps=-5" in r.stderr and ">= 1" in r.stderr and "make_schedule" not in r.stderr
    assert not (tmp_path / "w").exists()


def nonfinite_message(cfg: Config) -> str:
    from jaxcnn.train.loop import NonFiniteError, _raise_if_nonfinite

    state = types.SimpleNamespace(first_nonfinite=np.array([12, 0], np.int32), params={"Dense_0": {"kernel": 0.0}})
    with pytest.raises(NonFiniteError) as e:
        _raise_if_nonfinite(state, cfg)
    return str(e.value)


def test_the_non_finite_message_suggests_what_the_run_does_not_already_do():
    msg = nonfinite_message(Config())
    assert msg.startswith("step 12: the loss is not finite")
    assert "optim.lr (it is 0.1)" in msg and "optim.grad_clip_norm=1.0" in msg and "compute_dtype" not in msg
    msg = nonfinite_message(Config(optim=OptimConfig(lr=0.5, grad_clip_norm=2.0),
                                   train=TrainConfig(compute_dtype="bfloat16")))
    assert "a lower optim.grad_clip_norm (it is 2)" in msg and "train.compute_dtype=float32 (it is bfloat16)" in msg


def test_a_data_dir_variable_without_the_dataset_is_named_once(tmp_path, monkeypatch, capsys, mnist_dir):
    from jaxcnn.data import load_split
    from jaxcnn.data.sources import locate

    monkeypatch.setattr(locate, "SHARED_FOLDERS", {"mnist": (str(mnist_dir),)})
    monkeypatch.setattr(locate, "_NOTES_PRINTED", set())
    monkeypatch.setenv("JAXCNN_DATA_DIR", str(tmp_path / "elsewhere"))
    (tmp_path / "elsewhere").mkdir()
    for split in ("train", "test"):
        load_split("mnist", split, source="archive", limit=10)
    lines = [line for line in capsys.readouterr().err.splitlines() if "JAXCNN_DATA_DIR" in line]
    assert lines == [f"note: JAXCNN_DATA_DIR={tmp_path / 'elsewhere'} holds no usable mnist files; read them from "
                     f"{mnist_dir}"]
