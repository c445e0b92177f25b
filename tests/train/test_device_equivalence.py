"""What "the same as one device" means: every strategy on 8 fake CPU devices against a plain one-device run.

The reference is `jax.jit(make_train_step(opts))` on one device, with the model built without an axis name (no
strategy code in it). Differences are measured per leaf relative to the leaf's largest magnitude,
``max|got - ref| / max|ref|``, after 1 step (the per-step rounding) and after a run of `RUN` steps (its growth).
The tolerances asserted here are the ones README.md and docs/architecture.md state.

- Smooth models (tanh MLP; a ResNet with BatchNorm and GELU): the strategies run the same kernels up to the
  order of their sums (per-device partial sums, then an all-reduce), and the differences stay at float32
  rounding over the run.
- ReLU / max-pool models: the same per step; over a run a pre-activation within rounding of 0 (or of a max-pool
  tie) takes the other branch and changes a gradient by a finite amount, which later steps carry on. The test
  bounds that for the ReLU/max-pool LeNet with BatchNorm over `RUN` steps; it is not a bound for every model.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest

from jaxcnn.config import OptimConfig, ParallelConfig, ScheduleConfig
from jaxcnn.models import create_model
from jaxcnn.train import parallel
from jaxcnn.train.optim import make_optimizer
from jaxcnn.train.state import create_train_state
from jaxcnn.train.step import StepOptions, make_train_step

sys.path.insert(0, str(Path(__file__).parent))
from parallel_helpers import SMALL_RESNET, numpy_variables

BATCH = 32  # 4 examples per device on 8 devices
RUN = 24
OPTS = StepOptions(num_classes=3, mean=(120.0,) * 3, std=(70.0,) * 3)
MODELS = {
    "mlp_tanh": ("mlp", {"num_classes": 3, "hidden": (32, 16), "act": "tanh"}, (8, 8, 3)),
    "resnet_bn_gelu": ("resnet20", {**SMALL_RESNET, "act": "gelu"}, (8, 8, 3)),
    "lenet_bn_relu_maxpool": ("lenet5", {"num_classes": 3, "norm": "batch", "act": "relu", "pool": "max",
                                         "conv_channels": (4, 8), "head_hidden": (16,), "pad_to": None}, (16, 16, 3)),
}
# (params, batch_stats) relative tolerances, after 1 step and after RUN steps; loss: absolute, every step.
ONE_STEP = (1e-6, 5e-6)
OVER_RUN = {"mlp_tanh": (2e-6, 5e-6), "resnet_bn_gelu": (2e-6, 5e-6), "lenet_bn_relu_maxpool": (1e-5, 2e-5)}
LOSS = 1e-6


def host_state(model: Any, image: tuple[int, ...]) -> Any:
    tx, _ = make_optimizer(OptimConfig(name="sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
                           ScheduleConfig(name="constant"), steps_per_epoch=10, total_steps=100)
    return jax.tree_util.tree_map(np.asarray, create_train_state(model, tx, numpy_variables(model, image)))


def batches(image: tuple[int, ...], n: int = RUN, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Learnable batches: one random prototype image per class plus noise."""
    rng = np.random.default_rng(seed)
    protos = rng.integers(0, 256, (3, *image))
    out = []
    for _ in range(n):
        label = rng.integers(0, 3, BATCH).astype(np.int32)
        image_ = np.clip(protos[label] * 0.5 + rng.integers(0, 128, (BATCH, *image)), 0, 255).astype(np.uint8)
        out.append({"image": image_, "label": label})
    return out


def run(strategy_name: str, key: str) -> tuple[dict[int, Any], np.ndarray]:
    """({1: (params, batch_stats), RUN: ...} as host numpy, per-step losses) for a strategy or 'reference'."""
    arch, knobs, image = MODELS[key]
    if strategy_name == "reference":
        model = create_model(arch, **knobs)
        state = jax.device_put(host_state(model, image), jax.devices()[0])
        step, put, get = jax.jit(make_train_step(OPTS)), (lambda b: b), jax.device_get
    else:
        strategy = parallel.make_strategy(ParallelConfig(strategy=strategy_name), BATCH)
        model = create_model(arch, **knobs, **strategy.model_overrides)
        state = strategy.place_state(host_state(model, image))
        step = strategy.compile_train_step(make_train_step(OPTS, axis_name=strategy.axis_name))
        put, get = strategy.put_batch, strategy.unreplicate
    snapshots, losses = {}, []
    for i, batch in enumerate(batches(image)):
        state, metrics = step(state, put(batch), jax.random.PRNGKey(i))
        losses.append(float(metrics["loss"]))
        if i + 1 in (1, RUN):
            host = get(state)
            snapshots[i + 1] = tuple(jax.tree_util.tree_map(np.asarray, t) for t in (host.params, host.batch_stats))
    return snapshots, np.array(losses)


def relative_difference(got: Any, want: Any) -> float:
    """max over leaves of max|got - want| / max|want| (0 for an empty tree)."""
    pairs = zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want))
    return max((float(np.max(np.abs(g - w)) / max(float(np.max(np.abs(w))), 1e-30)) for g, w in pairs), default=0.0)


@pytest.fixture(scope="module", params=list(MODELS))
def model_runs(request: pytest.FixtureRequest) -> tuple[str, Any, dict[str, Any]]:
    key = request.param
    return key, run("reference", key), {name: run(name, key) for name in parallel.STRATEGIES}


def test_every_strategy_matches_one_device_per_step_and_over_a_run(model_runs: Any) -> None:
    assert jax.device_count() == 8
    key, (ref, ref_loss), runs = model_runs
    assert relative_difference(ref[RUN][0], ref[1][0]) > 1e-3  # the run moves the parameters: not vacuous
    for name, (got, loss) in runs.items():
        for after, (p_tol, s_tol) in ((1, ONE_STEP), (RUN, OVER_RUN[key])):
            params, stats = relative_difference(got[after][0], ref[after][0]), relative_difference(
                got[after][1], ref[after][1])
            assert params <= p_tol, f"{key}, {name}, after {after} steps: params differ by {params:.1e} (relative)"
            assert stats <= s_tol, f"{key}, {name}, after {after} steps: batch_stats differ by {stats:.1e} (relative)"
        np.testing.assert_allclose(loss, ref_loss, rtol=0, atol=LOSS, err_msg=f"{key}, {name}: per-step loss")


def test_batchnorm_models_have_running_statistics(model_runs: Any) -> None:
    key, (ref, _), _ = model_runs
    has_bn = key != "mlp_tanh"
    assert bool(jax.tree_util.tree_leaves(ref[RUN][1])) == has_bn


def test_synced_batchnorm_is_jaxcnns_closed_form() -> None:
    """Under pmap / shard_map the models' BatchNorm is jaxcnn's (the backend's closed form with its per-channel sums
    all-reduced), with the variables and update rule of the one-device layer."""
    from jaxcnn.nn import layers

    norm = layers.make_norm("batch", train=True, axis_name=parallel.BATCH_AXIS, activation=jax.nn.relu)
    assert isinstance(norm, layers.BatchNorm) and norm.axis_name == parallel.BATCH_AXIS and norm.relu
