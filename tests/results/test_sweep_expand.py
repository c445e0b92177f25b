"""Sweep building blocks: grids, zips, products, names, seeds, device pinning, progress (no training)."""

import pytest

from jaxcnn.config import ConfigError
from jaxcnn.results.sweep import (
    SweepProgress,
    chain,
    device_envs,
    expand_sweep,
    format_duration,
    grid,
    named,
    product,
    seeds,
    variant_name,
    zip_,
)


def test_grid_is_every_combination_first_axis_slowest():
    points = grid({"model.pool": ["max", "avg"], "optim.lr": [0.1, 0.01, 0.001]})
    assert points == [
        {"model.pool": "max", "optim.lr": 0.1}, {"model.pool": "max", "optim.lr": 0.01},
        {"model.pool": "max", "optim.lr": 0.001}, {"model.pool": "avg", "optim.lr": 0.1},
        {"model.pool": "avg", "optim.lr": 0.01}, {"model.pool": "avg", "optim.lr": 0.001},
    ]


def test_grid_keyword_form_turns_double_underscore_into_dots():
    assert grid(model__pool=["max", "l2"]) == [{"model.pool": "max"}, {"model.pool": "l2"}]


@pytest.mark.parametrize("bad", [{"model.pool": "max"}, {"model.pool": []}, {"model.pool": 3}])
def test_grid_rejects_an_axis_that_is_not_a_list_of_values(bad):
    with pytest.raises(ConfigError, match="model.pool"):
        grid(bad)


def test_zip_pairs_values_position_by_position():
    points = zip_({"model.name": ["plain20", "resnet20"], "optim.lr": [0.05, 0.1]})
    assert points == [{"model.name": "plain20", "optim.lr": 0.05}, {"model.name": "resnet20", "optim.lr": 0.1}]


def test_zip_rejects_axes_of_different_lengths():
    with pytest.raises(ConfigError, match="same number of values"):
        zip_({"model.name": ["a", "b"], "optim.lr": [0.1]})


def test_product_with_seeds_merges_every_pair():
    points = product(zip_(model__kernel_size=[3, 5]), seeds(3))
    assert len(points) == 6
    assert points[0] == {"model.kernel_size": 3, "seed": 0}
    assert points[5] == {"model.kernel_size": 5, "seed": 2}
    assert product(grid(a=[1]), grid(b=[2]), grid(c=[3, 4])) == [{"a": 1, "b": 2, "c": 3}, {"a": 1, "b": 2, "c": 4}]


def test_product_refuses_a_key_varied_twice():
    with pytest.raises(ConfigError, match="optim.lr"):
        product(grid({"optim.lr": [0.1]}), grid({"optim.lr": [0.2]}))


def test_seeds_from_count_or_list():
    assert seeds(2) == [{"seed": 0}, {"seed": 1}]
    assert seeds([7, 11]) == [{"seed": 7}, {"seed": 11}]
    with pytest.raises(ConfigError):
        seeds(0)


def test_chain_and_named_variants():
    points = chain(named("mlp-matched", {"model.name": "mlp"}, model__hidden=[64]), grid(model__name=["lenet5"]))
    assert points == [{"_name": "mlp-matched", "model.name": "mlp", "model.hidden": [64]}, {"model.name": "lenet5"}]


def test_variant_names_are_readable_and_folder_safe():
    assert variant_name({"model.pool": "avg"}) == "model.pool=avg"
    assert variant_name({"model.norm": "none", "optim.lr": 0.1}) == "model.norm=none,optim.lr=0.1"
    assert variant_name({"data.flip": True, "x": None, "k": (3, 5), "s": 1e-05}) == "data.flip=true,x=none,k=3-5,s=1e-05"
    assert variant_name({"transfer.init_from": "runs/a b"}) == "transfer.init_from=runs_a_b"
    assert variant_name({}) == "base"


def test_expand_separates_the_seed_and_uses_the_default_seed():
    runs = expand_sweep(product(grid(model__pool=["max", "avg"]), seeds([0, 1])) + [{"model.pool": "l2"}],
                        default_seed=5)
    assert [(r.variant, r.seed) for r in runs] == [
        ("model.pool=max", 0), ("model.pool=max", 1), ("model.pool=avg", 0), ("model.pool=avg", 1),
        ("model.pool=l2", 5),
    ]
    assert runs[2].updates == (("model.pool", "avg"),)
    assert runs[2].relpath == "model.pool=avg/seed=0"


def test_expand_uses_the_given_name_and_rejects_duplicates():
    runs = expand_sweep(product(named("small", {"model.width": 8}), seeds(2)))
    assert [r.relpath for r in runs] == ["small/seed=0", "small/seed=1"]
    assert dict(runs[0].updates) == {"model.width": 8}
    with pytest.raises(ConfigError, match="appears twice"):
        expand_sweep([{"model.pool": "max"}, {"model.pool": "max"}])
    with pytest.raises(ConfigError, match="two different variants"):
        expand_sweep(named("x", {"model.width": 8}) + named("x", {"model.width": 16}))


def test_cpu_runs_get_one_host_device_each_and_other_flags_survive():
    envs = device_envs(3, "cpu", 8, base_env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_foo=1",
                                              "PATH": "/bin"})
    assert len(envs) == 3
    for env in envs:
        assert env["JAX_PLATFORMS"] == "cpu"
        assert env["XLA_FLAGS"].split() == ["--xla_foo=1", "--xla_force_host_platform_device_count=1"]
        assert env["PATH"] == "/bin"


def test_gpu_runs_split_the_visible_gpus():
    envs = device_envs(2, "gpu", 4, base_env={})
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0,1", "2,3"]
    # An existing CUDA_VISIBLE_DEVICES list is split (its entries are what the runs may use).
    envs = device_envs(2, "gpu", 2, base_env={"CUDA_VISIBLE_DEVICES": "5,7"})
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["5", "7"]
    with pytest.raises(ValueError, match="only 2"):
        device_envs(3, "gpu", 2, base_env={})


def test_tpu_runs_get_one_chip_and_port_each():
    envs = device_envs(2, "tpu", 4, base_env={})
    assert [e["TPU_VISIBLE_CHIPS"] for e in envs] == ["0", "1"]
    assert envs[0]["TPU_PROCESS_PORT"] != envs[1]["TPU_PROCESS_PORT"]


def test_sweep_eta_from_finished_runs():
    p = SweepProgress("x", total=6, parallel_runs=2)
    p.skipped = 1
    assert "ETA ?" in p.line()  # nothing finished in this session yet
    p.finished(True, 10.0)
    p.finished(False, 20.0)  # mean 15 s per run
    # 6 - 1 skipped - 2 finished = 3 left, one of them running for 5 s: (2 * 15 + 10) / 2 parallel = 20 s.
    assert p.eta(running_elapsed=[5.0]) == pytest.approx(20.0)
    assert "3/6 runs finished (1 already done, 1 failed)" in p.line()
    assert format_duration(20.0) == "20s" and format_duration(125) == "2m05s" and format_duration(3720) == "1h02m"
