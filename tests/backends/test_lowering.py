"""A GPU or TPU program holds no CPU kernel: the full train step lowered for `cuda` and `tpu` on this CPU host has no
jaxcnn custom call and no host callback; lowered for `cpu` it calls the native kernels where they apply.

JAX lowers for a platform it has no device of (`Traced.lower(lowering_platforms=...)`), and while it traces,
`jax.default_backend()` is still "cpu": this is what a program exported from a CPU host for an accelerator holds.
The step is `jaxcnn.train.step.make_train_step` with the SGD `jaxcnn train` uses, for ResNet-20 and ResNet-50 (32x32
inputs, batch 2), float32 and bfloat16 compute, on one device and batch-sharded over a mesh of two.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxcnn import backends
from jaxcnn.config import OptimConfig, ScheduleConfig
from jaxcnn.models import create_model
from jaxcnn.train.optim import make_optimizer
from jaxcnn.train.state import create_train_state, init_variables
from jaxcnn.train.step import StepOptions, make_train_step

BATCH, SIZE = 2, 32
# What the native kernels are called in a lowered module; every one starts with "jaxcnn".
FLOAT32_KERNELS = {"jaxcnn_onednn_conv_fwd", "jaxcnn_onednn_conv_bwd_data", "jaxcnn_onednn_conv_bwd_weights",
                   "jaxcnn_batch_norm_fwd", "jaxcnn_batch_norm_bwd", "jaxcnn_onednn_matmul", "jaxcnn_sgd_update"}


def custom_call_targets(module_text: str) -> set[str]:
    """The targets of every custom call in a StableHLO module's text (pretty or generic form)."""
    return set(re.findall(r"custom_call\s*@([\w.$-]+)", module_text)) | set(
        re.findall(r'call_target_name\s*=\s*"([^"]+)"', module_text))


def test_the_scan_finds_custom_calls():
    fn = jax.jit(lambda x: jax.pure_callback(np.sin, jax.ShapeDtypeStruct(x.shape, x.dtype), x))
    targets = custom_call_targets(fn.trace(jnp.ones(3)).lower().as_text())
    assert any("callback" in t for t in targets), targets


@functools.lru_cache(maxsize=None)
def train_step(model_name: str, dtype: str):
    """(the train step, abstract state, abstract batch, abstract key)."""
    model = create_model(model_name, num_classes=10, dtype=jnp.dtype(dtype))
    optim = OptimConfig(name="sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4, weight_decay_mask="all")
    tx, _ = make_optimizer(optim, ScheduleConfig(name="constant"), steps_per_epoch=10, total_steps=100)
    state = jax.eval_shape(lambda: create_train_state(model, tx, init_variables(model, (1, SIZE, SIZE, 3), 0)))
    opts = StepOptions(num_classes=10, mean=(127.5,) * 3, std=(64.0,) * 3, compute_dtype=jnp.dtype(dtype))
    batch = {"image": jax.ShapeDtypeStruct((BATCH, SIZE, SIZE, 3), jnp.uint8),
             "label": jax.ShapeDtypeStruct((BATCH,), jnp.int32)}
    return make_train_step(opts), state, batch, jax.ShapeDtypeStruct((2,), jnp.uint32)


def jitted(step, state, devices: int):
    """`step` jitted on one device, or batch-sharded over `devices` CPU devices with the state replicated."""
    if devices == 1:
        return jax.jit(step)
    mesh = Mesh(np.array(jax.devices()[:devices]), ("batch",))
    replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("batch"))
    shardings = (jax.tree_util.tree_map(lambda _: replicated, state), {"image": split, "label": split}, replicated)
    return jax.jit(step, in_shardings=shardings)


@functools.lru_cache(maxsize=None)
def lowered_targets(model_name: str, dtype: str, devices: int, platform: str) -> set[str]:
    step, state, batch, key = train_step(model_name, dtype)
    with backends.concurrent_devices(devices):  # as the strategies trace their steps
        traced = jitted(step, state, devices).trace(state, batch, key)
    return custom_call_targets(traced.lower(lowering_platforms=(platform,)).as_text())


CASES = [pytest.param(m, d, n, id=f"{m}-{d}-{n}dev") for m in ("resnet20", "resnet50")
         for d in ("float32", "bfloat16") for n in (1, 2)]


@pytest.mark.parametrize("model_name, dtype, devices", CASES)
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_accelerator_programs_hold_no_cpu_kernel_and_no_host_callback(model_name, dtype, devices, platform):
    targets = lowered_targets(model_name, dtype, devices, platform)
    assert not {t for t in targets if t.startswith("jaxcnn") or "callback" in t.lower()}, targets


@pytest.mark.parametrize("model_name, dtype, devices", CASES)
def test_cpu_programs_call_the_native_kernels(model_name, dtype, devices):
    if not backends.native_kernels_available():
        pytest.skip("the native kernels are not built here (no C++ compiler or oneDNN)")
    targets = lowered_targets(model_name, dtype, devices, "cpu")
    assert not {t for t in targets if "callback" in t.lower()}, targets
    # float32 layers run in the native kernels; BatchNorm of bfloat16 activations and the SGD update of the float32
    # parameters do in every case (bfloat16 convolutions only on CPUs with AMX or AVX512-BF16: tests/backends/
    # test_bfloat16.py)
    expected = FLOAT32_KERNELS if dtype == "float32" else {"jaxcnn_sgd_update", "jaxcnn_batch_norm_fwd",
                                                             "jaxcnn_batch_norm_bwd"}
    assert expected <= targets, sorted(expected - targets)


def test_switched_off_cpu_programs_hold_no_native_kernel(monkeypatch):
    monkeypatch.setenv("JAXCNN_ONEDNN", "0")
    step, state, batch, key = train_step("resnet20", "float32")
    fresh = jax.jit(lambda *args: step(*args))  # not a trace cached with the kernels switched on
    targets = custom_call_targets(fresh.trace(state, batch, key).lower().as_text())
    assert not {t for t in targets if t.startswith("jaxcnn")}, targets
