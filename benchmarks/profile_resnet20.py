"""Where a training step's time goes, per operation: jaxcnn (JAX's profiler) and PyTorch (torch.profiler).

    python benchmarks/profile_resnet20.py                                  # ResNet-20, batch 128, float32
    python benchmarks/profile_resnet20.py --dtype bfloat16 --torch-config compile+channels_last
    python benchmarks/profile_resnet20.py --model lenet5 --no-torch

jaxcnn's side: the train step `jaxcnn train` compiles (benchmarks/train_throughput.py builds it) runs `--steps`
steps under `jax.profiler.trace`; the events of XLA's CPU executable are summed by name (custom calls by their
target: `jaxcnn_onednn_conv_fwd`, ...; XLA's own fusions by their kind: `loop_fusion`, `convolution`, ...).
PyTorch's side: the same model (benchmarks/torch_models.py) in `--torch-config` (see vs_pytorch.py), its self CPU
time per operator from `torch.profiler`. Each table gives milliseconds per step and the share of the step.

Profilers add overhead, and both sides of the machine's 2 cores are shared: read shares, not absolute times.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as a script: import the sibling modules and this checkout's jaxcnn
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _kind(name: str) -> str:
    """An XLA event name -> its kind: 'fusion.12' -> 'fusion', 'loop_add_fusion.3' -> 'loop_add_fusion'."""
    return re.sub(r"[.\d]+$", "", name)


def jax_profile(model: str, batch: int, dtype: str, steps: int) -> tuple[float, collections.Counter]:
    """(wall ms per step, total ns per event kind over `steps` profiled steps) of jaxcnn's train step."""
    import jax

    from train_throughput import make_jax_trainer

    trainer = make_jax_trainer(model, batch, dtype=dtype)
    trainer.run(3)  # compile and warm up
    with tempfile.TemporaryDirectory() as folder:
        t0 = time.perf_counter()
        with jax.profiler.trace(folder):
            trainer.run(steps)
        wall = (time.perf_counter() - t0) * 1e3 / steps
        planes = glob.glob(os.path.join(folder, "**", "*.xplane.pb"), recursive=True)
        data = jax.profiler.ProfileData.from_file(planes[0])
    totals: collections.Counter = collections.Counter()
    for plane in data.planes:
        if "/host:CPU" not in plane.name:
            continue
        for line in plane.lines:
            for event in line.events:
                totals[_kind(event.name)] += event.duration_ns
    return wall, totals


def torch_profile(model: str, batch: int, dtype: str, config: str, steps: int) -> tuple[float, list[tuple[str, float]]]:
    """(wall ms per step, [(operator, self CPU us over `steps` steps)]) of PyTorch's twin in `config`."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from vs_pytorch import TORCH_CONFIGS, TorchTrainer

    torch.set_num_threads(os.cpu_count() or 1)
    channels_last, compiled = TORCH_CONFIGS[config]
    trainer = TorchTrainer(model, batch, channels_last=channels_last, compile=compiled, dtype=dtype)
    trainer.run(3)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        trainer.run(steps)
        wall = (time.perf_counter() - t0) * 1e3 / steps
    rows = [(e.key, e.self_cpu_time_total) for e in prof.key_averages()]
    return wall, sorted(rows, key=lambda r: -r[1])


def table(title: str, rows: list[tuple[str, float]], wall_ms: float, top: int) -> str:
    """rows: (name, ms per step), largest first; shares of the step's wall time."""
    lines = [f"{title}: {wall_ms:.1f} ms per step (profiled)"]
    for name, ms in rows[:top]:
        lines.append(f"  {ms:8.2f} ms  {ms / wall_ms:6.1%}  {name}")
    rest = sum(ms for _, ms in rows[top:])
    lines.append(f"  {rest:8.2f} ms  {rest / wall_ms:6.1%}  (the other {max(0, len(rows) - top)} kinds)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--top", type=int, default=15, help="rows per table")
    parser.add_argument("--torch-config", default="compile+channels_last",
                        help="eager, channels_last, compile or compile+channels_last")
    parser.add_argument("--no-torch", action="store_true")
    args = parser.parse_args(argv)

    from jaxcnn.backends import configure_process

    configure_process()
    from train_throughput import machine_line

    print(machine_line())
    wall, totals = jax_profile(args.model, args.batch, args.dtype, args.steps)
    # Wrappers around the whole step, not operations; `ffi_call` events are the native kernels other than the
    # convolutions (BatchNorm, max pool, sgemm, the SGD update), named by the primitive that made them.
    rows = [(name, ns / 1e6 / args.steps) for name, ns in totals.most_common()
            if name and not name.startswith(("ThunkExecutor", "TfrtCpuExecutable", "PjRtCpuClient", "Execute",
                                              "PjitFunction", "$", "SlinkyThreadPool"))]
    print(table(f"jaxcnn {args.model} {args.dtype}", rows, wall, args.top))
    if not args.no_torch:
        try:
            import torch  # noqa: F401
        except ImportError:
            print("PyTorch: not installed here (pip install torch==2.13.0)")
            return 0
        wall, ops = torch_profile(args.model, args.batch, args.dtype, args.torch_config, args.steps)
        rows = [(name, us / 1e3 / args.steps) for name, us in ops]
        print(table(f"PyTorch {args.torch_config} {args.model} {args.dtype} (self CPU time)", rows, wall, args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
