"""Transfer learning: LeNet-5 pre-trained on MNIST digits, fine-tuned on a small slice of Fashion-MNIST clothes.

Command:   python experiments/transfer_mnist_to_fashion.py --workdir runs/transfer_mnist_to_fashion
           (`python -m jaxcnn train experiments/transfer_mnist_to_fashion.py` runs the pre-training alone).
           Options: --target-limit N (Fashion-MNIST training images, default 1000), --seeds K (default 3),
           --table PATH (also write the markdown table there). Rerunning resumes or reuses finished runs.
Question:  do features learned on digits help on clothes when only 1,000 labelled clothes are available? The same
           LeNet-5 on the same 1,000 Fashion-MNIST images (10 epochs), started four ways:
             scratch       random initialisation;
             frozen        MNIST weights, the convolutional backbone (`^block`) frozen: only the three dense
                           layers of the head train (they start from MNIST's too);
             finetune      MNIST weights, everything trains;
             unfreeze      MNIST weights, backbone frozen for the first half (5 epochs), then trained
                           (`transfer.unfreeze_at_epoch=5`).
           Test accuracy on all 10,000 Fashion-MNIST test images, mean ± sample std over seeds.
Runtime:   not measured yet
Expected:  not measured yet
Data:      MNIST in ../shared/data/mnist, Fashion-MNIST from Debian's dataset-fashion-mnist
           (/usr/share/datasets/fashion-mnist); or --set data.data_dir=FOLDER for the pre-training.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from jaxcnn.config import Config, DataConfig, ScheduleConfig, TrainConfig, TransferConfig, apply_overrides, load_experiment

# variant -> (start from the MNIST weights?, transfer.freeze, unfreeze after this fraction of the fine-tuning steps)
VARIANTS: dict[str, tuple[bool, tuple[str, ...], float | None]] = {
    "scratch": (False, (), None),
    "frozen": (True, ("^block",), None),
    "finetune": (True, (), None),
    "unfreeze": (True, ("^block",), 0.5),
}
FINETUNE_STEPS = 200
FINETUNE_BATCH = 50


def get_config() -> Config:
    """The pre-training run: experiments/mnist_lenet5.py (LeNet-5 on all of MNIST), shortened to 2 epochs."""
    cfg = load_experiment(Path(__file__).with_name("mnist_lenet5.py"), ["train.epochs=2", "schedule.warmup_epochs=0.5"])
    return dataclasses.replace(cfg, name="transfer_pretrain_mnist")


def finetune_config(variant: str, pretrained: Path, seed: int, target_limit: int) -> Config:
    """One fine-tuning run: FINETUNE_STEPS steps of FINETUNE_BATCH on the first `target_limit` Fashion-MNIST images."""
    load, freeze, unfreeze_fraction = VARIANTS[variant]
    steps_per_epoch = target_limit // FINETUNE_BATCH
    unfreeze = None if unfreeze_fraction is None else unfreeze_fraction * FINETUNE_STEPS / steps_per_epoch
    return dataclasses.replace(
        get_config(),
        data=DataConfig(name="fashion_mnist", batch_size=FINETUNE_BATCH, eval_batch_size=1000,
                        train_limit=target_limit),
        schedule=ScheduleConfig(name="cosine", warmup_epochs=0.05 * FINETUNE_STEPS / steps_per_epoch),
        train=TrainConfig(steps=FINETUNE_STEPS, log_every_steps=100, eval_every_epochs=0, progress=False),
        transfer=TransferConfig(init_from=str(pretrained) if load else None, freeze=freeze,
                                unfreeze_at_epoch=unfreeze),
        seed=seed,
        name=f"transfer_{variant}_{target_limit}_seed{seed}",
    )


def _mean_std(xs: list[float]) -> str:
    if len(xs) == 1:
        return f"{100 * xs[0]:.2f}"
    return f"{100 * statistics.mean(xs):.2f} ± {100 * statistics.stdev(xs):.2f}"


def results_table(pretrain: dict[str, Any], runs: dict[tuple[int, str], list[dict[str, Any]]]) -> str:
    """A markdown table: one row per (target size, variant), test accuracy (%) mean ± std over seeds, run time."""
    first = next(iter(runs.values()))
    lines = [
        f"Pre-training: LeNet-5 on all of MNIST ({pretrain['steps']} steps of {pretrain['batch_size']}), test accuracy "
        f"{100 * pretrain['test_accuracy']:.2f}% ({pretrain['wall_s']:.0f} s wall).",
        f"Fine-tuning: {FINETUNE_STEPS} steps of {FINETUNE_BATCH} on the first N Fashion-MNIST training images; test "
        f"accuracy on all {first[0]['test_count']:,} Fashion-MNIST test images, mean ± sample std over {len(first)} "
        f"seeds.",
        "",
        "| N | start | trained | test accuracy (%) | test loss | s per run |",
        "|---|---|---|---|---|---|",
    ]
    what = {
        "scratch": ("random init", "everything"),
        "frozen": ("MNIST weights", "head only (conv backbone frozen)"),
        "finetune": ("MNIST weights", "everything"),
        "unfreeze": ("MNIST weights", "head; backbone too after half the steps"),
    }
    for (limit, variant), summaries in runs.items():
        start, trained = what[variant]
        acc = _mean_std([s["test_accuracy"] for s in summaries])
        loss = statistics.mean(s["test_loss"] for s in summaries)
        wall = statistics.mean(s["wall_s"] for s in summaries)
        lines.append(f"| {limit:,} | {variant}: {start} | {trained} | {acc} | {loss:.3f} | {wall:.0f} |")
    return "\n".join(lines)


def run(workdir: str | Path, *, overrides: list[str] = (), seeds: int = 3, target_limits: tuple[int, ...] = (100, 1000)) -> str:
    """Pre-trains (or reuses the finished pre-training in workdir/pretrain_mnist), fine-tunes every variant for every
    target size and seed, writes workdir/results.md and returns the table."""
    from jaxcnn.train.loop import train

    workdir = Path(workdir)
    t0 = time.perf_counter()
    pretrained = workdir / "pretrain_mnist"
    pretrain = train(apply_overrides(get_config(), list(overrides)), pretrained)
    runs: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for limit in target_limits:
        for variant in VARIANTS:
            for seed in range(seeds):
                cfg = finetune_config(variant, pretrained, seed, limit)
                runs.setdefault((limit, variant), []).append(train(cfg, workdir / f"{variant}_{limit}_seed{seed}"))
    table = results_table(pretrain, runs)
    table += f"\n\nTotal wall time {time.perf_counter() - t0:.0f} s.\n"
    (workdir / "results.md").write_text(table)
    return table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="runs/transfer_mnist_to_fashion")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override of the pre-training config (repeatable)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--target-limits", default="100,1000",
                   help="comma-separated numbers of Fashion-MNIST training images for fine-tuning")
    p.add_argument("--table", default=None, help="also write the markdown table to this file")
    args = p.parse_args(argv)
    limits = tuple(int(n) for n in args.target_limits.split(","))
    table = run(args.workdir, overrides=args.set, seeds=args.seeds, target_limits=limits)
    print(table)
    if args.table:
        Path(args.table).parent.mkdir(parents=True, exist_ok=True)
        Path(args.table).write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
