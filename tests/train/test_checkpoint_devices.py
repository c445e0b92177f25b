"""A checkpoint saved on 8 devices restores in a process that has 1, and the reverse (real processes, each with its
own device count), bit for bit; the restored state is placed by the strategy like a fresh one."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

# Shared by this process (8 devices, from conftest) and the 1-device subprocess: LeNet-5 with BatchNorm and Adam,
# every leaf filled with values that depend on the step.
COMMON = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np, optax
    from jaxcnn.config import Config, ParallelConfig
    from jaxcnn.models import create_model
    from jaxcnn.train import parallel
    from jaxcnn.train.checkpoint import RunCheckpointer
    from jaxcnn.train.state import create_train_state, init_variables, leaf_names

    def fresh():
        model = create_model("lenet5", num_classes=10, norm="batch")
        return create_train_state(model, optax.adam(1e-3), init_variables(model, (1, 28, 28, 1), 0), ema=True)

    def filled(step):
        rng = np.random.default_rng(step)
        s = jax.tree_util.tree_map(
            lambda x: jnp.asarray(rng.standard_normal(x.shape).astype(x.dtype))
            if jnp.issubdtype(x.dtype, jnp.floating) else x, fresh())
        return s.replace(step=jnp.asarray(step, jnp.int32))

    def named(state):
        return dict(zip(leaf_names(state), (np.asarray(x) for x in jax.tree_util.tree_leaves(state))))
""")


def run_with_one_device(script: str) -> str:
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    proc = subprocess.run([sys.executable, "-c", COMMON + textwrap.dedent(script)], env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def namespace() -> dict:
    ns: dict = {}
    exec(COMMON, ns)  # noqa: S102 - the same helpers as the subprocess
    return ns


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("strategy", ["pmap", "jit"])
def test_saved_on_8_devices_restores_on_1(tmp_path, strategy):
    ns = namespace()
    assert jax.device_count() == 8
    s8 = ns["parallel"].make_strategy(ns["ParallelConfig"](strategy=strategy), 64)
    placed = s8.place_state(ns["filled"](30))
    ck = ns["RunCheckpointer"](tmp_path, ns["Config"]())
    ck.save_now(placed, 30, strategy=s8)
    ck.close()

    out = run_with_one_device(f"""
        assert jax.device_count() == 1
        ck = RunCheckpointer({str(tmp_path)!r}, Config())
        state, step = ck.restore(fresh())
        single = parallel.make_strategy(ParallelConfig(strategy="single"), 64)
        state = single.place_state(state)
        np.savez({str(tmp_path / "restored.npz")!r}, **named(single.unreplicate(state)))
        print(step)
    """)
    assert out.split() == ["30"]
    restored = np.load(tmp_path / "restored.npz")
    expected = ns["named"](ns["filled"](30))
    assert sorted(restored.files) == sorted(expected)
    for k, v in expected.items():
        assert restored[k].dtype == v.dtype and np.array_equal(restored[k], v), k


@pytest.mark.slow
@pytest.mark.multiprocess
def test_saved_on_1_device_restores_on_8(tmp_path):
    run_with_one_device(f"""
        single = parallel.make_strategy(ParallelConfig(strategy="single"), 64)
        ck = RunCheckpointer({str(tmp_path)!r}, Config())
        ck.save_now(single.place_state(filled(12)), 12, strategy=single)
        ck.close()
    """)
    ns = namespace()
    ck = ns["RunCheckpointer"](tmp_path, ns["Config"]())
    state, step = ck.restore(ns["fresh"]())
    ck.close()
    assert step == 12
    expected = ns["named"](ns["filled"](12))
    for name in ("pmap", "jit", "shard_map"):
        strategy = ns["parallel"].make_strategy(ns["ParallelConfig"](strategy=name), 64)
        placed = strategy.place_state(state)
        leaves = jax.tree_util.tree_leaves(placed)
        for (k, v), leaf in zip(expected.items(), leaves):
            replicas = strategy.replicas(leaf)
            assert len(replicas) == 8, (name, k)
            assert all(np.array_equal(r, v) for r in replicas), (name, k)
