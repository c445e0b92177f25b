"""Checkpoint checksums: what is recorded, a step that fails them, a step written without them, and one message per
damaged step (Orbax's own log lines silenced)."""

from __future__ import annotations

import json
import sys
import zlib
from pathlib import Path

import flax.serialization
import jax
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_checkpoint import assert_same_state, cfg_with, fresh_state, save_steps, state_at  # noqa: E402

from jaxcnn.train import checkpoint as ckpt_lib  # noqa: E402
from jaxcnn.train.checkpoint import RunCheckpointer  # noqa: E402

# TensorStore may finish a failed read's callbacks after Orbax closed its event loop: harmless noise.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def paths_and_bytes(state) -> dict[str, bytes]:
    """'params/Dense_0/kernel' → the leaf's bytes in C order, written out independently of jaxcnn's leaf_names."""
    flat = jax.tree_util.tree_flatten_with_path(flax.serialization.to_state_dict(state))[0]
    return {"/".join(str(k.key) for k in path): np.ascontiguousarray(np.asarray(x)).tobytes() for path, x in flat}


def edit_meta(step_dir: Path, change) -> None:
    path = step_dir / "meta" / "metadata"
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


def restore(workdir, cfg):
    """(state, step, checkpointer) of a fresh RunCheckpointer's restore."""
    ck = RunCheckpointer(workdir, cfg, steps_per_epoch=5)
    state, step = ck.restore(fresh_state())
    ck.close()
    return state, step, ck


def test_every_leaf_is_recorded_by_path_with_the_crc32_of_its_bytes(tmp_path):
    save_steps(tmp_path, cfg_with(), [7])
    meta = json.loads((tmp_path / "checkpoints" / "7" / "meta" / "metadata").read_text())
    assert meta["format"] == 2 and meta["checksums"]["algorithm"] == "crc32"
    want = {name: f"{zlib.crc32(data):08x}" for name, data in paths_and_bytes(state_at(7)).items()}
    assert meta["checksums"]["leaves"] == want


@pytest.mark.parametrize("change, reason", [
    (lambda m: m["checksums"]["leaves"].update({"params/Dense_0/kernel": "00000000"}),
     "the bytes of params/Dense_0/kernel do not match the checksum"),
    (lambda m: m.pop("checksums"), "records no checksums"),
])
def test_a_step_failing_its_checksums_is_moved_aside(tmp_path, capsys, change, reason):
    cfg = cfg_with(keep=3)
    save_steps(tmp_path, cfg, [10, 20])
    edit_meta(tmp_path / "checkpoints" / "20", change)
    state, step, ck = restore(tmp_path, cfg)
    assert step == 10
    assert_same_state(state, state_at(10))
    (warning,) = ck.warnings
    assert "checkpoint at step 20" in warning and reason in warning, warning
    assert (tmp_path / "checkpoints_damaged" / "20").is_dir()


def test_a_step_without_checksums_restores_with_one_warning(tmp_path):
    """A checkpoint written before checksums existed (format 1): restored as it is, said to be unverifiable."""
    cfg = cfg_with()
    save_steps(tmp_path, cfg, [10])

    def format_1(meta):
        meta["format"] = 1
        del meta["checksums"]

    edit_meta(tmp_path / "checkpoints" / "10", format_1)
    state, step, ck = restore(tmp_path, cfg)
    assert step == 10
    assert_same_state(state, state_at(10))
    assert len(ck.warnings) == 1 and "has no checksums" in ck.warnings[0] and "cannot be verified" in ck.warnings[0]


def test_a_damaged_step_gives_jaxcnn_s_warning_alone(tmp_path, capfd):
    cfg = cfg_with()
    save_steps(tmp_path, cfg, [10, 20])
    (tmp_path / "checkpoints" / "20" / "_CHECKPOINT_METADATA").unlink()
    capfd.readouterr()
    ck = RunCheckpointer(tmp_path, cfg, steps_per_epoch=5)
    assert ck.restore(fresh_state())[1] == 10
    ck.close()
    err = capfd.readouterr().err
    assert "warning: checkpoint at step 20" in err and "missing _CHECKPOINT_METADATA" in err
    assert "Metadata file does not exist" not in err and "absl" not in err, err


def test_retention_is_orbax_s_policy_over_the_metrics_recorded_after_each_save(tmp_path):
    """keep=1 and the best by test loss: the policy sees a step's metric once it is recorded, after its save."""
    cfg = cfg_with(keep=1, keep_best_metric="test_loss")
    ck = RunCheckpointer(tmp_path, cfg, steps_per_epoch=5)
    for s, loss in [(1, 0.5), (2, 0.2), (3, 0.4), (4, 0.3)]:
        ck.save_now(state_at(s), s)
        ck.record_metric(s, {"test": {"accuracy": 0.0, "loss": loss}})
    ck.close()
    assert ckpt_lib.list_steps(tmp_path / "checkpoints") == [2, 4]
