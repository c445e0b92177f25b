"""The experiment suite: every sweep plans with valid knobs, every docstring says how to run it and what to expect;
visualize_filters trains a few steps and writes its pictures."""

import importlib.util
from pathlib import Path

import pytest
from PIL import Image

from jaxcnn.config import load_experiment_module
from jaxcnn.results.sweep import plan_sweep

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
SUITE = ["mlp_vs_cnn", "ablate_pooling", "ablate_batchnorm", "depth_residual", "preact_vs_postact", "kernel_size",
         "bottleneck_groups", "gap_vs_flatten", "augmentation", "visualize_filters", "cifar10_resnet_he",
         "cifar10_airbench"]


@pytest.mark.parametrize("name", SUITE)
def test_experiment_plans_and_documents_itself(name):
    path = EXPERIMENTS / f"{name}.py"
    doc = load_experiment_module(path).__doc__
    for field in ("Command:", "Question:", "Runtime:", "Expected:"):
        assert field in doc, f"{name}: docstring lacks {field}"
    assert "EXPECTED_" not in doc
    plan = plan_sweep(path)
    assert plan and all(cfg.model["name"] for _, cfg in plan)
    assert len({r.relpath for r, _ in plan}) == len(plan)
    if not name.startswith("cifar10"):
        assert {cfg.data.name for _, cfg in plan} <= {"mnist", "fashion_mnist"}  # the offline datasets


def test_cifar_reproduction_keeps_the_papers_recipe():
    plan = dict((r.variant, cfg) for r, cfg in plan_sweep(EXPERIMENTS / "cifar10_resnet_he.py"))
    assert list(plan) == ["resnet20", "resnet56", "resnet110"]
    cfg = plan["resnet20"]
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay, cfg.data.batch_size) == (0.1, 0.9, 1e-4, 128)
    assert cfg.train.steps == 64000
    assert [round(e * 390) for e in cfg.schedule.decay_epochs] == [32000, 48000]
    assert (cfg.data.crop_padding, cfg.data.flip) == (4, "random")


@pytest.mark.slow
def test_visualize_filters_writes_its_pictures(tmp_path, mnist_dir):
    spec = importlib.util.spec_from_file_location("visualize_filters", EXPERIMENTS / "visualize_filters.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    workdir = tmp_path / "vis"
    overrides = [f"data.data_dir={mnist_dir}", "data.train_limit=256", "data.test_limit=500", "data.batch_size=64",
                 "train.steps=3", "schedule.warmup_epochs=0", "train.progress=false"]
    argv = ["--workdir", str(workdir), "--num-images", "2"]
    for o in overrides:
        argv += ["--set", o]
    assert module.main(argv) == 0
    for name in ("filters.png", "feature_maps.png", "fixed_filters.png"):
        with Image.open(workdir / name) as im:
            assert im.format == "PNG"
            im.verify()
