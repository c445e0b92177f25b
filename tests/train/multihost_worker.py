"""One process of the multi-host test (tests/train/test_multihost.py), also importable for its reference run.

    python tests/train/multihost_worker.py PORT NUM_PROCESSES PROCESS_ID OUT_DIR STRATEGY[,STRATEGY...]

Starts `jax.distributed` through `init_distributed` on `localhost:PORT` with two CPU devices per process (gloo
collectives across processes), then under each strategy trains the small ResNet of parallel_helpers.py for
`STEPS` steps of a global batch of `BATCH`, each process building only the rows of every batch that its devices
hold, and evaluates a split of `EVAL_N` examples (padded and masked). Process 0 alone writes the results,
`OUT_DIR/<strategy>.npz` (parameters, BatchNorm statistics, optimizer state, losses, eval sums); every process
also writes `OUT_DIR/process<i>.json`, what it saw, for the test to check.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # before jax creates its CPU client: two devices, CPU only
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    os.environ["JAX_PLATFORMS"] = "cpu"

import jax
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from parallel_helpers import CLASSES, IMAGE, numpy_variables, small_resnet

from jaxcnn.config import ParallelConfig
from jaxcnn.data.pipeline import put_stacked
from jaxcnn.train import parallel
from jaxcnn.train.state import create_train_state
from jaxcnn.train.step import StepOptions, make_eval_step, make_train_step

STEPS = 3
BATCH = 8
EVAL_N = 11  # no device count from 2 to 8 divides it
EVAL_BATCH = 4


def make_rows(step: int, rows: Any) -> dict[str, np.ndarray]:
    """The examples at global positions `rows` of training batch `step`: a pure function of (step, row)."""
    images = np.stack([np.random.default_rng([7, step, int(r)]).integers(0, 256, IMAGE) for r in rows])
    labels = np.array([(step + int(r)) % CLASSES for r in rows], np.int32)
    return {"image": images.astype(np.uint8), "label": labels}


def eval_rows(batch_index: int, rows: Any) -> dict[str, np.ndarray]:
    """Rows of eval batch `batch_index` (global batch EVAL_BATCH): positions past EVAL_N are masked padding."""
    pos = batch_index * EVAL_BATCH + np.asarray(rows)
    mask = pos < EVAL_N
    batch = make_rows(1000, np.where(mask, pos, 0))
    batch["image"] = np.where(mask[:, None, None, None], batch["image"], 0).astype(np.uint8)
    batch["mask"] = mask
    return batch


def run(strategy_name: str, num_devices: int | None = None) -> dict[str, Any]:
    """Trains STEPS steps and evaluates under `strategy_name`; returns host NumPy results (on every process).

    A name ending in '-steps' ('jit-steps') trains through `compile_train_steps` (the loop `jaxcnn train` runs:
    the steps inside one compiled call, over stacked global batches [STEPS, B, ...]) instead of one
    `compile_train_step` call per step.
    """
    name, _, mode = strategy_name.partition("-")
    strategy = parallel.make_strategy(ParallelConfig(strategy=name, num_devices=num_devices), BATCH)
    model = small_resnet(**strategy.model_overrides)
    state = create_train_state(model, optax.sgd(0.1, momentum=0.9), numpy_variables(model))
    opts = StepOptions(num_classes=CLASSES, mean=(120.0,) * 3, std=(70.0,) * 3)
    eval_step = strategy.compile_eval_step(make_eval_step(opts, axis_name=strategy.axis_name))
    state = strategy.place_state(state)

    rows = strategy.process_rows()
    losses = []
    if mode == "steps":
        train_steps = strategy.compile_train_steps(make_train_step(opts, axis_name=strategy.axis_name))
        local = [make_rows(step, range(rows.start, rows.stop)) for step in range(STEPS)]
        batches = put_stacked({k: np.stack([b[k] for b in local]) for k in local[0]}, strategy.batch_sharding, BATCH)
        state, sums = train_steps(state, batches, 0, 1, jax.random.PRNGKey(0), 0)  # one step, then the rest at once
        losses.append(float(np.asarray(sums["loss"])))
        state, sums = train_steps(state, batches, 1, STEPS - 1, jax.random.PRNGKey(0), 1)
        losses.append(float(np.asarray(sums["loss"])))  # the sum of steps 1 .. STEPS-1
    else:
        train_step = strategy.compile_train_step(make_train_step(opts, axis_name=strategy.axis_name))
        for step in range(STEPS):
            local = make_rows(step, range(rows.start, rows.stop))  # only this process's rows
            state, metrics = train_step(state, strategy.put_batch(local), jax.random.PRNGKey(step))
            losses.append(float(np.asarray(metrics["loss"])))
    eval_rows_here = strategy.process_rows(EVAL_BATCH)
    sums = np.zeros(3)
    for b in range(-(-EVAL_N // EVAL_BATCH)):
        local = eval_rows(b, range(eval_rows_here.start, eval_rows_here.stop))
        out = eval_step(state, strategy.put_batch(local, EVAL_BATCH))
        sums += [float(np.asarray(out[k])) for k in ("loss_sum", "correct", "count")]

    compared = (state.params, state.batch_stats, state.opt_state)
    replicas = [strategy.replicas(x) for x in jax.tree_util.tree_leaves(compared)]
    host = strategy.unreplicate(state)
    return {
        "leaves": [np.asarray(x) for x in jax.tree_util.tree_leaves((host.params, host.batch_stats, host.opt_state))],
        "losses": np.array(losses),
        "eval": sums,
        "rows": (rows.start, rows.stop),
        "replicas_agree": all(all(np.array_equal(r[0], q) for q in r[1:]) for r in replicas),
        "main": strategy.is_main_process,
    }


def main(argv: list[str]) -> None:
    port, num_processes, process_id, out_dir, strategies = argv
    started = parallel.init_distributed(
        ParallelConfig(coordinator_address=f"localhost:{port}", num_processes=int(num_processes),
                       process_id=int(process_id))
    )
    out = Path(out_dir)
    report: dict[str, Any] = {
        "started": started,
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "runs": {},
    }
    for name in strategies.split(","):
        result = run(name)
        report["runs"][name] = {
            "rows": list(result["rows"]),
            "replicas_agree": result["replicas_agree"],
            "losses": result["losses"].tolist(),
            "eval": result["eval"].tolist(),
        }
        if result["main"]:  # only process 0 writes results
            np.savez(out / f"{name}.npz", *result["leaves"], losses=result["losses"], eval=result["eval"])
    (out / f"process{process_id}.json").write_text(json.dumps(report))
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
