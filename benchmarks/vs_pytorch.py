"""jaxcnn against PyTorch in the configurations a PyTorch user picks, trained side by side, alternately.

    python benchmarks/vs_pytorch.py                                   # resnet20, lenet5, mlp, vgg11 at batch 128
    python benchmarks/vs_pytorch.py --models resnet20 --dtype float32,bfloat16 --rounds 7
    python benchmarks/vs_pytorch.py --models resnet20 --torch-configs eager,compile+channels_last
    python benchmarks/vs_pytorch.py --models resnet18,resnet50,resnet20 --dtype bfloat16 --batch 256   # on a GPU

Both sides train the same network (benchmarks/torch_models.py holds the PyTorch twins, with jaxcnn's widths,
paddings, biases and BatchNorm settings) with the same batch, softmax cross-entropy, and SGD with Nesterov
momentum 0.9 and weight decay 5e-4 on every parameter. Both start from uint8 batches already in memory and turn
them into normalised floats inside the step. jaxcnn runs the train step `jaxcnn train` runs
(benchmarks/train_throughput.py builds it); PyTorch runs a plain loop (zero_grad, forward, loss, backward, step)
with `torch.set_num_threads(os.cpu_count())` (2 on the 2-core benchmark machine), in each of `--torch-configs`:

    eager                   the model as built (NCHW memory)
    channels_last           model and inputs in torch.channels_last (NHWC) memory, jaxcnn's layout
    compile                 torch.compile(model) (inductor; on the CPU it needs a C++ compiler)
    compile+channels_last   both: what a PyTorch user who wants speed on a CPU writes

`--dtype` takes float32, bfloat16 or both (comma-separated). bfloat16 means bfloat16 compute with float32
parameters on both sides: jaxcnn's `train.compute_dtype=bfloat16` models, and every PyTorch configuration under
`torch.autocast(device, dtype=torch.bfloat16)`. Every jaxcnn figure is printed with its ratio to the best PyTorch
figure of the same dtype in the same run.

Timing: compile / warm-up steps first, then, one dtype after the other, `--rounds` rounds in which every side of
that dtype (jaxcnn and each PyTorch configuration) trains `--steps` steps in turn, so all see the same machine load.
The dtypes are timed in blocks because a float32 round that came right after another process's bfloat16 (AMX)
round ran slower: with the rounds of both dtypes interleaved, jaxcnn's float32 ResNet-20 measured 753 images/s,
in a float32-only run 829, with the same PyTorch figures (2026-12-07, 2-core Xeon with AMX). Printed:
the median images/s of each side, and for jaxcnn the ratio of its median to the best PyTorch median of its dtype
and the median of the per-round ratios against that configuration. PyTorch is optional (`pip install
torch==2.13.0`); without it only the jaxcnn figures are printed.

Each PyTorch configuration runs in a child process of its own, driven round by round from here (over its stdin and
stdout), so that its allocator state and compiled code are its own; `--torch-python` runs those processes with
another interpreter, so that jaxcnn on a Python without a PyTorch wheel still meets PyTorch in the same run:

    /work/py312/bin/python benchmarks/vs_pytorch.py --torch-python python3.11

Both sides run with glibc's default malloc settings, as each library runs for its users. `--torch-malloc jaxcnn`
applies jaxcnn.backends.configure_process's opt-in settings in PyTorch's processes instead, before they import torch.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

if __package__ in (None, ""):  # run as a script: import the sibling modules and this checkout's jaxcnn
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from train_throughput import BENCH_MODELS, LR, MOMENTUM, WEIGHT_DECAY, bench_spec, machine_line, make_jax_trainer  # noqa: E402

DEFAULT_MODELS = ("resnet20", "lenet5", "mlp", "vgg11")


# PyTorch configuration -> (channels_last, torch.compile).
TORCH_CONFIGS = {"eager": (False, False), "channels_last": (True, False), "compile": (False, True),
                 "compile+channels_last": (True, True)}


class TorchTrainer:
    """The PyTorch twin of a benchmark model with its optimizer and uint8 batches; `run(n)` trains n steps.

    dtype 'bfloat16' runs the step under `torch.autocast` (bfloat16 compute, float32 parameters), as jaxcnn's
    `dtype='bfloat16'` models do; compile: the forward pass through `torch.compile` (its backward follows);
    device: 'cpu' or 'cuda'.
    """

    def __init__(self, name: str, batch_size: int, *, channels_last: bool = False, compile: bool = False,
                 seed: int = 0, num_batches: int = 4, image_size: int = 224, dtype: str = "float32",
                 device: str = "cpu") -> None:
        import numpy as np
        import torch

        from torch_models import make_torch_model, param_count

        torch.manual_seed(seed)
        _, knobs, (h, w, c) = bench_spec(name, image_size)
        self.torch = torch
        self.device = torch.device(device)
        self.autocast = dtype == "bfloat16"
        self.model = make_torch_model(name, knobs["num_classes"], channels_last=channels_last).to(self.device)
        self.params = param_count(self.model)
        self.forward = torch.compile(self.model) if compile else self.model
        self.opt = torch.optim.SGD(self.model.parameters(), lr=LR, momentum=MOMENTUM, nesterov=True,
                                   weight_decay=WEIGHT_DECAY)
        self.loss = torch.nn.CrossEntropyLoss()
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.mean = torch.full((1, c, 1, 1), 127.5 / 255.0, device=self.device)
        self.std = torch.full((1, c, 1, 1), 64.0 / 255.0, device=self.device)
        rng = np.random.default_rng(seed)
        self.batches = []
        for _ in range(num_batches):
            images = torch.from_numpy(rng.integers(0, 256, (batch_size, c, h, w), dtype=np.uint8))
            labels = torch.from_numpy(rng.integers(0, knobs["num_classes"], batch_size).astype(np.int64))
            self.batches.append((images.contiguous(memory_format=self.memory_format).to(self.device),
                                 labels.to(self.device)))
        self.step = 0

    def run(self, steps: int) -> None:
        torch = self.torch
        for _ in range(steps):
            images, labels = self.batches[self.step % len(self.batches)]
            x = ((images.float() / 255.0 - self.mean) / self.std).contiguous(memory_format=self.memory_format)
            self.opt.zero_grad(set_to_none=True)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                loss = self.loss(self.forward(x), labels)
            loss.backward()
            self.opt.step()
            self.step += 1
        loss.item()  # waits for the device


def torch_available(python: str | None = None) -> str | None:
    """None when PyTorch is installed for `python` (default: this interpreter), else why not (checked without
    importing it into this process; another interpreter is asked by running it)."""
    if python is None:
        import importlib.util

        if importlib.util.find_spec("torch") is None:
            return "PyTorch is not installed here; `pip install torch==2.13.0` adds it (CPU build)"
        return None
    try:
        probe = subprocess.run([python, "-c", "import torch"], capture_output=True, text=True, timeout=300)
    except OSError as error:
        return f"--torch-python {python}: cannot run it ({error})"
    except subprocess.TimeoutExpired:
        return f"--torch-python {python}: `import torch` did not finish in 300 s"
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["no message"])[-1]
        return f"--torch-python {python}: `import torch` failed ({last}); `{python} -m pip install torch==2.13.0`"
    return None


_WORKER_FLAG = "--torch-worker"
_REPLY = "vs_pytorch-worker "  # prefix of the child's protocol lines on its stdout (anything else is passed on)


def _torch_worker(spec: dict[str, Any]) -> int:
    """The child process: builds a TorchTrainer from `spec`, then trains n steps for every line "n" read from
    stdin (an empty line or end of input ends it), answering each on stdout."""

    def reply(kind: str, info: Any) -> None:
        sys.stdout.write(_REPLY + json.dumps([kind, info]) + "\n")
        sys.stdout.flush()

    try:
        if spec.pop("malloc") == "jaxcnn":
            from jaxcnn.backends import configure_process

            os.environ["JAXCNN_HOST_MALLOC"] = "1"
            configure_process()  # jaxcnn's host malloc settings, before torch starts its threads
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        trainer = TorchTrainer(spec.pop("name"), spec.pop("batch_size"), **spec)
        reply("ready", {"params": trainer.params, "version": torch.__version__, "threads": torch.get_num_threads(),
                        "python": sys.version.split()[0]})
    except Exception as error:  # the parent raises it with the child's message
        reply("error", f"{type(error).__name__}: {error}")
        return 1
    for line in sys.stdin:
        if not line.strip():
            break
        trainer.run(int(line))
        reply("done", int(line))
    return 0


class TorchProcess:
    """A TorchTrainer in a child process (its own malloc settings, see the module docstring; its own interpreter
    with `python`, default this one); `run(n)` waits for n steps there. malloc: 'default' (glibc's) or 'jaxcnn'
    (jaxcnn.backends.configure_process's)."""

    def __init__(self, name: str, batch_size: int, *, channels_last: bool = False, malloc: str = "default",
                 python: str | None = None, **options: Any) -> None:
        spec = {"name": name, "batch_size": batch_size, "channels_last": channels_last, "malloc": malloc, **options}
        # A fresh interpreter running this file: no JAX, no inherited allocator state, and any Python version.
        self.process = subprocess.Popen([python or sys.executable, os.path.abspath(__file__), _WORKER_FLAG,
                                         json.dumps(spec)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        kind, info = self._receive()
        if kind != "ready":
            self.close()
            raise RuntimeError(f"the PyTorch process for {name} failed: {info}")
        self.params, self.version, self.threads = info["params"], info["version"], info["threads"]
        self.python = info["python"]

    def _receive(self) -> tuple[str, Any]:
        for line in self.process.stdout:
            if line.startswith(_REPLY):
                kind, info = json.loads(line[len(_REPLY):])
                return kind, info
            sys.stdout.write(line)  # the child's own prints
        code = self.process.wait()
        return "error", f"the process ended (exit status {code}) without answering; its messages are above"

    def run(self, steps: int) -> None:
        try:
            self.process.stdin.write(f"{steps}\n")
            self.process.stdin.flush()
        except OSError:  # it has ended; _receive says how
            pass
        kind, info = self._receive()
        if kind != "done":
            raise RuntimeError(f"the PyTorch process failed: {info}")

    def close(self) -> None:
        """Ends the child: asks it to stop, and kills it if it is still busy 30 s later."""
        try:
            self.process.stdin.write("\n")
            self.process.stdin.close()
        except OSError:  # it has already ended
            pass
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()


def compare(name: str, batch_size: int, steps: int, rounds: int, warmup: int, *, dtypes: tuple[str, ...] = ("float32",),
            torch_configs: tuple[str, ...] = (), torch_malloc: str = "default", image_size: int = 224,
            torch_device: str = "cpu", torch_python: str | None = None) -> dict[str, Any]:
    """Trains `name` with jaxcnn (one trainer per dtype) and with PyTorch (one child process per configuration of
    `TORCH_CONFIGS` and dtype; none when `torch_configs` is empty), alternately, one dtype after the other; returns
    the per-round images/s of each side, keyed (side, dtype) with side 'jaxcnn' or a PyTorch configuration.

    image_size applies to the ImageNet nets (resnet18, resnet50); dtype 'bfloat16' = bfloat16 compute with float32
    parameters on both sides."""
    sides: dict[tuple[str, str], Any] = {}
    compile_s: dict[str, float] = {}
    try:
        for dtype in dtypes:
            trainer = make_jax_trainer(name, batch_size, dtype=dtype, image_size=image_size)
            trainer.run(warmup)
            sides[("jaxcnn", dtype)], compile_s[dtype] = trainer, trainer.compile_s
        for dtype in dtypes:
            for config in torch_configs:
                channels_last, compiled = TORCH_CONFIGS[config]
                child = TorchProcess(name, batch_size, channels_last=channels_last, compile=compiled,
                                     malloc=torch_malloc, python=torch_python, image_size=image_size, dtype=dtype,
                                     device=torch_device)
                sides[(config, dtype)] = child
                child.run(warmup)  # torch.compile compiles here
        rates: dict[tuple[str, str], list[float]] = {key: [] for key in sides}
        for dtype in dtypes:  # in blocks: see the module docstring
            for _ in range(rounds):
                for key, trainer in sides.items():
                    if key[1] != dtype:
                        continue
                    t0 = time.perf_counter()
                    trainer.run(steps)
                    rates[key].append(steps * batch_size / (time.perf_counter() - t0))
    finally:
        for key, trainer in sides.items():
            if key[0] != "jaxcnn":
                trainer.close()  # never raises: a child that does not end is killed
    children = [trainer for key, trainer in sides.items() if key[0] != "jaxcnn"]
    jax_params = next(trainer.params for key, trainer in sides.items() if key[0] == "jaxcnn")
    return {"rates": rates, "compile_s": compile_s, "jax_params": jax_params,
            "torch_params": sorted({child.params for child in children}),
            "torch_version": children[0].version if children else None,
            "torch_python": children[0].python if children else None}


def best_torch(rates: dict[tuple[str, str], list[float]], dtype: str) -> str | None:
    """The PyTorch configuration with the highest median images/s in `dtype` (None when PyTorch did not run)."""
    medians = {key[0]: statistics.median(r) for key, r in rates.items() if key[0] != "jaxcnn" and key[1] == dtype}
    return max(medians, key=medians.get) if medians else None


def report_lines(name: str, r: dict[str, Any], dtypes: tuple[str, ...], flops: float = 0.0,
                 peak: float | None = None) -> list[str]:
    """One line per side: jaxcnn's with its ratio to the best PyTorch configuration of the same dtype."""
    lines = []
    mfu = (lambda rate: f", MFU {rate * flops / (peak * 1e12):.1%}") if peak else (lambda rate: "")
    for dtype in dtypes:
        jax_rates = r["rates"][("jaxcnn", dtype)]
        jax_median = statistics.median(jax_rates)
        line = (f"{name:9s} {dtype:8s} jaxcnn                {jax_median:9,.1f} images/s "
                f"(compile {r['compile_s'][dtype]:.1f} s{mfu(jax_median)})")
        best = best_torch(r["rates"], dtype)
        if best is not None:
            torch_rates = r["rates"][(best, dtype)]
            per_round = statistics.median(j / t for j, t in zip(jax_rates, torch_rates))
            line += (f" | ratio {jax_median / statistics.median(torch_rates):.2f}x to the best PyTorch ({best}; "
                     f"median per-round ratio {per_round:.2f}x)")
        lines.append(line)
        for (config, d), rates in r["rates"].items():
            if config != "jaxcnn" and d == dtype:
                median = statistics.median(rates)
                lines.append(f"{name:9s} {dtype:8s} PyTorch {config:21s} {median:9,.1f} images/s"
                             + (f" ({mfu(median)[2:]})" if peak else "") + (" (best)" if config == best else ""))
    if any(count != r["jax_params"] for count in r["torch_params"]):
        lines.append(f"{name:9s} PARAMETER COUNTS DIFFER: jaxcnn {r['jax_params']:,}, PyTorch {r['torch_params']}")
    if r["torch_version"]:
        lines.append(f"{name:9s} torch {r['torch_version']} (Python {r['torch_python']}), "
                     f"{r['jax_params']:,} parameters on both sides")
    return lines


# Dense bfloat16 peak TFLOP/s by device kind (vendor figures, no sparsity), for MFU; --peak-tflops overrides.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0, "TPU v4": 275.0, "TPU v5e": 197.0,
                    "TPU v5p": 459.0}


def train_flops_per_image(name: str, image_size: int) -> float:
    """3 x the forward pass's conv/dense FLOPs (jaxcnn.analysis.summary): forward, input and weight gradients."""
    from jaxcnn.analysis.summary import summary
    from jaxcnn.models import create_model

    registry_name, knobs, shape = bench_spec(name, image_size)
    return 3.0 * summary(create_model(registry_name, **knobs), (1, *shape), xla=False).total_flops


def peak_tflops(given: float | None) -> float | None:
    """--peak-tflops, else the table's figure for jax's first device kind, else None (MFU not printed)."""
    if given:
        return given
    import jax

    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k.lower() in kind.lower()), None)


DEFAULT_STEPS = {"resnet20": 10, "resnet56": 5, "vgg11": 5, "lenet5": 50, "mlp": 50, "resnet18": 5, "resnet50": 5}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [_WORKER_FLAG]:  # the PyTorch child process (TorchProcess)
        return _torch_worker(json.loads(argv[1]))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                        help=f"comma-separated, from {', '.join(DEFAULT_STEPS)}")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=None,
                        help="steps per timed round (default: 5 for vgg11/resnet56/resnet18/resnet50, 10 for "
                             "resnet20, 50 for lenet5/mlp)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per side; medians are reported")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per side after compilation")
    parser.add_argument("--image-size", type=int, default=224, help="input size of resnet18 / resnet50")
    parser.add_argument("--dtype", default="float32",
                        help="compute dtypes, comma-separated: float32, bfloat16 or both (bfloat16: float32 "
                             "parameters, torch.autocast on PyTorch's side)")
    parser.add_argument("--torch-device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto: cuda when jax runs on a GPU and PyTorch sees one, else cpu")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's peak TFLOP/s for MFU (default: a table of bfloat16 peaks by device kind)")
    parser.add_argument("--torch-configs", default=",".join(TORCH_CONFIGS),
                        help=f"PyTorch configurations, comma-separated, from {', '.join(TORCH_CONFIGS)} (default: all)")
    parser.add_argument("--torch-malloc", default="default", choices=("default", "jaxcnn"),
                        help="glibc malloc settings of the PyTorch processes (see above)")
    parser.add_argument("--torch-python", default=None, metavar="PYTHON",
                        help="the interpreter PyTorch's process runs (default: this one), e.g. a Python 3.11 with "
                             "torch==2.13.0 beside jaxcnn on a Python that has no PyTorch wheel; it needs numpy and "
                             "torch")
    parser.add_argument("--no-torch", action="store_true", help="time jaxcnn only")
    args = parser.parse_args(argv)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    for name in names:
        if name not in DEFAULT_STEPS:
            parser.error(f"--models: unknown model {name!r}; choose from {', '.join(DEFAULT_STEPS)}")
    dtypes = tuple(d.strip() for d in args.dtype.split(",") if d.strip())
    for dtype in dtypes:
        if dtype not in ("float32", "bfloat16"):
            parser.error(f"--dtype: unknown dtype {dtype!r}; choose float32, bfloat16 or float32,bfloat16")
    configs = tuple(c.strip() for c in args.torch_configs.split(",") if c.strip())
    for config in configs:
        if config not in TORCH_CONFIGS:
            parser.error(f"--torch-configs: unknown configuration {config!r}; choose from {', '.join(TORCH_CONFIGS)}")

    from jaxcnn.backends import configure_process

    configure_process()  # XLA flags, as `jaxcnn train` sets them
    import jax

    missing = "--no-torch given" if args.no_torch else torch_available(args.torch_python)
    if missing is not None:
        configs = ()
    torch_device = args.torch_device
    if torch_device == "auto":
        torch_device = "cuda" if jax.default_backend() == "gpu" else "cpu"
    peak = peak_tflops(args.peak_tflops) if jax.default_backend() != "cpu" or args.peak_tflops else None
    print(machine_line())
    if missing is None:
        print(f"PyTorch on {torch_device}, {os.cpu_count() or 1} CPU threads, one child process per configuration "
              f"and dtype ({', '.join(configs)}), malloc settings: {args.torch_malloc}"
              + (f", run by {args.torch_python}" if args.torch_python else ""))
    else:
        print(f"PyTorch: unavailable ({missing})")
    print(f"batch {args.batch}, {' and '.join(dtypes)} compute, SGD-Nesterov + weight decay, {args.rounds} "
          f"alternating rounds" + (f"; MFU against {peak:g} TFLOP/s" if peak else ""))
    for name in names:
        steps = args.steps or DEFAULT_STEPS[name]
        r = compare(name, args.batch, steps, args.rounds, args.warmup, dtypes=dtypes, torch_configs=configs,
                    torch_malloc=args.torch_malloc, image_size=args.image_size, torch_device=torch_device,
                    torch_python=args.torch_python)
        flops = train_flops_per_image(name, args.image_size) if peak else 0.0  # only where MFU is printed
        print("\n".join(report_lines(name, r, dtypes, flops, peak)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
