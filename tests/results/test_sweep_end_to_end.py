"""A tiny real sweep on an MNIST slice: 2 variants x 2 seeds trained, skipped on rerun, reported; and --parallel."""

import csv
import json
import textwrap

import pytest
from PIL import Image

from jaxcnn import cli
from jaxcnn.results.sweep import run_sweep
from jaxcnn.train.loop import train

EXPERIMENT = textwrap.dedent('''
    """Tiny LeNet-5 pooling sweep on 512 MNIST images."""
    from jaxcnn.config import Config, DataConfig, OptimConfig, ScheduleConfig, TrainConfig
    from jaxcnn.results.sweep import grid, product, seeds


    def get_config():
        return Config(
            model={{"name": "lenet5"}},
            data=DataConfig(name="mnist", data_dir={data_dir!r}, train_limit=512, test_limit=500, batch_size=64,
                            eval_batch_size=250),
            optim=OptimConfig(name="sgd", lr=0.05, momentum=0.9),
            schedule=ScheduleConfig(name="constant"),
            train=TrainConfig(steps=6, log_every_steps=3, progress=False),
        )


    def sweep():
        return product(grid({{"model.pool": {pools!r}}}), seeds(2))
''')


def _write_experiment(tmp_path, mnist_dir, pools):
    path = tmp_path / "tiny_sweep.py"
    path.write_text(EXPERIMENT.format(data_dir=str(mnist_dir), pools=pools))
    return path


def _png_ok(path):
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.verify()


@pytest.mark.slow
def test_tiny_sweep_trains_every_run_skips_them_on_rerun_and_reports(tmp_path, mnist_dir):
    experiment = _write_experiment(tmp_path, mnist_dir, ["max", "avg"])
    workdir = tmp_path / "runs"
    assert run_sweep(experiment, workdir=workdir, train_fn=train) == []
    dirs = ["model.pool=max/seed=0", "model.pool=max/seed=1", "model.pool=avg/seed=0", "model.pool=avg/seed=1"]
    summaries = {}
    for d in dirs:
        summary = json.loads((workdir / d / "summary.json").read_text())
        config = json.loads((workdir / d / "config.json").read_text())
        assert summary["steps"] == 6 and summary["test_count"] == 500
        assert config["model"]["pool"] == d.split("=")[1].split("/")[0] and config["seed"] == int(d[-1])
        summaries[d] = summary
    # Different seeds give different networks.
    assert summaries[dirs[0]]["test_loss"] != summaries[dirs[1]]["test_loss"]

    with open(workdir / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["variant"], r["seed"], r["status"]) for r in rows] == [
        ("model.pool=max", "0", "done"), ("model.pool=max", "1", "done"),
        ("model.pool=avg", "0", "done"), ("model.pool=avg", "1", "done"),
    ]
    # LeNet-5 multiply-adds on a 32x32 (padded) image, by hand: conv1 28*28*6*25 + conv2 10*10*16*150
    # + fc 400*120 + 120*84 + 84*10 = 416,520; FLOPs = 2 x MACs.
    lenet5_flops = 2 * (28 * 28 * 6 * 25 + 10 * 10 * 16 * 150 + 400 * 120 + 120 * 84 + 84 * 10)
    for r, d in zip(rows, dirs):
        assert float(r["test_accuracy"]) == pytest.approx(summaries[d]["test_accuracy"])
        assert int(r["params"]) == 61706 and r["model.pool"] == d.split("=")[1].split("/")[0]
        assert int(r["flops"]) == lenet5_flops
    md = (workdir / "results.md").read_text()
    assert "| model.pool=max | 2 |" in md and "| model.pool=avg | 2 |" in md
    _png_ok(workdir / "accuracy.png")
    _png_ok(workdir / "curves.png")

    # A rerun finds every run finished and trains nothing.
    mtimes = {d: (workdir / d / "summary.json").stat().st_mtime_ns for d in dirs}
    assert cli.main(["sweep", str(experiment), "--workdir", str(workdir)]) == 0
    assert {d: (workdir / d / "summary.json").stat().st_mtime_ns for d in dirs} == mtimes

    # A run killed after its last checkpoint but before its summary is resumed through the normal train path
    # (from the checkpoint at step 6: nothing left to train), the others stay as they are.
    (workdir / dirs[2] / "summary.json").unlink()
    assert run_sweep(experiment, workdir=workdir, report=False, train_fn=train) == []
    resumed = json.loads((workdir / dirs[2] / "summary.json").read_text())
    assert resumed["resumed_from_step"] == 6 and resumed["steps"] == 6
    assert resumed["test_accuracy"] == pytest.approx(summaries[dirs[2]]["test_accuracy"])
    assert {d: (workdir / d / "summary.json").stat().st_mtime_ns for d in dirs if d != dirs[2]} == {
        d: t for d, t in mtimes.items() if d != dirs[2]}


@pytest.mark.slow
@pytest.mark.multiprocess
def test_parallel_sweep_runs_each_seed_in_its_own_single_device_process(tmp_path, mnist_dir):
    experiment = _write_experiment(tmp_path, mnist_dir, ["max"])
    workdir = tmp_path / "runs"
    assert run_sweep(experiment, workdir=workdir, parallel_runs=2, report=False, train_fn=train) == []
    pids = set()
    for seed in (0, 1):
        run = workdir / f"model.pool=max/seed={seed}"
        summary = json.loads((run / "summary.json").read_text())
        assert summary["device_count"] == 1  # pinned: one host device, not the eight this test process has
        assert "done: test accuracy" in (run / "log.txt").read_text()
        status = json.loads((run / "status.json").read_text())
        assert status["status"] == "done"
        pids.add(status.get("pid"))
    assert len(pids) == 2  # two separate processes
