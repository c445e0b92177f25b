"""Several train steps per compiled call (`Strategy.compile_train_steps`, `make_multi_step`) against one call per step.

The reference is `jax.jit(make_train_step(opts))` called once per step on one device with the keys
``fold_in(base, step)`` that `jaxcnn train` has always used: the loop inside one call must train on the same
batches with the same keys and give the same parameters, statistics, optimizer state and metric sums.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest

from jaxcnn.config import ParallelConfig
from jaxcnn.data.dataset import ArrayDataset
from jaxcnn.data.pipeline import DeviceEpochLoader, put_stacked
from jaxcnn.train import parallel
from jaxcnn.train.step import StepOptions, make_train_step

sys.path.insert(0, str(Path(__file__).parent))
from parallel_helpers import CLASSES, IMAGE, small_resnet  # noqa: E402
from test_parallel import BATCH, OPTS, assert_trees_close, batches, compared, init_host_state  # noqa: E402

STEPS = 5
CHUNKS = (1, 3, 1)  # calls of 1, 3 and 1 steps: the loop's first call, a middle one, a last one
BASE = jax.random.PRNGKey(7)


def stacked(data: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.stack([b[k] for b in data]) for k in data[0]}


def per_step_reference(opts: StepOptions, data: list[dict[str, np.ndarray]]) -> tuple[Any, list[Any]]:
    """One jitted call per step on one device, no strategy: (final host state, per-step metrics)."""
    state = jax.device_put(init_host_state(small_resnet()), jax.devices()[0])
    step = jax.jit(make_train_step(opts))
    metrics = []
    for i, b in enumerate(data):
        state, m = step(state, b, jax.random.fold_in(BASE, i))
        metrics.append(jax.device_get(m))
    return jax.device_get(state), metrics


def chunked_run(strategy: parallel.Strategy, opts: StepOptions, data: list[dict[str, np.ndarray]]) -> tuple[Any, list[Any]]:
    """compile_train_steps over CHUNKS: (unreplicated final state, per-call metric sums)."""
    model = small_resnet(**strategy.model_overrides)
    state = strategy.place_state(init_host_state(model))
    run = strategy.compile_train_steps(make_train_step(opts, axis_name=strategy.axis_name))
    placed = put_stacked(stacked(data), strategy.batch_sharding, BATCH)
    sums, first = [], 0
    for count in CHUNKS:
        before = state
        state, s = run(state, placed, first, count, BASE, first)
        if strategy.name != "pmap":
            assert all(x.is_deleted() for x in jax.tree_util.tree_leaves(before.params)), "the state was not donated"
        sums.append(jax.device_get(s))
        first += count
    for x in jax.tree_util.tree_leaves(compared(state)):
        reps = strategy.replicas(x)
        assert all(np.array_equal(reps[0], r) for r in reps[1:]), "replicas differ"
    return strategy.unreplicate(state), sums


@pytest.fixture(scope="module")
def data() -> list[dict[str, np.ndarray]]:
    return batches(STEPS)


@pytest.fixture(scope="module")
def reference(data: list[dict[str, np.ndarray]]) -> tuple[Any, list[Any]]:
    return per_step_reference(OPTS, data)


@pytest.mark.slow
@pytest.mark.parametrize("name", parallel.STRATEGIES)
def test_steps_per_call_match_one_call_per_step(name: str, data: Any, reference: Any) -> None:
    strategy = parallel.make_strategy(ParallelConfig(strategy=name), BATCH)
    got, sums = chunked_run(strategy, OPTS, data)
    ref_state, ref_metrics = reference
    assert int(got.step) == STEPS
    assert_trees_close(compared(got), compared(ref_state))
    first = 0
    for count, s in zip(CHUNKS, sums):
        for k in ref_metrics[0]:
            want = sum(float(m[k]) for m in ref_metrics[first:first + count])
            np.testing.assert_allclose(float(np.asarray(s[k])), want, rtol=1e-5, atol=1e-6)
        first += count


def test_random_augmentation_uses_the_same_keys_as_per_step_calls(data: Any) -> None:
    """Random crops and flips inside the loop draw from fold_in(base, step): the same as per-step calls to float
    rounding (the loop and the single step are different XLA programs, fused differently around oneDNN's calls)."""
    opts = StepOptions(num_classes=CLASSES, mean=(120.0,) * 3, std=(70.0,) * 3, crop_padding=2, flip="random")
    ref_state, _ = per_step_reference(opts, data)
    got, _ = chunked_run(parallel.make_strategy(ParallelConfig(strategy="single"), BATCH), opts, data)
    assert_trees_close(compared(got), compared(ref_state), atol=1e-6, rtol=2e-6)
    # and the comparison is not vacuous: the augmentation changed the parameters
    other = jax.tree_util.tree_leaves(per_step_reference(OPTS, data)[0].params)
    assert any(not np.allclose(a, b, atol=1e-6) for a, b in zip(jax.tree_util.tree_leaves(got.params), other))


def test_loader_epoch_arrays_are_the_epoch_batches() -> None:
    rng = np.random.default_rng(0)
    ds = ArrayDataset(rng.integers(0, 256, (50, *IMAGE)).astype(np.uint8), rng.integers(0, 3, 50).astype(np.int32), 3,
                      "toy")
    loader = DeviceEpochLoader(ds, 8, seed=3)
    arrays = jax.device_get(loader.epoch_arrays(2, start_step=1))
    listed = [jax.device_get(b) for b in loader.epoch(2, start_step=1)]
    assert arrays["image"].shape == (len(loader) - 1, 8, *IMAGE)
    for k, b in enumerate(listed):
        for key in b:
            np.testing.assert_array_equal(arrays[key][k], b[key])
    assert loader.epoch_arrays(0, start_step=len(loader)) is None


def test_bad_counts_and_batches_are_refused_before_compiling(data: Any) -> None:
    strategy = parallel.make_strategy(ParallelConfig(strategy="single"), BATCH)
    run = strategy.compile_train_steps(make_train_step(OPTS))
    state = strategy.place_state(init_host_state(small_resnet()))
    placed = jax.device_put(stacked(data))
    for first, count in ((0, 0), (3, 3), (-1, 2)):
        with pytest.raises(ValueError, match=r"first \+ count"):
            run(state, placed, first, count, BASE, 0)
    with pytest.raises(ValueError, match="global batches of 16"):
        run(state, {k: v[:, :8] for k, v in placed.items()}, 0, 1, BASE, 0)
    with pytest.raises(ValueError, match=r"stacked \[steps, batch"):
        run(state, {"image": placed["image"][0], "label": placed["label"][0]}, 0, 1, BASE, 0)
