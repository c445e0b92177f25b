"""One process of the multi-host test (tests/train/test_multihost.py), also importable for its reference run.

    python tests/train/multihost_worker.py PORT NUM_PROCESSES PROCESS_ID OUT_DIR STRATEGY[,STRATEGY...]

Starts `jax.distributed` through `init_distributed` on `localhost:PORT` with two CPU devices per process,
trains a small BatchNorm CNN for `STEPS` steps of a global batch of `BATCH` under each strategy, each process
building only the rows of every batch that its devices hold, evaluates a split of `EVAL_N` examples (padded
and masked), and, on process 0 only, writes `OUT_DIR/<strategy>.npz` (parameters, BatchNorm statistics,
optimizer state, metrics, eval sums). Every process writes `OUT_DIR/process<i>.json` with what it saw.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

STEPS = 3
BATCH = 8
EVAL_N = 11  # no device count from 2 to 8 divides it
EVAL_BATCH = 4
IMAGE = (8, 8, 3)
NUM_CLASSES = 3


def make_rows(step: int, rows: Any) -> dict[str, Any]:
    """The examples at global positions `rows` of training batch `step`: a pure function of (step, row)."""
    import numpy as np

    images = np.stack([np.random.default_rng([7, step, int(r)]).integers(0, 256, IMAGE) for r in rows])
    labels = np.array([(step + int(r)) % NUM_CLASSES for r in rows], np.int32)
    return {"image": images.astype(np.uint8), "label": labels}


def eval_rows(batch_index: int, rows: Any) -> dict[str, Any]:
    """Rows of eval batch `batch_index` (global batch EVAL_BATCH): examples past EVAL_N are masked padding."""
    import numpy as np

    pos = batch_index * EVAL_BATCH + np.asarray(rows)
    mask = pos < EVAL_N
    batch = make_rows(1000, np.where(mask, pos, 0))
    batch["image"] = np.where(mask[:, None, None, None], batch["image"], 0).astype(np.uint8)
    batch["mask"] = mask
    return batch


def build_model(**knobs: Any) -> Any:
    """A small ResNet-like CNN: conv-BN-relu, a residual conv-BN block, global average pool, dense."""
    import flax.linen as nn

    class SmallResNet(nn.Module):
        bn_axis_name: str | None = None
        num_classes: int = NUM_CLASSES

        @nn.compact
        def __call__(self, x: Any, train: bool = False) -> Any:
            def norm() -> nn.Module:
                return nn.BatchNorm(use_running_average=not train, momentum=0.9, axis_name=self.bn_axis_name)

            x = nn.relu(norm()(nn.Conv(8, (3, 3), use_bias=False)(x)))
            y = nn.relu(norm()(nn.Conv(8, (3, 3), use_bias=False)(x)))
            y = norm()(nn.Conv(8, (3, 3), use_bias=False)(y))
            x = nn.relu(x + y)
            return nn.Dense(self.num_classes)(x.mean(axis=(1, 2)))

    return SmallResNet(**knobs)


def run(strategy_name: str, num_devices: int | None = None) -> dict[str, Any]:
    """Trains STEPS steps and evaluates under `strategy_name`; returns host numpy results (every process)."""
    import jax
    import numpy as np
    import optax

    from jaxcnn.config import ParallelConfig
    from jaxcnn.train import parallel
    from jaxcnn.train.state import create_train_state
    from jaxcnn.train.step import StepOptions, make_eval_step, make_train_step

    strategy = parallel.make_strategy(ParallelConfig(strategy=strategy_name, num_devices=num_devices), BATCH)
    variables = jax.jit(build_model().init, static_argnames="train")(
        jax.random.PRNGKey(0), np.zeros((1, *IMAGE), np.float32), train=False
    )
    variables = jax.tree_util.tree_map(np.asarray, variables)
    tx = optax.sgd(0.1, momentum=0.9)
    state = create_train_state(build_model(**strategy.model_overrides), tx, variables)
    opts = StepOptions(num_classes=NUM_CLASSES, mean=(120.0,) * 3, std=(70.0,) * 3)
    train_step = strategy.compile_train_step(make_train_step(opts, axis_name=strategy.axis_name))
    eval_step = strategy.compile_eval_step(make_eval_step(opts, axis_name=strategy.axis_name))
    state = strategy.place_state(state)

    rows = strategy.process_rows()
    losses = []
    for step in range(STEPS):
        local = make_rows(step, range(rows.start, rows.stop))  # only this process's rows
        state, metrics = train_step(state, strategy.put_batch(local), jax.random.PRNGKey(step))
        losses.append(float(np.asarray(metrics["loss"])))
    eval_rows_here = strategy.process_rows(EVAL_BATCH)
    sums = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
    for b in range(-(-EVAL_N // EVAL_BATCH)):
        local = eval_rows(b, range(eval_rows_here.start, eval_rows_here.stop))
        out = eval_step(state, strategy.put_batch(local, EVAL_BATCH))
        sums = {k: sums[k] + float(np.asarray(out[k])) for k in sums}

    host = strategy.unreplicate(state)
    leaves = jax.tree_util.tree_leaves((host.params, host.batch_stats, host.opt_state))
    replicas_agree = all(
        all(np.array_equal(r[0], q) for q in strategy.replicas(x))
        for x in jax.tree_util.tree_leaves((state.params, state.batch_stats, state.opt_state))
        for r in [strategy.replicas(x)]
    )
    return {
        "leaves": [np.asarray(x) for x in leaves],
        "losses": np.array(losses),
        "eval": np.array([sums["loss_sum"], sums["correct"], sums["count"]]),
        "rows": (rows.start, rows.stop),
        "replicas_agree": replicas_agree,
        "main": strategy.is_main_process,
        "process_index": strategy.process_index,
        "num_devices": strategy.num_devices,
    }


def main(argv: list[str]) -> None:
    port, num_processes, process_id, out_dir, strategies = argv
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from jaxcnn.config import ParallelConfig
    from jaxcnn.train import parallel

    started = parallel.init_distributed(
        ParallelConfig(
            distributed="auto",
            coordinator_address=f"localhost:{port}",
            num_processes=int(num_processes),
            process_id=int(process_id),
        )
    )
    import jax
    import numpy as np

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
