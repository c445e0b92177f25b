"""The strategies (jit / pmap / shard_map / single) against a plain one-device run, on 8 fake CPU devices.

The reference is `jax.jit(make_train_step(opts))` on one device with the model built without any axis name: no
strategy code is involved in it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest

from jaxcnn.config import ConfigError, OptimConfig, ParallelConfig, ScheduleConfig
from jaxcnn.data.dataset import ArrayDataset
from jaxcnn.data.pipeline import DeviceEvalSet
from jaxcnn.train import parallel
from jaxcnn.train.optim import make_optimizer
from jaxcnn.train.state import create_train_state
from jaxcnn.train.step import StepOptions, make_eval_step, make_train_step

sys.path.insert(0, str(Path(__file__).parent))
from parallel_helpers import CLASSES, IMAGE, numpy_variables, small_resnet

STEPS = 3
BATCH = 16
OPTS = StepOptions(num_classes=CLASSES, mean=(120.0,) * 3, std=(70.0,) * 3)
def init_host_state(model: Any) -> Any:
    """The starting state (host NumPy): the same values for every strategy and BatchNorm variant."""
    tx, _ = make_optimizer(
        OptimConfig(name="sgd", lr=0.2, momentum=0.9, nesterov=True, weight_decay=5e-4),
        ScheduleConfig(name="cosine", warmup_epochs=1),
        steps_per_epoch=2,
        total_steps=10,
    )
    return jax.tree_util.tree_map(np.asarray, create_train_state(model, tx, numpy_variables(model)))


def batches(n: int = STEPS, batch: int = BATCH, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {
            "image": rng.integers(0, 256, (batch, *IMAGE)).astype(np.uint8),
            "label": rng.integers(0, CLASSES, batch).astype(np.int32),
        }
        for _ in range(n)
    ]


def compared(state: Any) -> tuple[Any, Any, Any]:
    return state.params, state.batch_stats, state.opt_state


def assert_trees_close(a: Any, b: Any, atol: float = 1e-5, rtol: float = 0.0) -> None:
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    assert len(la) == len(lb) > 0
    for x, y in zip(la, lb):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=rtol)


def reference_run(model_knobs: dict[str, Any], data: list[dict[str, np.ndarray]]) -> tuple[Any, list[Any]]:
    """Plain jax.jit on one device, no strategy: (final host state, per-step metrics)."""
    model = small_resnet(**model_knobs)
    state = jax.device_put(init_host_state(model), jax.devices()[0])
    step = jax.jit(make_train_step(OPTS))
    metrics = []
    for i, b in enumerate(data):
        state, m = step(state, b, jax.random.PRNGKey(i))
        metrics.append(jax.device_get(m))
    return jax.device_get(state), metrics


def strategy_run(
    strategy: parallel.Strategy, model_knobs: dict[str, Any], data: list[dict[str, np.ndarray]]
) -> tuple[Any, list[Any], list[bool]]:
    """(unreplicated final state, per-step metrics, per step: every replica's batch_stats identical).

    Also checks that the state is donated, that placing it never aliases its source, that steps after the
    first need no implicit host transfer, and that every replica ends with the same values.
    """
    model = small_resnet(**model_knobs, **strategy.model_overrides)
    source = jax.device_put(init_host_state(model), jax.devices()[0])  # what a careless device_put would alias
    state = strategy.place_state(source)
    step = strategy.compile_train_step(make_train_step(OPTS, axis_name=strategy.axis_name))
    placed = [strategy.put_batch(b) for b in data]
    keys = [jax.random.PRNGKey(i) for i in range(len(data))]
    metrics, stats_agree = [], []
    for i, (batch, key) in enumerate(zip(placed, keys)):
        before = state
        with jax.transfer_guard_device_to_host("disallow"), jax.transfer_guard_host_to_device("disallow"):
            state, m = step(state, batch, key)
        assert all(x.is_deleted() for x in jax.tree_util.tree_leaves(before.params)), "the state was not donated"
        metrics.append(jax.device_get(m))
        stats = [strategy.replicas(x) for x in jax.tree_util.tree_leaves(state.batch_stats)]
        stats_agree.append(all(all(np.array_equal(r[0], q) for q in r[1:]) for r in stats))
    assert not any(x.is_deleted() for x in jax.tree_util.tree_leaves(source))
    for x in jax.tree_util.tree_leaves(compared(state)):
        reps = strategy.replicas(x)
        assert len(reps) == strategy.num_devices
        assert all(np.array_equal(reps[0], r) for r in reps[1:]), "replicas differ"
    return strategy.unreplicate(state), metrics, stats_agree


@pytest.fixture(scope="module")
def data() -> list[dict[str, np.ndarray]]:
    return batches()


@pytest.fixture(scope="module")
def reference(data: list[dict[str, np.ndarray]]) -> tuple[Any, list[Any]]:
    return reference_run({}, data)


# ---------------------------------------------------------------------------------------------------------
# Same results as one device
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", parallel.STRATEGIES)
def test_strategy_matches_single_device(name: str, data: Any, reference: Any) -> None:
    assert jax.device_count() == 8
    strategy = parallel.make_strategy(ParallelConfig(strategy=name), BATCH)
    assert strategy.num_devices == (1 if name == "single" else 8)
    assert strategy.axis_name == (parallel.BATCH_AXIS if name in ("pmap", "shard_map") else None)
    got, metrics, stats_agree = strategy_run(strategy, {}, data)
    ref_state, ref_metrics = reference
    assert_trees_close(compared(got), compared(ref_state))
    assert int(got.step) == STEPS
    assert all(stats_agree)  # running statistics identical on every replica after every step
    for m, r in zip(metrics, ref_metrics):
        assert set(m) == set(r)
        for k in r:  # grad_norm equal: no N-times gradient (the shard_map check_vma trap)
            assert np.shape(m[k]) == ()
            np.testing.assert_allclose(m[k], r[k], rtol=1e-5, atol=1e-6)


def test_shard_map_check_vma_trap() -> None:
    """Why the shard_map strategy turns check_vma off: with it on, pmean'd gradients come out D times too large."""
    from jax import lax
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()), ("batch",))
    x = np.random.default_rng(0).normal(size=(16, 3)).astype(np.float32)
    w = np.ones(3, np.float32)
    want = 2 * x.T @ (x @ w) / len(x)  # d/dw mean((x w)^2), by hand

    def grads(w: jax.Array, x: jax.Array) -> jax.Array:  # the pmap-style step: local gradient, then pmean
        return lax.pmean(jax.grad(lambda w: jax.numpy.mean((x @ w) ** 2))(w), "batch")

    args = (jax.device_put(w, NamedSharding(mesh, P())), jax.device_put(x, NamedSharding(mesh, P("batch"))))
    specs = {"mesh": mesh, "in_specs": (P(), P("batch")), "out_specs": P()}
    ours = jax.jit(parallel._shard_map(grads, **specs))(*args)
    np.testing.assert_allclose(ours, want, rtol=1e-5)
    checked = jax.jit(jax.shard_map(grads, **specs, check_vma=True))(*args)
    np.testing.assert_allclose(
        checked, 8 * want, rtol=1e-5,
        err_msg="jax changed shard_map's check_vma semantics: revisit jaxcnn.train.parallel._shard_map",
    )


def test_the_reference_moves_batch_stats_and_params(reference: Any) -> None:
    ref_state, _ = reference
    init = init_host_state(small_resnet())
    # the comparison above would be vacuous if nothing changed
    assert not np.allclose(ref_state.batch_stats["stem"]["norm"]["mean"], init.batch_stats["stem"]["norm"]["mean"])
    assert not np.allclose(ref_state.params["stem"]["conv"]["kernel"], init.params["stem"]["conv"]["kernel"])


# ---------------------------------------------------------------------------------------------------------
# Ghost BatchNorm: statistics per slice of the batch, whatever the device count
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ghost_batchnorm_is_independent_of_the_device_count(data: Any, reference: Any) -> None:
    ghost = {"bn_virtual_batch_size": 2}
    one_device, _ = reference_run(ghost, data)
    # it is not ordinary BatchNorm over the whole batch
    assert not np.allclose(one_device.batch_stats["stem"]["norm"]["var"], reference[0].batch_stats["stem"]["norm"]["var"])
    for name, n in [("pmap", 2), ("jit", 8), ("pmap", 8), ("shard_map", 8)]:
        strategy = parallel.make_strategy(ParallelConfig(strategy=name, num_devices=n), BATCH)
        got, _, stats_agree = strategy_run(strategy, ghost, data)
        assert all(stats_agree), f"{name} on {n} devices: replicas' running statistics differ"
        assert_trees_close(compared(got), compared(one_device))


# ---------------------------------------------------------------------------------------------------------
# Evaluation: padded, masked, every example once
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_eval_on_eight_devices_counts_every_example_once() -> None:
    n = 37  # no device count from 2 to 8 divides it
    rng = np.random.default_rng(3)
    ds = ArrayDataset(
        rng.integers(0, 256, (n, *IMAGE)).astype(np.uint8), rng.integers(0, CLASSES, n).astype(np.int32), CLASSES, "toy/test"
    )
    model = small_resnet()
    host = init_host_state(model)
    # reference: all examples in one forward pass on one device, reduced in numpy
    x = (ds.images.astype(np.float32) / 255.0 - np.float32(120 / 255)) / np.float32(70 / 255)
    logits = np.asarray(model.apply({"params": host.params, "batch_stats": host.batch_stats}, x, train=False), np.float64)
    logp = logits - logits.max(1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
    ref_loss = -logp[np.arange(n), ds.labels].sum()
    ref_correct = (logits.argmax(1) == ds.labels).sum()
    for name in ("jit", "pmap", "shard_map", "single"):
        strategy = parallel.make_strategy(ParallelConfig(strategy=name), BATCH)
        state = strategy.place_state(init_host_state(small_resnet(**strategy.model_overrides)))
        eval_step = strategy.compile_eval_step(make_eval_step(OPTS, axis_name=strategy.axis_name))
        eval_set = DeviceEvalSet(ds, 12, sharding=strategy.batch_sharding)
        sums = [jax.device_get(eval_step(state, b)) for b in eval_set]
        assert all(np.shape(s["count"]) == () for s in sums)
        count = sum(float(s["count"]) for s in sums)
        assert count == n, f"{name}: counted {count} examples of {n}"
        np.testing.assert_allclose(sum(float(s["loss_sum"]) for s in sums), ref_loss, rtol=1e-5)
        assert sum(float(s["correct"]) for s in sums) == ref_correct


# ---------------------------------------------------------------------------------------------------------
# Batch sizes, devices, configuration errors
# ---------------------------------------------------------------------------------------------------------


def test_batch_size_not_divisible_is_a_clear_error_naming_valid_sizes() -> None:
    with pytest.raises(ConfigError) as e:
        parallel.make_strategy(ParallelConfig(strategy="jit"), 100)
    msg = str(e.value)
    assert "data.batch_size=100" in msg and "8 devices" in msg and "96 or 104" in msg
    with pytest.raises(ConfigError, match=r"multiple of 24.*Nearest valid sizes: 24 or 48"):
        parallel.make_strategy(ParallelConfig(strategy="pmap"), 40, accum_steps=3)
    with pytest.raises(ConfigError, match="Nearest valid sizes: 8 "):
        parallel.check_batch_size(3, 8)
    parallel.make_strategy(ParallelConfig(strategy="shard_map", num_devices=4), 12)  # fine
    parallel.make_strategy(ParallelConfig(strategy="single"), 7)  # one device takes any size


def test_a_wrong_batch_is_refused_before_compiling() -> None:
    strategy = parallel.make_strategy(ParallelConfig(strategy="jit"), 16)
    calls = []

    def step(state: Any, batch: Any, rng: Any) -> Any:
        calls.append(1)  # tracing would call this
        return state, {}

    compiled = strategy.compile_train_step(step)
    with pytest.raises(ValueError, match="has 8 examples but the strategy was made for global batches of 16"):
        compiled({}, {"image": np.zeros((8, 2)), "label": np.zeros(8)}, None)
    evaluate = strategy.compile_eval_step(lambda s, b: {})
    with pytest.raises(ConfigError, match=r"the eval batch=12 does not split evenly over 8 devices.*8 or 16"):
        evaluate({}, {"image": np.zeros((12, 2))})
    assert not calls


def test_device_count_errors() -> None:
    with pytest.raises(ConfigError, match="there are 8 devices"):
        parallel.make_strategy(ParallelConfig(strategy="jit", num_devices=16), 16)
    with pytest.raises(ConfigError, match="uses one device"):
        parallel.make_strategy(ParallelConfig(strategy="single", num_devices=2), 16)
    with pytest.raises(ConfigError, match="not known"):
        parallel.make_strategy(ParallelConfig(strategy="dp"), 16)  # type: ignore[arg-type]


def test_strategy_attributes() -> None:
    for name in parallel.STRATEGIES:
        s = parallel.make_strategy(ParallelConfig(strategy=name), 16)
        assert s.process_index == 0 and s.is_main_process and s.process_count == 1
        assert s.process_rows() == slice(0, 16)
        assert s.model_overrides == ({"bn_axis_name": "batch"} if name in ("pmap", "shard_map") else {})
    jit = parallel.make_strategy(ParallelConfig(strategy="jit", num_devices=4), 16)
    assert jit.mesh.axis_names == ("data",) and jit.batch_sharding.spec == jax.sharding.PartitionSpec("data")
    placed = jit.put_batch({"x": np.arange(16)})["x"]
    assert [s.data.shape for s in placed.addressable_shards] == [(4,)] * 4


# ---------------------------------------------------------------------------------------------------------
# jax.distributed
# ---------------------------------------------------------------------------------------------------------


CLUSTER_VARS = (
    "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_JOB_ID", "SLURM_STEP_NODELIST",
    "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "OMPI_MCA_orte_hnp_uri",
    "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS",
)


@pytest.fixture
def plain_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for k in CLUSTER_VARS:
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


def test_init_distributed_does_nothing_on_a_plain_machine(plain_env: pytest.MonkeyPatch) -> None:
    assert parallel.detected_cluster() is None
    assert parallel.init_distributed(ParallelConfig(distributed="auto")) is False
    assert parallel.init_distributed(ParallelConfig(distributed="off", coordinator_address="x:1")) is False
    assert not jax.distributed.is_initialized()


def test_cluster_detection_from_the_environment(plain_env: pytest.MonkeyPatch) -> None:
    slurm = {"SLURM_JOB_ID": "12", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
    for k, v in slurm.items():
        plain_env.setenv(k, v)
    plain_env.setenv("SLURM_NTASKS", "1")
    assert parallel.detected_cluster() is None  # a one-task job step is a plain single process
    plain_env.setenv("SLURM_NTASKS", "4")
    assert parallel.detected_cluster() == "slurm"
    for k in slurm:
        plain_env.delenv(k)
    plain_env.setenv("TPU_WORKER_HOSTNAMES", "t0,t1")
    assert parallel.detected_cluster() == "tpu"
    plain_env.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    assert parallel.detected_cluster() == "coordinator"


def test_init_distributed_errors_name_the_missing_settings(plain_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="set parallel.num_processes and parallel.process_id"):
        parallel.init_distributed(ParallelConfig(distributed="auto", coordinator_address="localhost:1", num_processes=2))
    plain_env.setenv("JAX_PROCESS_ID", "zero")
    with pytest.raises(ConfigError, match="JAX_PROCESS_ID='zero' must be an integer"):
        parallel.init_distributed(ParallelConfig(distributed="auto", coordinator_address="localhost:1", num_processes=2))
    assert not jax.distributed.is_initialized()
    jax.devices()  # the backend is up in this process: too late to join a cluster
    with pytest.raises(RuntimeError, match="call jaxcnn.train.parallel.init_distributed first"):
        parallel.init_distributed(ParallelConfig(coordinator_address="localhost:1", num_processes=2, process_id=0))


def test_distributed_on_without_any_cluster_says_what_to_set() -> None:
    # a fresh process (jax.distributed must be started before the backend), with no cluster in its environment
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "TPU_", "JAX_", "MEGASCALE_"))}
    code = (
        "import jax\n"
        "from jaxcnn.config import ConfigError, ParallelConfig\n"
        "from jaxcnn.train.parallel import init_distributed\n"
        "try:\n"
        "    init_distributed(ParallelConfig(distributed='on'))\n"
        "except ConfigError as e:\n"
        "    print('ConfigError:', e)\n"
        "print('initialized', jax.distributed.is_initialized(), 'devices', jax.device_count())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=False, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ConfigError: parallel.distributed='on'" in out.stdout
    assert "set parallel.coordinator_address, parallel.num_processes and parallel.process_id" in out.stdout.replace("Set", "set")
    assert "initialized False" in out.stdout  # the process carries on as a single process


def test_cloud_tpu_vm_detection_reads_the_pci_bus(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Google processing accelerator on the PCI bus with libtpu present is a Cloud TPU VM; Google's network card
    (same vendor, another class) or no libtpu is not."""
    def bus(*devices):
        paths = []
        for i, (vendor, cls) in enumerate(devices):
            d = tmp_path / f"bus{len(list(tmp_path.iterdir()))}" / f"0000:00:0{i}.0"
            d.mkdir(parents=True)
            (d / "vendor").write_text(vendor + "\n")
            (d / "class").write_text(cls + "\n")
            paths.append(str(d / "vendor"))
        monkeypatch.setattr(parallel.glob, "glob", lambda pattern: paths)

    monkeypatch.setenv("TPU_LIBRARY_PATH", "/opt/libtpu.so")
    bus(("0x1ae0", "0x020000"), ("0x8086", "0x120000"))
    assert parallel._on_cloud_tpu_vm() is False
    bus(("0x1ae0", "0x020000"), ("0x1ae0", "0x120000"))
    assert parallel._on_cloud_tpu_vm() is True
    monkeypatch.delenv("TPU_LIBRARY_PATH")
    monkeypatch.setattr(parallel.importlib.util, "find_spec", lambda name: None)
    assert parallel._on_cloud_tpu_vm() is False
