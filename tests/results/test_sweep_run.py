"""Sweeps over an experiment file: --set on top of the variants, skip/resume/retry, failures recorded (fake training)."""

import json
import textwrap

import pytest

from jaxcnn.config import ConfigError, config_to_dict
from jaxcnn.results.sweep import plan_sweep, run_sweep

EXPERIMENT = textwrap.dedent('''
    """A tiny pooling sweep for the tests."""
    from jaxcnn.config import Config, DataConfig, TrainConfig
    from jaxcnn.results.sweep import grid, product, seeds


    def get_config():
        return Config(model={"name": "lenet5"}, data=DataConfig(name="mnist", train_limit=512, batch_size=64),
                      train=TrainConfig(steps=4, progress=False), seed=0)


    def sweep():
        return product(grid({"model.pool": ["max", "avg"]}), seeds(2))
''')


@pytest.fixture
def experiment(tmp_path):
    path = tmp_path / "tiny_pooling.py"
    path.write_text(EXPERIMENT)
    return path


def test_plan_applies_each_variant_on_top_of_the_experiment(experiment):
    plan = plan_sweep(experiment)
    assert [r.relpath for r, _ in plan] == ["model.pool=max/seed=0", "model.pool=max/seed=1",
                                            "model.pool=avg/seed=0", "model.pool=avg/seed=1"]
    for run, cfg in plan:
        assert cfg.model["pool"] == dict(run.updates)["model.pool"] and cfg.seed == run.seed
        assert cfg.data.train_limit == 512 and cfg.train.steps == 4


def test_set_of_a_key_the_sweep_does_not_vary_applies_to_every_run(experiment):
    plan = plan_sweep(experiment, ["optim.lr=0.01", "data.batch_size=32"])
    assert len(plan) == 4
    assert all(cfg.optim.lr == 0.01 and cfg.data.batch_size == 32 for _, cfg in plan)
    assert {cfg.model["pool"] for _, cfg in plan} == {"max", "avg"}


def test_set_of_a_swept_key_narrows_the_sweep(experiment):
    plan = plan_sweep(experiment, ["model.pool=avg"])
    assert [r.relpath for r, _ in plan] == ["model.pool=avg/seed=0", "model.pool=avg/seed=1"]
    plan = plan_sweep(experiment, ["seed=1", "optim.lr=0.2"])
    assert [r.relpath for r, _ in plan] == ["model.pool=max/seed=1", "model.pool=avg/seed=1"]
    assert all(cfg.optim.lr == 0.2 for _, cfg in plan)
    with pytest.raises(ConfigError, match="leaves no run"):
        plan_sweep(experiment, ["model.pool=l2"])


def test_an_experiment_without_sweep_is_one_run(tmp_path):
    path = tmp_path / "single.py"
    path.write_text(EXPERIMENT.split("def sweep")[0])
    plan = plan_sweep(path, ["seed=3"])
    assert [r.relpath for r, _ in plan] == ["base/seed=3"]


class FakeTrain:
    """Stands in for jaxcnn.train.loop.train: records the calls, fails or is interrupted where told."""

    def __init__(self, fail=(), interrupt=()):
        self.calls, self.fail, self.interrupt = [], set(fail), set(interrupt)

    def __call__(self, cfg, run_dir):
        key = (cfg.model["pool"], cfg.seed)
        self.calls.append(key)
        if key in self.interrupt:
            raise KeyboardInterrupt
        if key in self.fail:
            raise ValueError(f"pool {key[0]} cannot run (seed {key[1]})")
        summary = {"test_accuracy": 0.9 + 0.01 * cfg.seed, "test_loss": 0.3, "params": 61706, "wall_s": 1.0}
        (run_dir / "config.json").write_text(json.dumps(config_to_dict(cfg)))
        (run_dir / "summary.json").write_text(json.dumps(summary))
        return summary


def _status(workdir, rel):
    return json.loads((workdir / rel / "status.json").read_text())


def test_interrupted_sweep_reruns_skip_finished_resume_interrupted_and_record_failures(experiment, tmp_path):
    workdir = tmp_path / "runs"
    first = FakeTrain(interrupt={("max", 1)})
    with pytest.raises(KeyboardInterrupt):
        run_sweep(experiment, workdir=workdir, train_fn=first, report=False)
    assert first.calls == [("max", 0), ("max", 1)]
    assert _status(workdir, "model.pool=max/seed=1")["status"] == "interrupted"

    second = FakeTrain(fail={("avg", 0)})
    failed = run_sweep(experiment, workdir=workdir, train_fn=second, report=False)
    assert second.calls == [("max", 1), ("avg", 0), ("avg", 1)]  # max/seed=0 had finished: skipped
    assert failed == ["model.pool=avg/seed=0"]
    status = _status(workdir, "model.pool=avg/seed=0")
    assert status["status"] == "failed" and "pool avg cannot run" in status["error"]
    assert "Traceback" in (workdir / "model.pool=avg/seed=0/error.txt").read_text()
    assert (workdir / "model.pool=avg/seed=1/summary.json").is_file()  # the failure did not stop the others

    third = FakeTrain()
    assert run_sweep(experiment, workdir=workdir, train_fn=third, report=False) == []
    assert third.calls == [("avg", 0)]  # only the failed run is retried
    assert _status(workdir, "model.pool=avg/seed=0")["status"] == "done"
    assert not (workdir / "model.pool=avg/seed=0/error.txt").exists()
    assert _status(workdir, "model.pool=avg/seed=0")["attempt"] == 2

    spec = json.loads((workdir / "model.pool=avg/seed=1/variant.json").read_text())
    assert spec["variant"] == "model.pool=avg" and spec["seed"] == 1 and spec["updates"] == {"model.pool": "avg"}
    assert spec["config"]["model"]["pool"] == "avg" and spec["config"]["seed"] == 1
    sweep = json.loads((workdir / "sweep.json").read_text())
    assert [r["dir"] for r in sweep["runs"]] == ["model.pool=max/seed=0", "model.pool=max/seed=1",
                                                 "model.pool=avg/seed=0", "model.pool=avg/seed=1"]


def test_sweep_report_lists_the_failed_run(experiment, tmp_path):
    workdir = tmp_path / "runs"
    run_sweep(experiment, workdir=workdir, train_fn=FakeTrain(fail={("avg", 1)}), report=False)
    from jaxcnn.results.report import build_report

    md = build_report(workdir, flops=False)["markdown"].read_text()
    assert "| model.pool=max | 2 | 90.50 ± 0.71 |" in md  # 0.90 and 0.91: sample std 0.00707
    assert "| model.pool=avg | 1 (1 failed) |" in md
    assert "`model.pool=avg/seed=1`: ValueError: pool avg cannot run (seed 1)" in md


def test_finished_runs_made_with_another_config_stop_the_sweep(experiment, tmp_path):
    workdir = tmp_path / "runs"
    run_sweep(experiment, workdir=workdir, train_fn=FakeTrain(), report=False)
    with pytest.raises(ConfigError, match=r"(?s)4 finished run\(s\).*optim.lr 0.1 then, 0.2 now.*new --workdir"):
        run_sweep(experiment, ["optim.lr=0.2"], workdir=workdir, train_fn=FakeTrain(), report=False)
    # Keys that do not change a result (console progress, logging) may differ: the runs are still skipped.
    again = FakeTrain()
    assert run_sweep(experiment, ["train.progress=true", "train.log_every_steps=7"], workdir=workdir,
                     train_fn=again, report=False) == []
    assert again.calls == []
