"""Wall time to a test accuracy: a recipe trained from scratch over several seeds, mean ± std.

    python benchmarks/time_to_accuracy.py                                       # the fast Fashion-MNIST recipe, 3 seeds
    python benchmarks/time_to_accuracy.py --seeds 5 --target 0.93 --budget 120
    python benchmarks/time_to_accuracy.py --torch                               # + the same recipe in PyTorch
    python benchmarks/time_to_accuracy.py --experiment experiments/fashion_mnist_lenet5.py --target 0.91

Each seed is one real training run, in a fresh process, of the experiment file (default
experiments/fashion_mnist_fast.py), exactly as `python -m jaxcnn train EXPERIMENT --set seed=K` runs it on the
real dataset: data loading, compilation, training and the final evaluation on all 10,000 test images (with the
recipe's test-time augmentation). The time of a run is its `wall_s` (summary.json: from the start of training
to the written summary; the Python and JAX imports before it, about 2 s, are printed apart). The figure of merit
is the mean test accuracy and the mean time over the seeds; the run meets the goal when the mean accuracy reaches
`--target` and the mean time stays under `--budget` seconds.

`--torch` also trains the recipe's network in PyTorch (benchmarks/torch_models.py: the same layers, widths and
initial-learning-rate schedule, batch, loss, label smoothing, optimizer, flip augmentation and flip test-time
augmentation), on the same data, for the same seeds, one after the other with the jaxcnn runs, and prints its
figures beside them. `--torch-config` picks PyTorch's configuration (benchmarks/vs_pytorch.py: eager,
channels_last, compile, compile+channels_last; default compile+channels_last, the fastest on this CPU; its
compilation counts in its time, as jaxcnn's does); a recipe with `train.compute_dtype=bfloat16` runs PyTorch's
steps under `torch.autocast(dtype=torch.bfloat16)`. PyTorch is optional (`pip install torch==2.13.0`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if __package__ in (None, ""):
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(REPO))

DEFAULT_EXPERIMENT = REPO / "experiments" / "fashion_mnist_fast.py"


def run_jaxcnn(experiment: Path, seed: int, workdir: Path, overrides: list[str]) -> dict[str, Any]:
    """One training run in a fresh process; returns its summary.json plus `process_s` (the whole process)."""
    cmd = [sys.executable, "-m", "jaxcnn", "train", str(experiment), "--workdir", str(workdir),
           "--set", f"seed={seed}", "--set", "train.progress=false"]
    for item in overrides:
        cmd += ["--set", item]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    process_s = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"training run for seed {seed} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}"
                           f"\n{proc.stderr[-4000:]}")
    summary = json.loads((workdir / "summary.json").read_text())
    summary["process_s"] = process_s
    return summary


def run_torch(cfg: Any, seed: int, config: str = "compile+channels_last") -> dict[str, Any]:
    """The recipe's network and training in PyTorch in `config` (a key of vs_pytorch.TORCH_CONFIGS); returns
    {'test_accuracy', 'wall_s', 'train_images_per_s'}.

    Mirrors what `jaxcnn train` does with the config: uint8 images normalised with the dataset's mean/std,
    the flip augmentation (random or alternating per example index), SGD with Nesterov momentum and weight decay
    on the parameters the config's weight_decay_mask names, the config's schedule (onecycle, triangular or
    cosine, stepped per batch), label smoothing,
    and the final test evaluation with flip test-time augmentation when the config asks for it.
    """
    import numpy as np
    import torch
    import torch.nn.functional as F

    from jaxcnn.data.dataset import dataset_info
    from jaxcnn.data.sources import load_split
    from jaxcnn.data.pipeline import epoch_permutation
    from jaxcnn.train.loop import total_steps_of
    from jaxcnn.train.optim import lr_at, make_schedule
    from torch_models import VGG
    from vs_pytorch import TORCH_CONFIGS

    t_start = time.perf_counter()
    torch.manual_seed(seed)
    torch.set_num_threads(os.cpu_count() or 1)
    model_cfg = cfg.model
    if model_cfg["name"] not in ("vgg11_bn",) or model_cfg.get("head") != "gap":
        raise SystemExit(f"--torch knows the recipe's VGG-style net only (vgg11_bn with head='gap'), not {model_cfg}")
    info = dataset_info(cfg.data.name)
    train = load_split(cfg.data.name, "train", data_dir=cfg.data.data_dir)
    test = load_split(cfg.data.name, "test", data_dir=cfg.data.data_dir)
    channels = train.images.shape[-1]
    mean = torch.tensor(info.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(info.std, dtype=torch.float32).view(1, -1, 1, 1)
    x_train = torch.from_numpy(np.ascontiguousarray(train.images.transpose(0, 3, 1, 2)))
    y_train = torch.from_numpy(train.labels.astype(np.int64))
    x_test = torch.from_numpy(np.ascontiguousarray(test.images.transpose(0, 3, 1, 2)))
    y_test = torch.from_numpy(test.labels.astype(np.int64))

    model = VGG(tuple(model_cfg["stage_sizes"]), tuple(model_cfg["stage_widths"]), num_classes=info.num_classes,
                in_channels=channels).train()
    channels_last, compiled = TORCH_CONFIGS[config]
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    forward = torch.compile(model) if compiled else model  # training steps; the evaluation runs the model eagerly
    autocast = str(cfg.train.compute_dtype) == "bfloat16"
    o = cfg.optim
    # jaxcnn's weight_decay_mask: 'kernels' decays conv and dense weights (ndim > 1), 'all' every parameter.
    decay = [p for p in model.parameters() if p.ndim > 1 or o.weight_decay_mask == "all"]
    rest = [p for p in model.parameters() if not (p.ndim > 1 or o.weight_decay_mask == "all")]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": o.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                          lr=o.lr, momentum=o.momentum, nesterov=o.nesterov)
    batch = cfg.data.batch_size
    steps_per_epoch = len(y_train) // batch
    total = total_steps_of(cfg, steps_per_epoch)  # as `jaxcnn train` counts them
    schedule = make_schedule(o.lr, cfg.schedule, steps_per_epoch=steps_per_epoch, total_steps=total)
    rng = np.random.default_rng(seed)
    flip_bit = torch.from_numpy(rng.integers(0, 2, len(y_train)).astype(bool))

    def prep(images: torch.Tensor) -> torch.Tensor:
        return ((images.float() / 255.0 - mean / 255.0) / (std / 255.0)).contiguous(memory_format=memory_format)

    step = 0
    t_train = time.perf_counter()
    while step < total:
        epoch = step // steps_per_epoch
        order = torch.from_numpy(epoch_permutation(seed, epoch, len(y_train)))  # jaxcnn's order of examples
        for i in range(steps_per_epoch):
            if step >= total:
                break
            idx = order[i * batch:(i + 1) * batch]
            images = x_train[idx]
            if cfg.data.flip == "alternating":
                flip = flip_bit[idx] ^ bool(epoch % 2)
            elif cfg.data.flip == "random":
                flip = torch.rand(len(idx)) < 0.5
            else:
                flip = None
            if flip is not None:
                images = torch.where(flip.view(-1, 1, 1, 1), images.flip(3), images)
            for group in opt.param_groups:
                group["lr"] = lr_at(schedule, step)
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = F.cross_entropy(forward(prep(images)), y_train[idx], label_smoothing=o.label_smoothing)
            loss.backward()
            opt.step()
            step += 1
    train_s = time.perf_counter() - t_train
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(y_test), 1000):
            x = prep(x_test[i:i + 1000])
            logits = model(x)
            if cfg.data.tta in ("flip", "flip_translate"):
                logits = logits + model(x.flip(3))
            correct += int((logits.argmax(1) == y_test[i:i + 1000]).sum())
    return {"test_accuracy": correct / len(y_test), "wall_s": time.perf_counter() - t_start,
            "train_images_per_s": total * batch / train_s}


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def report(label: str, runs: list[dict[str, Any]], target: float, budget: float) -> str:
    acc_m, acc_s = mean_std([r["test_accuracy"] for r in runs])
    t_m, t_s = mean_std([r["wall_s"] for r in runs])
    ips = statistics.fmean(r["train_images_per_s"] for r in runs)
    met = acc_m >= target and t_m < budget
    return (f"{label:8s} test accuracy {100 * acc_m:.2f} ± {100 * acc_s:.2f}% | time {t_m:.1f} ± {t_s:.1f} s | "
            f"{ips:,.0f} train images/s | n={len(runs)} | goal (mean >= {100 * target:.1f}% in < {budget:.0f} s): "
            f"{'met' if met else 'NOT met'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", type=Path, default=DEFAULT_EXPERIMENT)
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1")
    parser.add_argument("--target", type=float, default=0.93, help="mean test accuracy to reach (0..1)")
    parser.add_argument("--budget", type=float, default=120.0, help="mean seconds per run to stay under")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for the jaxcnn runs (as in `jaxcnn train --set`)")
    parser.add_argument("--torch", action="store_true", help="also train the recipe in PyTorch")
    parser.add_argument("--torch-config", default="compile+channels_last",
                        choices=("eager", "channels_last", "compile", "compile+channels_last"),
                        help="PyTorch's configuration (default: compile+channels_last)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the runs here (default: a temp folder)")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    if not args.experiment.is_file():
        parser.error(f"--experiment {args.experiment}: no such file")

    from jaxcnn.config import load_experiment

    cfg = load_experiment(args.experiment, args.overrides)
    if args.torch:
        try:
            import torch
        except ImportError as err:
            parser.error(f"--torch needs PyTorch ({err}); pip install torch==2.13.0")
        print(f"PyTorch {torch.__version__}, {os.cpu_count()} threads, {args.torch_config}")
    import platform

    load = os.getloadavg()
    print(f"{args.experiment.name}: {cfg.model['name']} on {cfg.data.name}, {cfg.train.epochs} epochs of batch "
          f"{cfg.data.batch_size}; python {platform.python_version()}, {os.cpu_count()} CPUs, load average "
          f"{load[0]:.2f}")
    root = args.workdir or Path(tempfile.mkdtemp(prefix="jaxcnn_tta_"))
    jax_runs: list[dict[str, Any]] = []
    torch_runs: list[dict[str, Any]] = []
    for seed in range(args.seeds):
        workdir = root / f"seed{seed}"
        if workdir.exists() and any(workdir.iterdir()):
            raise SystemExit(f"{workdir} is not empty: pass a fresh --workdir")
        run = run_jaxcnn(args.experiment, seed, workdir, args.overrides)
        jax_runs.append(run)
        print(f"seed {seed}  jaxcnn  test accuracy {100 * run['test_accuracy']:.2f}%  time {run['wall_s']:.1f} s "
              f"(process {run['process_s']:.1f} s, {run['train_images_per_s']:,.0f} train images/s, jax "
              f"{run['jax_version']})", flush=True)
        if args.torch:
            trun = run_torch(cfg, seed, args.torch_config)
            torch_runs.append(trun)
            print(f"seed {seed}  PyTorch test accuracy {100 * trun['test_accuracy']:.2f}%  time {trun['wall_s']:.1f} s "
                  f"({trun['train_images_per_s']:,.0f} train images/s)", flush=True)
    print(report("jaxcnn", jax_runs, args.target, args.budget))
    if torch_runs:
        print(report("PyTorch", torch_runs, args.target, args.budget))
        ratio = statistics.fmean(r["wall_s"] for r in torch_runs) / statistics.fmean(r["wall_s"] for r in jax_runs)
        print(f"jaxcnn time = {1 / ratio:.2f}x PyTorch's" if math.isfinite(ratio) else "")
    print(f"runs kept in {root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
