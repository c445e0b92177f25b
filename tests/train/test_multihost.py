"""Multi-host training: two real processes on localhost (two CPU devices each) against one process with four.

The workers (tests/train/multihost_worker.py) start `jax.distributed` through `init_distributed`, with gloo
cross-process collectives on CPU, and build only their own rows of every batch.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

WORKER = Path(__file__).with_name("multihost_worker.py")
STRATEGIES = ("jit", "pmap", "shard_map", "jit-steps", "shard_map-steps")  # -steps: compile_train_steps

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def _load_worker():
    spec = importlib.util.spec_from_file_location("multihost_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # flax's dataclass transform looks the module up
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("multihost")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_COORDINATOR_ADDRESS")}
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(port), "2", str(i), str(out), ",".join(STRATEGIES)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"worker {i} failed (exit {p.returncode}):\n{logs[i][-4000:]}"
    return out


def test_each_process_joined_and_loaded_only_its_rows(two_process_run: Path) -> None:
    reports = [json.loads((two_process_run / f"process{i}.json").read_text()) for i in range(2)]
    for i, r in enumerate(reports):
        assert r["started"] and r["process_index"] == i and r["process_count"] == 2
        assert r["device_count"] == 4 and r["local_device_count"] == 2
        for name in STRATEGIES:
            assert r["runs"][name]["rows"] == [4 * i, 4 * i + 4], "process p holds rows [p·B/P, (p+1)·B/P)"
            assert r["runs"][name]["replicas_agree"]
    for name in STRATEGIES:  # both processes saw the same global metrics
        np.testing.assert_allclose(reports[0]["runs"][name]["losses"], reports[1]["runs"][name]["losses"], rtol=1e-6)
        np.testing.assert_allclose(reports[0]["runs"][name]["eval"], reports[1]["runs"][name]["eval"], rtol=1e-6)


def test_only_process_zero_writes_results(two_process_run: Path) -> None:
    written = sorted(p.name for p in two_process_run.iterdir() if p.suffix == ".npz")
    assert written == sorted(f"{s}.npz" for s in STRATEGIES)  # one file per strategy, from process 0 only


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_processes_match_one_process_with_four_devices(two_process_run: Path, strategy: str) -> None:
    assert jax.device_count() >= 4
    worker = _load_worker()
    # this process, four of its eight fake devices; the several-steps-per-call runs against one call per step
    ref = worker.run(strategy.removesuffix("-steps"), num_devices=4)
    got = np.load(two_process_run / f"{strategy}.npz")
    leaves = [got[f"arr_{i}"] for i in range(len(ref["leaves"]))]
    assert len(got.files) == len(ref["leaves"]) + 2
    for a, b in zip(leaves, ref["leaves"]):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    ref_losses = ref["losses"]
    if strategy.endswith("-steps"):  # the loop returns sums: step 0, then steps 1 .. STEPS-1 together
        ref_losses = np.array([ref_losses[0], ref_losses[1:].sum()])
    np.testing.assert_allclose(got["losses"], ref_losses, atol=1e-5)
    np.testing.assert_allclose(got["eval"], ref["eval"], atol=1e-4)
    assert got["eval"][2] == worker.EVAL_N  # every eval example counted once across both processes
