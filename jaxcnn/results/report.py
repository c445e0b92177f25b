"""Sweep report: results.csv (one row per run), results.md (one row per variant, mean ± std over seeds), plots.

    python -m jaxcnn report runs/pooling        # or build_report("runs/pooling")

Everything is rebuilt from what the runs left on disk (`WORKDIR/<variant>/seed=<k>/`: variant.json, config.json,
summary.json, metrics.jsonl, status.json, error.txt), so a report can be made at any time, also while a sweep
is still running or after it was interrupted. The standard deviation is the sample one (ddof=1) over the seeds
that finished; n says how many that is. Each variant's test accuracy is compared with the first variant's (the
baseline) as the difference of the means with its 95% confidence interval (Welch's t interval, which does not assume
equal variances): an interval that excludes 0 is a difference the seeds resolve.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from jaxcnn.results.writers import read_jsonl, write_json

RUN_COLUMNS = ("status", "test_accuracy", "test_loss", "params", "flops", "train_images_per_s", "wall_s",
               "steps", "epochs", "error")
AGGREGATED = ("test_accuracy", "test_loss", "train_images_per_s", "wall_s")
# Settings shown above the table when every run shares them.
COMMON_KEYS = ("model.name", "data.name", "data.train_limit", "data.test_limit", "train.epochs", "train.steps",
               "data.batch_size", "optim.name", "optim.lr", "schedule.name")


# ---------------------------------------------------------------------------------------------------------
# Reading runs
# ---------------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _flatten(config: Mapping[str, Any]) -> dict[str, Any]:
    """{'optim': {'lr': 0.1}} → {'optim.lr': 0.1} (one level, like jaxcnn.config.flatten_config)."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        if isinstance(v, Mapping):
            out.update({f"{k}.{fk}": fv for fk, fv in v.items()})
        else:
            out[k] = v
    return out


def _run_dirs(workdir: Path) -> list[Path]:
    """Run folders in sweep order (sweep.json), then any others found on disk, sorted."""
    found = sorted({p.parent for name in ("variant.json", "config.json", "summary.json")
                    for p in workdir.glob(f"*/seed=*/{name}")})
    sweep = _read_json(workdir / "sweep.json") or {}
    ordered = [workdir / r["dir"] for r in sweep.get("runs", []) if (workdir / r["dir"]).is_dir()]
    return ordered + [d for d in found if d not in ordered]


def _status(run_dir: Path, summary: Mapping[str, Any] | None) -> tuple[str, str]:
    if summary is not None:
        return "done", ""
    status = _read_json(run_dir / "status.json") or {}
    state = status.get("status", "pending")
    if state == "running":
        state = "incomplete"  # running now, or killed without a chance to say so
    return state, status.get("error", "") if state == "failed" else ""


def collect_runs(workdir: str | Path) -> list[dict[str, Any]]:
    """One record per run folder: variant, seed, status, updates, flat config, summary values, error.

    Returned records: {'variant', 'seed', 'dir', 'status', 'error', 'updates': {key: value}, 'config': {flat},
    'summary': {...} or None}.
    """
    workdir = Path(workdir)
    records = []
    for run_dir in _run_dirs(workdir):
        spec = _read_json(run_dir / "variant.json") or {}
        config = spec.get("config") or _read_json(run_dir / "config.json") or {}
        summary = _read_json(run_dir / "summary.json")
        status, error = _status(run_dir, summary)
        seed_text = run_dir.name.split("=", 1)[1]
        records.append({
            "variant": spec.get("variant", run_dir.parent.name),
            "seed": spec.get("seed", int(seed_text) if seed_text.lstrip("-").isdigit() else seed_text),
            "dir": str(run_dir.relative_to(workdir)),
            "status": status,
            "error": error,
            "updates": spec.get("updates"),
            "config": _flatten(config),
            "summary": summary,
        })
    return records


def varied_keys(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """The config keys the sweep varies: those its variants set (variant.json), else those whose values differ."""
    keys: list[str] = []
    for r in records:
        for k in r.get("updates") or {}:
            if k not in keys:
                keys.append(k)
    if keys or not records:
        return keys
    all_keys = sorted({k for r in records for k in r["config"]})
    return [k for k in all_keys if k not in ("seed", "name")
            and len({json.dumps(r["config"].get(k), sort_keys=True) for r in records}) > 1]


# ---------------------------------------------------------------------------------------------------------
# FLOPs, computed once per variant and cached beside its runs
# ---------------------------------------------------------------------------------------------------------


def model_stats(config: Mapping[str, Any]) -> dict[str, Any]:
    """{'params', 'flops'} of the configured model for one image of its dataset's shape.

    FLOPs are jaxcnn.analysis.summary's count: 2 x multiply-adds of the conv and dense layers, forward pass.
    config: a flat run config ({'model.name': ..., 'data.name': ...}).
    """
    from jaxcnn.analysis.summary import summary
    from jaxcnn.data import DATASET_INFO
    from jaxcnn.models import create_model

    model_section = {k.split(".", 1)[1]: v for k, v in config.items() if k.startswith("model.")}
    name = model_section.pop("name")
    info = DATASET_INFO[config["data.name"]]
    if None in info.shape:
        raise ValueError(f"dataset {config['data.name']!r} has no fixed image shape")
    model = create_model(name, num_classes=info.num_classes, **model_section)
    table = summary(model, (1, *info.shape), xla=False)
    return {"params": int(table.total_params), "flops": int(table.total_flops)}


def _variant_flops(workdir: Path, variant: str, config: Mapping[str, Any], notes: list[str]) -> float | None:
    cache_path = workdir / variant / "model_stats.json"
    key = {k: v for k, v in config.items() if k.startswith("model.") or k == "data.name"}
    cached = _read_json(cache_path)
    if cached and cached.get("key") == key:
        return cached.get("flops")
    try:
        stats = model_stats(config)
    except Exception as e:  # noqa: BLE001 - FLOPs are a nice-to-have column; the table is built without them
        why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        notes.append(f"FLOPs of {variant} not computed ({why})")
        return None
    write_json(cache_path, {"key": key, **stats})
    return stats.get("flops")


# ---------------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------------


def run_rows(records: Sequence[Mapping[str, Any]], keys: Sequence[str],
             flops: Mapping[str, float | None] | None = None) -> list[dict[str, Any]]:
    """One flat row per run: variant, seed, the varied keys' values, then RUN_COLUMNS."""
    rows = []
    for r in records:
        s = r["summary"] or {}
        row = {"variant": r["variant"], "seed": r["seed"]}
        row.update({k: r["config"].get(k, (r.get("updates") or {}).get(k)) for k in keys})
        row.update({
            "status": r["status"],
            "test_accuracy": s.get("test_accuracy"),
            "test_loss": s.get("test_loss"),
            "params": s.get("params"),
            "flops": (flops or {}).get(r["variant"]),
            "train_images_per_s": s.get("train_images_per_s"),
            "wall_s": s.get("wall_s"),
            "steps": s.get("steps"),
            "epochs": s.get("epochs"),
            "error": r["error"],
        })
        rows.append(row)
    return rows


def mean_std(values: Iterable[float | None]) -> tuple[float, float, int]:
    """(mean, sample standard deviation with ddof=1, n) over the finite values; std is NaN for n < 2."""
    vals = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(float(v))]
    if not vals:
        return float("nan"), float("nan"), 0
    mean = sum(vals) / len(vals)
    if len(vals) < 2:
        return mean, float("nan"), len(vals)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)), len(vals)


def difference_interval(values: Iterable[float | None], baseline: Iterable[float | None],
                        confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean(values) - mean(baseline), low, high): Welch's t interval for the difference of two means.

    The half-width is t * sqrt(s1^2/n1 + s2^2/n2) with t the two-sided `confidence` quantile of Student's t at the
    Welch-Satterthwaite degrees of freedom. Both samples need 2 finite values or more, else low and high are NaN
    (and the difference too when either is empty). Two samples with no spread give a zero-width interval.
    """
    from scipy import stats  # a dependency of jax

    m1, s1, n1 = mean_std(values)
    m2, s2, n2 = mean_std(baseline)
    diff = m1 - m2 if n1 and n2 else float("nan")
    if n1 < 2 or n2 < 2:
        return diff, float("nan"), float("nan")
    v1, v2 = s1 * s1 / n1, s2 * s2 / n2
    se = math.sqrt(v1 + v2)
    if se == 0.0:
        return diff, diff, diff
    dof = (v1 + v2) ** 2 / (v1 * v1 / (n1 - 1) + v2 * v2 / (n2 - 1))
    half = float(stats.t.ppf(0.5 + confidence / 2, dof)) * se
    return diff, diff - half, diff + half


def format_difference(diff: float, low: float, high: float, scale: float = 1.0, digits: int = 2) -> str:
    """'+1.23 [+0.45, +2.01]' (scaled), '+1.23 [–]' without an interval, '–' without a difference."""
    if not math.isfinite(diff):
        return "–"
    text = f"{scale * diff:+.{digits}f}"
    if not (math.isfinite(low) and math.isfinite(high)):
        return text + " [–]"
    return text + f" [{scale * low:+.{digits}f}, {scale * high:+.{digits}f}]"


def aggregate(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str] = AGGREGATED) -> list[dict[str, Any]]:
    """One row per variant (in first-appearance order) over its finished ('done') runs.

    Each row: 'variant', 'n' (finished seeds), 'failed', 'incomplete', 'seeds', '<metric>_mean', '<metric>_std'
    for each metric, 'params' and 'flops' (the same for every seed of a variant), 'values' (test accuracy per seed).
    """
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["variant"], []).append(row)
    out = []
    for variant, group in groups.items():
        done = [r for r in group if r["status"] == "done"]
        agg: dict[str, Any] = {
            "variant": variant, "n": len(done),
            "failed": sum(r["status"] == "failed" for r in group),
            "incomplete": sum(r["status"] not in ("done", "failed") for r in group),
            "seeds": [r["seed"] for r in done],
            "values": [r["test_accuracy"] for r in done if r.get("test_accuracy") is not None],
            "params": next((r["params"] for r in done if r.get("params") is not None), None),
            "flops": next((r["flops"] for r in group if r.get("flops") is not None), None),
        }
        for m in metrics:
            agg[f"{m}_mean"], agg[f"{m}_std"], _ = mean_std(r.get(m) for r in done)
        out.append(agg)
    return out


def _csv_value(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v)
    return v


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """results.csv: the rows' keys as the header (from the first row), empty cells for missing values."""
    path = Path(path)
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(row.get(k)) for k in columns})
    return path


def format_count(n: float | None) -> str:
    """61,706 for parameters; 4.2 M / 1.3 G for FLOPs-sized numbers."""
    if n is None or not math.isfinite(n):
        return "–"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.3g}"


def format_mean_std(mean: float, std: float, scale: float = 1.0, digits: int = 2) -> str:
    if not math.isfinite(mean):
        return "–"
    text = f"{scale * mean:.{digits}f}"
    return text + (f" ± {scale * std:.{digits}f}" if math.isfinite(std) else " ± –")


def results_markdown(agg: Sequence[Mapping[str, Any]], records: Sequence[Mapping[str, Any]], title: str,
                     notes: Sequence[str] = ()) -> str:
    """The results.md text: a header with the shared settings, then one row per variant."""
    n_done = sum(r["status"] == "done" for r in records)
    n_failed = sum(r["status"] == "failed" for r in records)
    n_other = len(records) - n_done - n_failed
    lines = [f"# {title}", ""]
    counts = f"{n_done} of {len(records)} runs finished"
    counts += f", {n_failed} failed" if n_failed else ""
    counts += f", {n_other} not finished" if n_other else ""
    lines.append(f"{counts}. Each row: mean ± sample standard deviation (ddof=1) over the n finished seeds.")
    baseline = agg[0] if agg else None
    if baseline is not None:
        lines.append(f"Δ: the variant's mean test accuracy minus {baseline['variant']}'s (the baseline), in points, "
                     "with its 95% confidence interval [low, high] (Welch's t interval); an interval that excludes 0 "
                     "is a difference these seeds resolve.")
    lines.append("")
    common = []
    for k in COMMON_KEYS:
        vals = {json.dumps(r["config"].get(k)) for r in records if r["config"]}
        if len(vals) == 1 and (v := json.loads(next(iter(vals)))) is not None:
            common.append(f"{k}={v}")
    summaries = [r["summary"] for r in records if r["summary"]]
    if summaries:
        devices = sorted({f"{s.get('device_count', '?')} x {(s.get('devices') or ['?'])[0]}" for s in summaries})
        jax_versions = sorted({str(s.get("jax_version")) for s in summaries})
        common.append(f"devices: {', '.join(devices)}; jax {', '.join(jax_versions)}")
    if common:
        lines += ["Settings shared by all runs: " + "; ".join(common) + ".", ""]
    lines.append("| variant | n | test accuracy (%) | Δ (95% CI) | test loss | params | FLOPs/image (fwd) | "
                 "train images/s | time/run (s) |")
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for a in agg:
        n = f"{a['n']}" + (f" ({a['failed']} failed)" if a["failed"] else "")
        params = "–" if a["params"] is None else f"{int(a['params']):,}"
        ips, wall = a["train_images_per_s_mean"], a["wall_s_mean"]
        delta = ("baseline" if a is baseline else
                 format_difference(*difference_interval(a["values"], baseline["values"]), scale=100.0))
        cells = [
            a["variant"], n, format_mean_std(a["test_accuracy_mean"], a["test_accuracy_std"], 100.0), delta,
            format_mean_std(a["test_loss_mean"], a["test_loss_std"], digits=4), params, format_count(a["flops"]),
            f"{ips:,.0f}" if math.isfinite(ips) else "–", f"{wall:.1f}" if math.isfinite(wall) else "–",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    failed = [r for r in records if r["status"] == "failed"]
    if failed:
        lines += ["", "Failed runs (details in each run's error.txt):", ""]
        lines += [f"- `{r['dir']}`: {r['error']}" for r in failed]
    if notes:
        lines += ["", *[f"Note: {n}" for n in notes]]
    lines += ["", "Plots: accuracy.png (accuracy per variant), curves.png (learning curves per variant).", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Learning curves and the whole report
# ---------------------------------------------------------------------------------------------------------


def learning_curve(run_dir: str | Path) -> dict[str, list[float]]:
    """Train loss and test accuracy against epochs from a run's metrics.jsonl.

    A resumed run may have logged some steps twice (before the interruption and again after): the last wins.
    """
    latest: dict[tuple[str, int], Mapping[str, Any]] = {}
    for rec in read_jsonl(Path(run_dir) / "metrics.jsonl"):
        if "kind" in rec and "step" in rec:
            latest[(rec["kind"], int(rec["step"]))] = rec
    train = sorted((step, r) for (kind, step), r in latest.items() if kind == "train")
    epoch_of = {step: float(r["epoch"]) for step, r in train if "epoch" in r}
    per_step = [e / s for s, e in epoch_of.items() if s > 0]
    steps_per_epoch = 1.0 / per_step[-1] if per_step and per_step[-1] > 0 else None
    test = sorted((step, r) for (kind, step), r in latest.items() if kind == "test")

    def epoch(step: int) -> float:
        if step in epoch_of:
            return epoch_of[step]
        return step / steps_per_epoch if steps_per_epoch else float(step)

    def finite(v: Any) -> bool:
        return isinstance(v, (int, float)) and math.isfinite(v)

    return {
        "train_epoch": [epoch(s) for s, r in train if finite(r.get("loss"))],
        "train_loss": [float(r["loss"]) for s, r in train if finite(r.get("loss"))],
        "test_epoch": [epoch(s) for s, r in test if finite(r.get("accuracy"))],
        "test_accuracy": [float(r["accuracy"]) for s, r in test if finite(r.get("accuracy"))],
    }


def build_report(workdir: str | Path, flops: bool = True, title: str | None = None) -> dict[str, Path]:
    """Rebuilds results.csv, results.md, accuracy.png and curves.png in `workdir` from its run folders.

    Returns {'csv', 'markdown', 'accuracy_plot', 'curves_plot'} → paths. FLOPs per variant come from
    jaxcnn.analysis.summary (cached in <variant>/model_stats.json); flops=False leaves the column empty.
    """
    from jaxcnn.results.plots import plot_accuracy, plot_learning_curves

    workdir = Path(workdir)
    if not workdir.is_dir():
        raise FileNotFoundError(f"report: {str(workdir)!r} is not a folder; pass a sweep's --workdir")
    records = collect_runs(workdir)
    if not records:
        raise FileNotFoundError(f"report: no runs in {workdir} (expected folders <variant>/seed=<k>/ written by "
                                f"`python -m jaxcnn sweep EXPERIMENT.py --workdir {workdir}`)")
    keys = varied_keys(records)
    notes: list[str] = []
    flops_by_variant: dict[str, float | None] = {}
    if flops:
        for r in records:
            if r["variant"] not in flops_by_variant and r["config"]:
                flops_by_variant[r["variant"]] = _variant_flops(workdir, r["variant"], r["config"], notes)
    rows = run_rows(records, keys, flops_by_variant)
    agg = aggregate(rows)
    sweep = _read_json(workdir / "sweep.json") or {}
    name = title or Path(sweep.get("experiment", workdir.name)).stem
    paths = {
        "csv": write_csv(rows, workdir / "results.csv"),
        "markdown": workdir / "results.md",
        "accuracy_plot": plot_accuracy(agg, workdir / "accuracy.png", title=name),
        "curves_plot": plot_learning_curves(
            {a["variant"]: [learning_curve(workdir / r["dir"]) for r in records
                            if r["variant"] == a["variant"] and r["status"] == "done"] for a in agg},
            workdir / "curves.png", title=name),
    }
    paths["markdown"].write_text(results_markdown(agg, records, f"{name}: results", notes))
    for n in notes:
        print(f"report: {n}", file=sys.stderr)
    return paths


__all__ = ["aggregate", "build_report", "collect_runs", "learning_curve", "mean_std", "results_markdown", "run_rows",
           "varied_keys", "write_csv"]
