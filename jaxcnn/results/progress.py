"""The console progress bar: epoch, step, loss, accuracy, images/s and ETA (tqdm)."""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm


class Progress:
    """One bar over the whole run's optimizer steps; `update` is called at logging intervals only.

    Images/s comes from the caller (the loop times its compiled calls); the ETA comes from tqdm's rate over the run.
    """

    def __init__(self, total_steps: int, initial_step: int, enabled: bool = True, desc: str = "train"):
        self.enabled = enabled
        self._last_step = initial_step
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

    def update(self, step: int, epoch: int, metrics: dict[str, Any], images_per_s: float | None = None) -> None:
        """Moves the bar to `step` and shows the metrics and images/s (None: not measured in this interval)."""
        steps, self._last_step = step - self._last_step, step
        if self.enabled:
            self.bar.set_postfix(
                epoch=epoch, loss=f"{metrics.get('loss', float('nan')):.4f}",
                acc=f"{metrics.get('accuracy', float('nan')):.4f}",
                img_s="-" if images_per_s is None else f"{images_per_s:,.0f}", refresh=False,
            )
            self.bar.update(steps)

    def write(self, text: str) -> None:
        if self.enabled:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        self.bar.close()
