"""Run outputs: config.json, metrics.jsonl (one JSON object per logged step or eval), TensorBoard events, summary.json."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item") and getattr(v, "size", 2) == 1:
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf
    if isinstance(v, Mapping):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def write_json(path: str | Path, obj: Mapping[str, Any]) -> None:
    """Writes atomically (temp file + rename), so a crash never leaves half a file."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_jsonable(obj), indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl (a torn last line, from a killed run, is skipped)."""
    out = []
    p = Path(path)
    if not p.exists():
        return out
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _summary_writer_class() -> type:
    """tensorboardX's SummaryWriter, imported without importing PyTorch.

    tensorboardX's writer module tries `import torch` only to name `torch.Tensor` in type hints; with PyTorch
    installed that import costs 2-3 s of every run's wall time (measured: 2.4 s of a 37 s run). When torch is not
    imported yet, it is hidden for the duration of this import (tensorboardX catches the ImportError) and the
    import system is left as it was, so a later `import torch` works normally.
    """
    if "tensorboardX" in sys.modules or "torch" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # type: ignore[assignment]  # makes `import torch` raise ImportError
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class MetricsWriter:
    """Appends records to metrics.jsonl and mirrors scalars to TensorBoard (tensorboardX) under `tb/`.

    resume_step: the step the run starts from. Records of later steps (logged by an interrupted run after its last
    checkpoint, and logged again after the resume) are dropped from metrics.jsonl, which is rewritten atomically, so
    a resumed run's file holds what an uninterrupted run's holds. TensorBoard's event files are append-only: a
    resumed run writes a new event file that starts with a SessionLog.START event at step resume_step + 1
    (tensorboardX's `purge_step`), on which TensorBoard drops the earlier files' events from that step on.

    Only the main process writes; on other processes every call is a no-op.
    """

    def __init__(self, workdir: str | Path, enabled: bool = True, resume_step: int = 0):
        self.enabled = enabled
        self.workdir = Path(workdir)
        self._tb = None
        if enabled:
            path = self.workdir / "metrics.jsonl"
            resumed = path.exists()
            if resumed:
                truncate_jsonl(path, resume_step)
            self._jsonl = open(path, "a", buffering=1)
            self._tb = _summary_writer_class()(
                logdir=str(self.workdir / "tb"), flush_secs=10, purge_step=resume_step + 1 if resumed else None,
                filename_suffix=f".{os.getpid()}.{resume_step}",  # two writers in one second get two files
            )

    def write(self, kind: str, step: int, values: Mapping[str, Any]) -> None:
        """kind: 'train' or 'eval' (or another label); values: scalars."""
        if not self.enabled:
            return
        values = {k: _jsonable(v) for k, v in values.items()}
        self._jsonl.write(json.dumps({"kind": kind, "step": int(step), **values}) + "\n")
        for k, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self._tb.add_scalar(f"{kind}/{k}", v, int(step))

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


def truncate_jsonl(path: str | Path, last_step: int) -> None:
    """Rewrites a metrics.jsonl atomically without the records of steps after `last_step` (and a torn last line)."""
    path = Path(path)
    kept = [r for r in read_jsonl(path) if int(r.get("step", 0)) <= last_step]
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)


def git_commit(cwd: str | Path | None = None) -> str | None:
    """The HEAD commit of the repository containing jaxcnn (with '-dirty' if there are local changes), or None."""
    cwd = cwd or Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=5)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None
