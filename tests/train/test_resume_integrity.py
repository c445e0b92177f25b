"""A resume from damaged checkpoints and the logs it leaves, against the same run done in one go.

The uninterrupted run saves steps 6, 12, 18 and 20. Each case takes a copy of it as an interrupted run would have left
it (step 20 and the summary gone, metrics.jsonl logged up to step 20), damages steps, and resumes: the damaged steps
are named, moved aside, the run falls back to the newest good step, and it ends with the uninterrupted run's state
bit for bit and its metrics.jsonl record for record (images/s, a wall-clock figure, left out).
"""

from __future__ import annotations

import json
import shutil
import struct
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_resume import assert_bit_identical, config, leaves_of  # noqa: E402

from jaxcnn.results import writers  # noqa: E402
from jaxcnn.train import checkpoint as ckpt_lib  # noqa: E402

# TensorStore may finish a failed read's callbacks after Orbax closed its event loop: harmless noise.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

RUN = ("train.steps=20", "checkpoint.every_steps=6", "checkpoint.keep=4")  # saves 6, 12, 18 and 20 (epoch end)


@pytest.fixture(scope="module")
def one_go(tmp_path_factory, mnist_dir) -> Path:
    from jaxcnn.train.loop import train

    workdir = tmp_path_factory.mktemp("one_go") / "run"
    train(config(mnist_dir, *RUN), workdir)
    assert ckpt_lib.list_steps(workdir / "checkpoints") == [6, 12, 18, 20]
    return workdir


def interrupted_copy(src: Path, dst: Path) -> Path:
    """The run as a kill after step 20's log and before its checkpoint would leave it."""
    shutil.copytree(src, dst)
    for name in (".lock", "summary.json"):
        (dst / name).unlink(missing_ok=True)
    shutil.rmtree(dst / "checkpoints" / "20")
    return dst


def data_files(step_dir: Path) -> list[Path]:
    return sorted((step_dir / "state" / "ocdbt.process_0" / "d").iterdir())


def flip(path: Path, at: float, mask: int) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= mask
    path.write_bytes(bytes(data))


def flipped_byte(ckpts: Path) -> list[int]:
    flip(max(data_files(ckpts / "18"), key=lambda p: p.stat().st_size), 0.5, 0xFF)
    return [18]


def flipped_bit(ckpts: Path) -> list[int]:
    flip(max(data_files(ckpts / "18"), key=lambda p: p.stat().st_size), 0.3, 0x01)
    return [18]


def swapped_data(ckpts: Path) -> list[int]:
    """Two data files of the same size and different bytes trade places. OCDBT groups these runs' arrays into data
    files of unequal sizes, so when no two files match, two equal-sized blocks of step 18's largest data file trade
    places instead (that usually breaks the zstd framing of the arrays inside: caught when they are read, before
    their checksums are compared)."""
    # Only files of array data: OCDBT also keeps small files of B-tree and version nodes (about 200-600 bytes here),
    # some of which a restore never reads, so trading two of those damages nothing.
    files = [f for s in (18, 12) for f in data_files(ckpts / str(s)) if f.stat().st_size >= 4096]
    pairs = [(a, b) for i, a in enumerate(files) for b in files[i + 1:]
             if a.stat().st_size == b.stat().st_size and a.read_bytes() != b.read_bytes()]
    if pairs:
        a, b = pairs[0]
        tmp = a.with_name("swap")
        a.rename(tmp)
        b.rename(a)
        tmp.rename(b)
        return sorted({int(a.parents[3].name), int(b.parents[3].name)}, reverse=True)
    f = max(data_files(ckpts / "18"), key=lambda p: p.stat().st_size)
    data = bytearray(f.read_bytes())
    n = len(data) // 4
    data[n:2 * n], data[2 * n:3 * n] = data[2 * n:3 * n], data[n:2 * n]
    f.write_bytes(bytes(data))
    return [18]


def nothing(ckpts: Path) -> list[int]:
    return []


def comparable(workdir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in writers.read_jsonl(workdir / "metrics.jsonl")]


def event_steps(path: Path) -> list[tuple[int, str]]:
    """(step, what) of every event in a TensorBoard event file: 'start' for SessionLog.START, else the tags."""
    from tensorboardX.proto import event_pb2

    data, pos, out = path.read_bytes(), 0, []
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        ev = event_pb2.Event()
        ev.ParseFromString(data[pos + 12:pos + 12 + length])
        if ev.HasField("session_log"):
            out.append((ev.step, "start" if ev.session_log.status == ev.session_log.START else "other"))
        out += [(ev.step, v.tag) for v in ev.summary.value]
        pos += 12 + length + 4
    return out


@pytest.mark.slow
@pytest.mark.parametrize("damage", [nothing, flipped_byte, flipped_bit, swapped_data], ids=lambda f: f.__name__)
def test_a_resume_past_damage_ends_as_the_run_done_in_one_go(one_go, tmp_path, mnist_dir, capsys, damage):
    from jaxcnn.train.loop import train

    workdir = interrupted_copy(one_go, tmp_path / "run")
    damaged = damage(workdir / "checkpoints")
    assert max(r["step"] for r in writers.read_jsonl(workdir / "metrics.jsonl")) == 20
    capsys.readouterr()

    summary = train(config(mnist_dir, *RUN), workdir)

    err = capsys.readouterr().err
    good = max(s for s in (6, 12, 18) if s not in damaged)
    assert summary["resumed_from_step"] == good and summary["steps"] == 20
    for step in damaged:
        warning = next(line for line in err.splitlines() if line.startswith(f"warning: checkpoint at step {step} "))
        if damage is not swapped_data:
            assert "do not match the checksum recorded when it was saved" in warning, warning
        assert "moved it to" in warning and "falling back to an older step" in warning
        assert (workdir / "checkpoints_damaged" / str(step)).is_dir()
    assert "Metadata file does not exist" not in err
    assert_bit_identical(leaves_of(one_go, 20), leaves_of(workdir, 20))
    assert comparable(workdir) == comparable(one_go)
    # TensorBoard: the resumed run's event file starts by telling TensorBoard to drop the steps after `good`.
    (new,) = [f for f in (workdir / "tb").iterdir() if f.name.endswith(f".{good}")]
    events = event_steps(new)
    assert (good + 1, "start") in events and min(s for s, _ in events) == good + 1


def test_metrics_jsonl_is_cut_at_the_resumed_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"kind": "train", "step": s, "loss": 1.0 / s} for s in range(1, 6)] + [{"kind": "test", "step": 5}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"kind": "train", "st')  # a torn last line
    writers.MetricsWriter(tmp_path, resume_step=3).close()
    assert writers.read_jsonl(path) == lines[:3]
    assert path.read_text().endswith("\n")
