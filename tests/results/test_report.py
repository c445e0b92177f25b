"""Aggregation (mean ± sample std over seeds), results.csv / results.md and plots rebuilt from fake run folders."""

import csv
import json
import math
import statistics

import pytest
from PIL import Image

from jaxcnn import cli
from jaxcnn.results.report import (aggregate, build_report, collect_runs, difference_interval, format_difference,
                                  learning_curve, mean_std, varied_keys)


def _row(variant, seed, acc, status="done", loss=0.3, ips=100.0, wall=10.0, params=1000):
    return {"variant": variant, "seed": seed, "status": status, "test_accuracy": acc, "test_loss": loss,
            "train_images_per_s": ips, "wall_s": wall, "params": params, "flops": None}


def test_mean_and_sample_std_match_hand_computed_values():
    # deviations -0.02, 0, +0.02: sum of squares 0.0008, over n - 1 = 2 → variance 0.0004 → std 0.02
    mean, std, n = mean_std([0.90, 0.92, 0.94])
    assert (mean, n) == (pytest.approx(0.92), 3)
    assert std == pytest.approx(0.02)
    data = [0.9731, 0.9755, 0.9702, 0.9749]
    assert mean_std(data)[1] == pytest.approx(statistics.stdev(data))  # the stdlib's sample std
    assert math.isnan(mean_std([0.5])[1]) and mean_std([0.5])[2] == 1
    assert mean_std([None, float("nan")])[2] == 0


def test_difference_interval_matches_welch_by_hand():
    # Equal spreads: s^2 = 2.5 each, n = 5: se = sqrt(0.5 + 0.5) = 1, Welch dof = 1 / (2 * 0.25 / 4) = 8;
    # t(0.975, 8) = 2.306004 (printed t tables).
    diff, low, high = difference_interval([1, 2, 3, 4, 5], [0, 1, 2, 3, 4])
    assert diff == pytest.approx(1.0)
    assert (low, high) == (pytest.approx(1 - 2.306004, abs=1e-6), pytest.approx(1 + 2.306004, abs=1e-6))
    # Unequal spreads: [1, 3] has s^2 = 2 (v = 1), the baseline none: dof = 1, t(0.975, 1) = 12.7062.
    diff, low, high = difference_interval([1, 3], [0, 0, 0, 0])
    assert (diff, low, high) == (pytest.approx(2.0), pytest.approx(2 - 12.7062, abs=1e-4),
                                 pytest.approx(2 + 12.7062, abs=1e-4))
    # One seed: a difference without an interval; no seeds: nothing.
    diff, low, high = difference_interval([0.9], [0.8, 0.85])
    assert diff == pytest.approx(0.075) and math.isnan(low) and math.isnan(high)
    assert math.isnan(difference_interval([], [0.8, 0.85])[0])
    assert format_difference(0.0123, 0.004, 0.0206, scale=100) == "+1.23 [+0.40, +2.06]"
    assert format_difference(-0.01, float("nan"), float("nan"), scale=100) == "-1.00 [–]"


def test_aggregate_groups_by_variant_over_finished_seeds_only():
    rows = [
        _row("model.pool=max", 0, 0.90, wall=10.0), _row("model.pool=max", 1, 0.92, wall=12.0),
        _row("model.pool=max", 2, 0.94, wall=14.0), _row("model.pool=avg", 0, 0.80),
        _row("model.pool=avg", 1, None, status="failed"), _row("model.pool=avg", 2, 0.70),
        _row("model.pool=l2", 0, None, status="incomplete"),
    ]
    agg = {a["variant"]: a for a in aggregate(rows)}
    assert list(agg) == ["model.pool=max", "model.pool=avg", "model.pool=l2"]  # sweep order kept
    mx = agg["model.pool=max"]
    assert mx["n"] == 3 and mx["failed"] == 0 and mx["seeds"] == [0, 1, 2]
    assert mx["test_accuracy_mean"] == pytest.approx(0.92) and mx["test_accuracy_std"] == pytest.approx(0.02)
    assert mx["wall_s_mean"] == pytest.approx(12.0) and mx["wall_s_std"] == pytest.approx(2.0)
    avg = agg["model.pool=avg"]
    assert avg["n"] == 2 and avg["failed"] == 1
    assert avg["test_accuracy_mean"] == pytest.approx(0.75)
    assert avg["test_accuracy_std"] == pytest.approx(math.sqrt(2 * 0.05**2))  # two values ±0.05 around the mean
    l2 = agg["model.pool=l2"]
    assert l2["n"] == 0 and l2["incomplete"] == 1 and math.isnan(l2["test_accuracy_mean"])


def _fake_run(root, variant, seed, updates, acc=None, failed=None, steps=(50, 100), config_extra=None):
    """A run folder as a sweep leaves it (acc=None and failed=None: interrupted before the end)."""
    run = root / variant / f"seed={seed}"
    run.mkdir(parents=True)
    config = {"model": {"name": "lenet5", "pool": "max", **{k[6:]: v for k, v in updates.items()
                                                            if k.startswith("model.")}},
              "data": {"name": "mnist", "train_limit": 512, "batch_size": 64}, "optim": {"name": "sgd", "lr": 0.1},
              "train": {"epochs": 2.0, "steps": None}, "seed": seed, "name": "fake", **(config_extra or {})}
    (run / "variant.json").write_text(json.dumps({"variant": variant, "seed": seed, "updates": updates,
                                                  "config": config}))
    (run / "config.json").write_text(json.dumps(config))
    with open(run / "metrics.jsonl", "w") as f:
        for i, step in enumerate(steps):
            epoch = step / 50
            f.write(json.dumps({"kind": "train", "step": step, "loss": 1.0 / (i + 1 + seed), "accuracy": 0.5,
                                "epoch": epoch}) + "\n")
            f.write(json.dumps({"kind": "test", "step": step, "loss": 0.5, "accuracy": 0.5 + 0.1 * i,
                                "count": 100}) + "\n")
    if acc is not None:
        (run / "summary.json").write_text(json.dumps({
            "test_accuracy": acc, "test_loss": 1 - acc, "params": 61706, "steps": steps[-1], "epochs": 2.0,
            "wall_s": 10.0 + seed, "train_images_per_s": 500.0, "jax_version": "0.x", "devices": ["cpu"],
            "device_count": 1}))
        (run / "status.json").write_text(json.dumps({"status": "done"}))
    elif failed is not None:
        (run / "status.json").write_text(json.dumps({"status": "failed", "error": failed}))
        (run / "error.txt").write_text("Traceback ...\n" + failed + "\n")
    else:
        (run / "status.json").write_text(json.dumps({"status": "running"}))
    return run


@pytest.fixture
def fake_sweep(tmp_path):
    root = tmp_path / "sweep"
    for seed, acc in enumerate([0.90, 0.92, 0.94]):
        _fake_run(root, "model.pool=max", seed, {"model.pool": "max"}, acc=acc)
    _fake_run(root, "model.pool=avg", 0, {"model.pool": "avg"}, acc=0.80)
    _fake_run(root, "model.pool=avg", 1, {"model.pool": "avg"}, failed="ValueError: data.batch_size=999 too large")
    _fake_run(root, "model.pool=avg", 2, {"model.pool": "avg"})
    # The sweep's own order (max before avg), which the tables keep.
    dirs = [f"model.pool={p}/seed={s}" for p in ("max", "avg") for s in range(3)]
    (root / "sweep.json").write_text(json.dumps({"experiment": "experiments/fake.py", "runs": [{"dir": d} for d in dirs]}))
    return root


def _assert_png(path, min_size=100):
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.verify()
    with Image.open(path) as im:
        assert im.size[0] >= min_size and im.size[1] >= min_size


def test_report_rebuilt_from_run_folders(fake_sweep):
    paths = build_report(fake_sweep, flops=False)
    with open(paths["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6
    assert rows[0]["variant"] == "model.pool=max" and rows[0]["seed"] == "0" and rows[0]["model.pool"] == "max"
    assert float(rows[1]["test_accuracy"]) == pytest.approx(0.92)
    assert rows[1]["status"] == "done" and rows[1]["params"] == "61706"
    by_seed = {r["seed"]: r for r in rows if r["variant"] == "model.pool=avg"}
    assert by_seed["1"]["status"] == "failed" and "batch_size=999" in by_seed["1"]["error"]
    assert by_seed["2"]["status"] == "incomplete" and by_seed["2"]["test_accuracy"] == ""
    md = paths["markdown"].read_text()
    assert "| model.pool=max | 3 | 92.00 ± 2.00 | baseline |" in md
    assert "| model.pool=avg | 1 (1 failed) | 80.00 ± – | -12.00 [–] |" in md
    assert "minus model.pool=max's (the baseline)" in md
    assert "61,706" in md and "ddof=1" in md
    assert md.startswith("# fake: results")
    assert "4 of 6 runs finished, 1 failed, 1 not finished" in md
    assert "data.name=mnist" in md and "model.name=lenet5" in md
    _assert_png(paths["accuracy_plot"])
    _assert_png(paths["curves_plot"])


def test_report_command_line(fake_sweep):
    assert cli.main(["report", str(fake_sweep)]) == 0
    assert (fake_sweep / "results.md").is_file() and (fake_sweep / "curves.png").is_file()


def test_report_without_runs_says_what_it_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="no runs"):
        build_report(tmp_path, flops=False)


def test_varied_keys_without_variant_json_come_from_config_differences(tmp_path):
    for pool in ("max", "avg"):
        run = _fake_run(tmp_path, f"pool-{pool}", 0, {"model.pool": pool}, acc=0.9)
        (run / "variant.json").unlink()
    records = collect_runs(tmp_path)
    assert [r["variant"] for r in records] == ["pool-avg", "pool-max"]
    assert varied_keys(records) == ["model.pool"]


def test_learning_curve_keeps_the_last_record_of_a_step_logged_twice(tmp_path):
    run = _fake_run(tmp_path, "v", 0, {}, acc=0.9, steps=(50, 100))
    with open(run / "metrics.jsonl", "a") as f:  # a resumed run logs step 100 again
        f.write(json.dumps({"kind": "train", "step": 100, "loss": 0.25, "epoch": 2.0}) + "\n")
        f.write('{"kind": "test", "step": 1')  # torn last line of a killed run
    curve = learning_curve(run)
    assert curve["train_epoch"] == [1.0, 2.0] and curve["train_loss"] == [1.0, 0.25]
    assert curve["test_epoch"] == [1.0, 2.0] and curve["test_accuracy"] == pytest.approx([0.5, 0.6])
