"""The benchmark scripts still run: a tiny MLP / LeNet-5 for two steps (figures are not checked, only the output)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_script(*args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, the scripts' own flags
    result = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_train_throughput_prints_compile_time_and_images_per_second():
    out = run_script("benchmarks/train_throughput.py", "--model", "lenet5", "--batch", "8", "--steps", "2",
                     "--rounds", "2", "--warmup", "1")
    assert "lenet5: 61,706 parameters" in out and "compile" in out and "images/s (median of 2 rounds" in out


@pytest.mark.slow
def test_vs_pytorch_prints_both_sides_or_says_pytorch_is_missing():
    out = run_script("benchmarks/vs_pytorch.py", "--models", "mlp,lenet5", "--batch", "8", "--steps", "2",
                     "--rounds", "2", "--warmup", "1")
    assert out.count("jaxcnn") >= 2
    try:
        import torch  # noqa: F401
    except ImportError:
        assert "PyTorch: unavailable" in out
    else:
        assert "ratio" in out and "PARAMETER COUNTS DIFFER" not in out


def test_torch_twins_have_jaxcnn_parameter_counts():
    torch = pytest.importorskip("torch")  # noqa: F841
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from torch_models import make_torch_model, param_count
    finally:
        sys.path.pop(0)
    import jax

    from jaxcnn.models import create_model
    from jaxcnn.train.state import init_variables, param_count as jax_param_count

    for name, registry_name, knobs, shape in [
        ("resnet20", "resnet20", {}, (1, 32, 32, 3)),
        ("lenet5", "lenet5", {}, (1, 28, 28, 1)),
        ("mlp", "mlp", {}, (1, 28, 28, 1)),
        ("vgg11", "vgg11_bn", {"head": "gap", "head_hidden": (), "dropout": 0.0}, (1, 32, 32, 3)),
    ]:
        model = create_model(registry_name, num_classes=10, **knobs)
        expected = jax_param_count(jax.eval_shape(lambda: init_variables(model, shape, 0))["params"])
        assert param_count(make_torch_model(name)) == expected, name
