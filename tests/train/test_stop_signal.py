"""A stop signal ends the run after the compiled call that is running, and the call's length is capped by time.

The reference for the stopped-and-resumed run is the same run done in one go with other call lengths: the number of
steps per call must not change a bit of the result.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_resume import assert_bit_identical, config, leaves_of  # noqa: E402

from jaxcnn.results import writers  # noqa: E402
from jaxcnn.train import checkpoint as ckpt_lib  # noqa: E402

# 60 steps in one epoch, no log, checkpoint or evaluation point before the end: the old rule (stop at the next such
# point) would have stopped at step 60.
RUN = ("data.train_limit=1920", "train.steps=60", "train.log_every_steps=1000", "checkpoint.every_epoch=false")


@pytest.mark.slow
def test_sigterm_stops_after_the_running_call_and_the_resume_is_exact(tmp_path, mnist_dir, monkeypatch):
    from jaxcnn.train import loop

    loop.train(config(mnist_dir, *RUN), tmp_path / "one_go")  # calls of up to 5 s: a few calls in all

    calls: list[int] = []
    timed_call = loop.ThroughputTimer.call

    @contextlib.contextmanager
    def signal_in_the_fourth_call(self, steps):
        with timed_call(self, steps):
            calls.append(steps)
            if len(calls) == 4:
                signal.raise_signal(signal.SIGTERM)  # arrives as the fourth call starts
            yield

    monkeypatch.setattr(loop.ThroughputTimer, "call", signal_in_the_fourth_call)
    workdir = tmp_path / "stopped"
    with pytest.raises(SystemExit) as e:
        loop.train(config(mnist_dir, *RUN, "train.max_seconds_per_call=0.2"), workdir)
    assert e.value.code == 128 + signal.SIGTERM
    stop = sum(calls)
    assert len(calls) == 4 and calls[:2] == [1, 1] and stop < 60  # the first call compiles, the second measures
    assert ckpt_lib.list_steps(workdir / "checkpoints") == [stop]
    assert [r["step"] for r in writers.read_jsonl(workdir / "metrics.jsonl") if r["kind"] == "train"] == [stop]

    monkeypatch.setattr(loop.ThroughputTimer, "call", timed_call)
    summary = loop.train(config(mnist_dir, *RUN, "train.max_seconds_per_call=0.2"), workdir)
    assert summary["resumed_from_step"] == stop and summary["steps"] == 60
    assert_bit_identical(leaves_of(tmp_path / "one_go", 60), leaves_of(workdir, 60))


def test_the_time_budget_caps_the_steps_of_later_calls(monkeypatch):
    from jaxcnn.train import loop

    clock = iter([0.0, 30.0, 100.0, 100.5, 200.0, 200.5, 300.0, 305.0])  # perf_counter at each call's start and end
    monkeypatch.setattr(loop.time, "perf_counter", lambda: next(clock))
    timer = loop.ThroughputTimer(batch_size=10, max_seconds=2.0)
    caps = []
    for steps in (1, 1, 8, 80):
        caps.append(timer.max_steps())
        with timer.call(steps):
            pass
    assert caps == [1, 1, 4, 32]  # compiling (30 s, left out); 0.5 s per step; 1/16 s per step
    assert timer.max_steps() == 32  # 80 steps in 5 s
    assert timer.train_s == pytest.approx(6.0) and timer.images == 890
    assert timer.interval_images_per_s() == pytest.approx(890 / 6.0) and timer.interval_images_per_s() is None
