"""Command line: python -m jaxcnn train | sweep | sweep-run | report | summary | models | predict.

    python -m jaxcnn train experiments/fashion_mnist_lenet5.py --set optim.lr=0.05 --workdir runs/lr005
    python -m jaxcnn sweep experiments/ablate_pooling.py --workdir runs/pooling
    python -m jaxcnn report runs/pooling
    python -m jaxcnn summary resnet20 --input 32,32,3
    python -m jaxcnn models 'resnet*'
    python -m jaxcnn predict --weights hf-hub:timm/resnet50.a1_in1k cat.jpg
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from jaxcnn.config import ConfigError


def _default_workdir(experiment: str) -> str:
    return str(Path("runs") / Path(experiment).stem)


def _cmd_train(args: argparse.Namespace) -> int:
    from jaxcnn.config import load_experiment

    cfg = load_experiment(args.experiment, args.set)
    from jaxcnn.train.loop import train  # after the config is known good: importing jax takes a few seconds

    train(cfg, args.workdir or _default_workdir(args.experiment))
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from jaxcnn.results.sweep import run_sweep
    from jaxcnn.train.loop import train

    failed = run_sweep(args.experiment, overrides=args.set, workdir=args.workdir or _default_workdir(args.experiment),
                       parallel_runs=args.parallel, train_fn=train)
    return 1 if failed else 0


def _cmd_sweep_run(args: argparse.Namespace) -> int:
    from jaxcnn.results.sweep import run_prepared
    from jaxcnn.train.loop import train

    return run_prepared(args.run_dir, train)


def _cmd_report(args: argparse.Namespace) -> int:
    from jaxcnn.results.report import build_report

    build_report(args.workdir)
    return 0


def _cmd_summary(args: argparse.Namespace) -> int:
    from jaxcnn.analysis.summary import summary
    from jaxcnn.models import create_model

    knobs = {}
    for item in args.set:
        k, _, v = item.partition("=")
        knobs[k.removeprefix("model.")] = v
    from jaxcnn.config import validate_model_section

    section = validate_model_section({"name": args.model, **knobs})
    section.pop("name")
    shape = tuple(int(s) for s in args.input.split(","))
    if len(shape) != 3:
        raise ConfigError(f"--input {args.input!r}: expected H,W,C such as 32,32,3")
    model = create_model(args.model, num_classes=args.num_classes, **section)
    print(summary(model, (1, *shape)))
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from jaxcnn.models import list_models
    from jaxcnn.models.registry import model_description

    names = list_models(args.pattern)
    width = max((len(n) for n in names), default=0)
    for name in names:
        print(f"{name:<{width}}  {model_description(name)}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from jaxcnn.pretrained.predict import format_predictions, predict

    top = predict(args.weights, args.images, k=args.top, resize=args.resize, crop=args.crop,
                  interpolation=args.interpolation)
    print(format_predictions(args.images, top))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jaxcnn", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def add_run_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("experiment", help="experiment file defining get_config() (see experiments/)")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set optim.lr=0.05 --set model.pool=avg (repeatable)")
        sp.add_argument("--workdir", help="where the run writes (default: runs/<experiment name>)")

    t = sub.add_parser("train", help="train one experiment")
    add_run_args(t)
    t.set_defaults(func=_cmd_train)

    s = sub.add_parser("sweep", help="run every variant of an experiment's sweep()")
    add_run_args(s)
    s.add_argument("--parallel", type=int, default=1, help="variants run at once (each on its own devices)")
    s.set_defaults(func=_cmd_sweep)

    sr = sub.add_parser("sweep-run", help="train one run a sweep prepared (what --parallel starts for each run)")
    sr.add_argument("run_dir", help="a run folder holding variant.json")
    sr.set_defaults(func=_cmd_sweep_run)

    r = sub.add_parser("report", help="rebuild results.csv, results.md and plots from a sweep's finished runs")
    r.add_argument("workdir")
    r.set_defaults(func=_cmd_report)

    m = sub.add_parser("summary", help="per-layer shapes, parameters, FLOPs and receptive fields of a model")
    m.add_argument("model")
    m.add_argument("--input", default="32,32,3", help="input H,W,C (default 32,32,3)")
    m.add_argument("--num-classes", type=int, default=10)
    m.add_argument("--set", action="append", default=[], metavar="KNOB=VALUE", help="model knob, e.g. --set pool=avg")
    m.set_defaults(func=_cmd_summary)

    ls = sub.add_parser("models", help="list registered model names")
    ls.add_argument("pattern", nargs="?", default=None, help="fnmatch pattern, e.g. 'resnet*'")
    ls.set_defaults(func=_cmd_models)

    pr = sub.add_parser("predict", help="top-5 ImageNet classes of images with pretrained weights (docs/pretrained.md)")
    pr.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any format PIL reads)")
    pr.add_argument("--weights", required=True, metavar="SPEC",
                    help="torchvision:ARCH=PATH, timm:ARCH=PATH or hf-hub:REPO, e.g. hf-hub:timm/resnet50.a1_in1k")
    pr.add_argument("--top", type=int, default=5, help="classes shown per image (default 5)")
    pr.add_argument("--resize", type=int, help="shorter side before the centre crop (default 256, or timm's setting "
                    "for hf-hub weights)")
    pr.add_argument("--crop", type=int, help="centre crop size (default 224, or timm's input size for hf-hub weights)")
    pr.add_argument("--interpolation", choices=("bilinear", "bicubic", "nearest"),
                    help="resize filter (default bilinear, or timm's for hf-hub weights)")
    pr.set_defaults(func=_cmd_predict)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"jaxcnn: config error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("jaxcnn: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one clear line for the errors we raise on purpose; a traceback for real bugs
        from jaxcnn.errors import is_user_error

        if is_user_error(e):
            print(f"jaxcnn: error: {e}", file=sys.stderr)
            return 1
        raise
