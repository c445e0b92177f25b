"""The console progress bar: epoch, step, loss, accuracy, images/s and ETA (tqdm)."""

from __future__ import annotations

import sys
import time
from typing import Any

from tqdm import tqdm


class Progress:
    """One bar over the whole run's optimizer steps; `update` is called at logging intervals only.

    Images/s is measured over the last logging interval; the ETA comes from tqdm's rate over the run.
    """

    def __init__(self, total_steps: int, initial_step: int, batch_size: int, enabled: bool = True, desc: str = "train"):
        self.batch_size = batch_size
        self.enabled = enabled
        self._last_step = initial_step
        self._last_time = time.perf_counter()
        self.bar = tqdm(
            total=total_steps,
            initial=initial_step,
            desc=desc,
            unit="step",
            dynamic_ncols=True,
            disable=not enabled,
            file=sys.stderr,
            mininterval=0.5,
        )

    def update(self, step: int, epoch: int, metrics: dict[str, Any]) -> float:
        """Moves the bar to `step` and shows the metrics; returns images/s since the last update."""
        now = time.perf_counter()
        steps = step - self._last_step
        ips = steps * self.batch_size / max(now - self._last_time, 1e-9)
        self._last_step, self._last_time = step, now
        if self.enabled:
            self.bar.set_postfix(
                epoch=epoch, loss=f"{metrics.get('loss', float('nan')):.4f}",
                acc=f"{metrics.get('accuracy', float('nan')):.4f}", img_s=f"{ips:,.0f}", refresh=False,
            )
            self.bar.update(steps)
        return ips

    def reset_clock(self) -> None:
        """Excludes time spent outside training (evaluation, checkpoints) from the next images/s figure."""
        self._last_time = time.perf_counter()

    def write(self, text: str) -> None:
        if self.enabled:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        self.bar.close()
