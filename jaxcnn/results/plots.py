"""Sweep plots, written as PNG with matplotlib's Agg canvas (no display, no global backend switch).

    plot_accuracy([{"variant": "model.pool=max", "values": [0.91, 0.92]}, ...], "accuracy.png")
    plot_learning_curves({"model.pool=max": [curve_seed0, curve_seed1], ...}, "curves.png")

A curve is `{"train_epoch": [...], "train_loss": [...], "test_epoch": [...], "test_accuracy": [...]}` for one run.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _sample_std(values: Sequence[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def plot_accuracy(variants: Sequence[Mapping[str, Any]], path: str | Path, title: str = "",
                  metric_label: str = "test accuracy (%)") -> Path:
    """One row per variant: mean test accuracy (%) with ±1 sample-std error bars, and each seed as a dot.

    variants: [{'variant': name, 'values': [accuracy in 0..1 per seed]}], in table order (the first on top).
    """
    rows = [v for v in variants if len(v["values"])]
    fig = Figure(figsize=(7.0, 0.9 + 0.45 * max(1, len(rows))))
    ax = fig.add_subplot()
    for i, v in enumerate(rows):
        vals = 100.0 * np.asarray(v["values"], dtype=float)
        y = len(rows) - 1 - i
        ax.errorbar([vals.mean()], [y], xerr=[_sample_std(vals)], fmt="o", color="C0", capsize=4, markersize=7,
                    zorder=3)
        ax.scatter(vals, np.full(len(vals), y + 0.18), s=12, color="C1", alpha=0.8, zorder=2)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{v['variant']} (n={len(v['values'])})" for v in reversed(rows)], fontsize=8)
    ax.set_xlabel(f"{metric_label}: mean ± sample std (dots: seeds)")
    ax.set_ylim(-0.6, len(rows) - 0.4)
    ax.grid(axis="x", alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path)


def _mean_curve(curves: Sequence[Mapping[str, Sequence[float]]], x_key: str, y_key: str
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Mean and sample std over seeds at the x positions every seed has (runs of a variant log the same steps)."""
    series = [dict(zip(c.get(x_key, []), c.get(y_key, []))) for c in curves]
    series = [s for s in series if s]
    if not series:
        return None
    xs = sorted(set.intersection(*(set(s) for s in series)))
    if not xs:
        return None
    ys = np.array([[s[x] for x in xs] for s in series], dtype=float)
    std = ys.std(axis=0, ddof=1) if len(series) > 1 else np.zeros(len(xs))
    return np.asarray(xs, dtype=float), ys.mean(axis=0), std


def plot_learning_curves(curves: Mapping[str, Sequence[Mapping[str, Sequence[float]]]], path: str | Path,
                         title: str = "") -> Path:
    """Train loss and test accuracy against epochs, one line per variant (mean over seeds, band: ±1 sample std).

    curves: variant → one curve per seed (see the module docstring).
    """
    fig = Figure(figsize=(11.0, 4.2))
    ax_loss = fig.add_subplot(1, 2, 1)
    ax_acc = fig.add_subplot(1, 2, 2, sharex=ax_loss)  # one epoch axis, also when the test set is seen only at the end
    for i, (variant, runs) in enumerate(curves.items()):
        color = f"C{i % 10}"
        for ax, x_key, y_key, scale in ((ax_loss, "train_epoch", "train_loss", 1.0),
                                        (ax_acc, "test_epoch", "test_accuracy", 100.0)):
            mc = _mean_curve(runs, x_key, y_key)
            if mc is None:
                continue
            x, mean, std = mc
            ax.plot(x, scale * mean, color=color, label=f"{variant} (n={len(runs)})",
                    marker="o" if len(x) < 12 else None, markersize=3)
            if np.any(std > 0):
                ax.fill_between(x, scale * (mean - std), scale * (mean + std), color=color, alpha=0.2, linewidth=0)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("train loss (mean over logging interval)")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("test accuracy (%)")
    losses = [line.get_ydata() for line in ax_loss.get_lines()]
    if losses and all(np.all(np.asarray(y) > 0) for y in losses):
        ax_loss.set_yscale("log")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    handles, labels = ax_acc.get_legend_handles_labels()
    if not handles:
        handles, labels = ax_loss.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(3, len(labels)), fontsize=8,
                   bbox_to_anchor=(0.5, -0.02 - 0.045 * math.ceil(len(labels) / 3)))
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)
