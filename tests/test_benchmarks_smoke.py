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
                     "--rounds", "2", "--warmup", "1", "--dtype", "float32,bfloat16",
                     "--torch-configs", "eager,channels_last")
    jax_lines = [line.split() for line in out.splitlines() if line.split()[2:3] == ["jaxcnn"]]
    expected = {(m, d) for m in ("mlp", "lenet5") for d in ("float32", "bfloat16")}
    assert {(row[0], row[1]) for row in jax_lines} == expected
    try:
        import torch  # noqa: F401
    except ImportError:
        assert "PyTorch: unavailable" in out
    else:
        # Every jaxcnn line names its ratio to the best PyTorch configuration of its dtype; each side has a line.
        assert all("ratio" in row and "the best PyTorch" in " ".join(row) for row in jax_lines)
        torch_lines = {tuple(line.split()[:4]) for line in out.splitlines() if line.split()[2:3] == ["PyTorch"]}
        assert torch_lines == {(m, d, "PyTorch", c) for m, d in expected for c in ("eager", "channels_last")}
        assert "PARAMETER COUNTS DIFFER" not in out


def test_vs_pytorch_rejects_an_unknown_configuration_or_dtype():
    for args, message in [(("--torch-configs", "eager,jit"), "--torch-configs: unknown configuration 'jit'"),
                          (("--dtype", "float16"), "--dtype: unknown dtype 'float16'")]:
        result = subprocess.run([sys.executable, "benchmarks/vs_pytorch.py", *args], cwd=REPO, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 2 and message in result.stderr


def test_best_torch_configuration_is_chosen_per_dtype():
    vs_pytorch = _vs_pytorch()
    rates = {("jaxcnn", "float32"): [100.0], ("eager", "float32"): [50.0, 60.0, 55.0],
             ("compile", "float32"): [80.0, 70.0, 90.0], ("eager", "bfloat16"): [200.0],
             ("compile", "bfloat16"): [150.0]}
    assert vs_pytorch.best_torch(rates, "float32") == "compile"
    assert vs_pytorch.best_torch(rates, "bfloat16") == "eager"
    lines = vs_pytorch.report_lines("m", {"rates": rates, "compile_s": {"float32": 1.0}, "jax_params": 5,
                                          "torch_params": [5], "torch_version": "2", "torch_python": "3"},
                                    ("float32",))
    assert "ratio 1.25x to the best PyTorch (compile; median per-round ratio 1.25x)" in lines[0]
    assert any("compile" in line and "(best)" in line for line in lines[1:])


@pytest.mark.slow
def test_torch_compile_with_channels_last_and_autocast_trains():
    """The configuration a PyTorch user picks for speed runs here (inductor needs a C++ compiler on the CPU)."""
    pytest.importorskip("torch")
    trainer = _vs_pytorch().TorchTrainer("mlp", 4, compile=True, channels_last=True, dtype="bfloat16")
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.run(2)
    assert all(not (a == p).all() for a, p in zip(before, trainer.model.parameters()))


def _vs_pytorch():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import vs_pytorch
    finally:
        sys.path.pop(0)
    return vs_pytorch


def test_torch_python_that_does_not_run_is_reported_not_raised():
    why = _vs_pytorch().torch_available("/nonexistent/python3")
    assert why is not None and "--torch-python /nonexistent/python3: cannot run it" in why


def test_torch_python_without_torch_says_how_to_install_it(tmp_path):
    # An interpreter whose `import torch` fails (a stand-in script), as a Python with no PyTorch wheel would.
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'ModuleNotFoundError: No module named torch' >&2\nexit 1\n")
    fake.chmod(0o755)
    why = _vs_pytorch().torch_available(str(fake))
    assert why is not None and "`import torch` failed (ModuleNotFoundError" in why
    assert "pip install torch==2.13.0" in why


def test_torch_process_trains_in_a_child_and_reports_its_errors():
    vs_pytorch = _vs_pytorch()
    # A model the twins do not have: the child's own error comes back, with its message, whether or not the
    # child has torch (without it, the error is torch's import).
    with pytest.raises(RuntimeError, match="the PyTorch process for no_such_net failed: .*Error"):
        vs_pytorch.TorchProcess("no_such_net", 2)
    pytest.importorskip("torch")
    child = vs_pytorch.TorchProcess("mlp", 4, python=sys.executable)
    try:
        assert child.params == 266_610 and child.python == sys.version.split()[0]
        child.run(2)
        child.run(1)
    finally:
        child.close()
    assert child.process.returncode == 0


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


@pytest.mark.slow
def test_time_to_accuracy_reports_mean_and_std_over_seeds(tmp_path):
    """Two real (20-step) runs of the fast recipe on real Fashion-MNIST; the figures and the goal line are printed."""
    from jaxcnn.data.dataset import DatasetNotFoundError
    from jaxcnn.data.sources import load_split

    try:
        load_split("fashion_mnist", "test", limit=1)
    except DatasetNotFoundError:
        pytest.skip("Fashion-MNIST is not installed (./setup.sh installs it)")
    args = ["benchmarks/time_to_accuracy.py", "--seeds", "2", "--set", "train.steps=20", "--workdir", str(tmp_path)]
    try:
        import torch  # noqa: F401

        args.append("--torch")
    except ImportError:
        pass
    out = run_script(*args)
    assert "seed 0  jaxcnn" in out and "seed 1  jaxcnn" in out
    assert "jaxcnn   test accuracy" in out and "n=2" in out and "goal (mean >= 93.0% in < 120 s)" in out
    assert (tmp_path / "seed1" / "summary.json").is_file()
    if "--torch" in args:
        assert "PyTorch  test accuracy" in out


def test_time_to_accuracy_summary_line_is_mean_and_sample_std():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from time_to_accuracy import report
    finally:
        sys.path.pop(0)
    runs = [{"test_accuracy": a, "wall_s": t, "train_images_per_s": 1000.0}
            for a, t in [(0.92, 100.0), (0.93, 110.0), (0.94, 120.0)]]
    line = report("jaxcnn", runs, target=0.93, budget=120.0)
    # mean 93.00%, sample std 1.00%; mean time 110.0 s, sample std 10.0 s -> the goal is met.
    assert "93.00 ± 1.00%" in line and "110.0 ± 10.0 s" in line and ": met" in line
    assert "NOT met" in report("jaxcnn", runs, target=0.931, budget=120.0)


def test_fast_recipe_torch_twin_has_jaxcnn_parameter_count():
    pytest.importorskip("torch")
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from torch_models import VGG, param_count
    finally:
        sys.path.pop(0)
    import jax

    from jaxcnn.config import load_experiment
    from jaxcnn.models import create_model
    from jaxcnn.train.state import init_variables, param_count as jax_param_count

    cfg = load_experiment(REPO / "experiments" / "fashion_mnist_fast.py")
    knobs = {k: v for k, v in cfg.model.items() if k != "name"}
    model = create_model(cfg.model["name"], num_classes=10, **knobs)
    expected = jax_param_count(jax.eval_shape(lambda: init_variables(model, (1, 28, 28, 1), 0))["params"])
    twin = VGG(tuple(knobs["stage_sizes"]), tuple(knobs["stage_widths"]), num_classes=10, in_channels=1)
    assert param_count(twin) == expected == 98_922


def test_vs_pytorch_imagenet_resnet_in_bfloat16_prints_mfu():
    """The GPU comparison's command, cut to a tiny input on the CPU: ResNet-18 twins agree on the parameter count
    (11,689,512 at 1000 classes) and the MFU column is printed."""
    out = run_script("benchmarks/vs_pytorch.py", "--models", "resnet18", "--image-size", "32", "--batch", "2",
                     "--steps", "1", "--rounds", "1", "--warmup", "1", "--dtype", "bfloat16", "--peak-tflops", "1",
                     "--torch-configs", "eager")
    assert "resnet18" in out and "MFU" in out and "bfloat16 compute" in out
    assert "PARAMETER COUNTS DIFFER" not in out


def test_scaling_prints_a_row_per_strategy_and_device_count():
    out = run_script("benchmarks/scaling.py", "--model", "lenet5", "--image", "28,28,1", "--per-device-batch", "4",
                     "--steps", "2", "--devices", "1,2")
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["jit"], ["pmap"], ["shard_map"], ["single"])]
    assert {(r[0], r[1]) for r in rows} >= {("jit", "1"), ("jit", "2"), ("pmap", "2"), ("shard_map", "2"), ("single", "1")}


def test_torch_process_whose_child_dies_mid_run_raises_and_passes_its_prints_on(tmp_path, capsys):
    # A stand-in child: prints a line of its own, says ready, then dies on the first request.
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\necho "a line of its own"\n'
                    'echo \'vs_pytorch-worker ["ready", {"params": 1, "version": "0", "threads": 1, "python": "0"}]\'\n'
                    'read steps\nexit 3\n')
    fake.chmod(0o755)
    child = _vs_pytorch().TorchProcess("mlp", 4, python=str(fake))
    with pytest.raises(RuntimeError, match=r"the PyTorch process failed: the process ended \(exit status 3\)"):
        child.run(1)
    child.close()  # on a dead child: no error
    assert "a line of its own" in capsys.readouterr().out


def _gpu_script(tmp_path, fake_body: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\n" + fake_body)
    fake.chmod(0o755)
    return subprocess.run(["bash", str(REPO / "benchmarks/gpu.sh"), *args], cwd=tmp_path,
                          env={**os.environ, "PYTHON": str(fake), **env}, capture_output=True, text=True,
                          timeout=120)


def test_gpu_script_runs_each_benchmark_and_keeps_every_line(tmp_path):
    # A stand-in interpreter that prints its arguments (the last benchmark fails), so the script's own plumbing
    # is what runs: the commands it issues, their log, the failure line, its exit status.
    result = _gpu_script(tmp_path, 'echo "ran: $*"\ncase "$*" in *resnet50*) exit 3;; esac\n', "out")
    assert result.returncode == 1, result.stderr
    log = (tmp_path / "out" / "gpu.txt").read_text()  # OUT_DIR relative to where the script was started
    assert "ran: benchmarks/vs_pytorch.py --models resnet20 --dtype bfloat16 --batch 512" in log
    assert "ran: benchmarks/vs_pytorch.py --models resnet18,resnet50 --image-size 224 --dtype bfloat16" in log
    assert "(exit status 3)" in log and log.count("(exit status") == 1


def test_gpu_script_stops_a_command_at_its_time_limit_and_goes_on(tmp_path):
    result = _gpu_script(tmp_path, 'case "$*" in *resnet20*) sleep 30;; esac\necho "ran: $*"\n', str(tmp_path / "o"),
                         GPU_SH_LIMIT_S="2")
    assert result.returncode == 1, result.stderr
    log = (tmp_path / "o" / "gpu.txt").read_text()
    assert "(stopped: over its 2 s limit)" in log
    assert "ran: benchmarks/vs_pytorch.py --models resnet18,resnet50" in log  # the next command still ran
