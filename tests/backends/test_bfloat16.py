"""bfloat16 compute on the CPU: convolutions through oneDNN's bfloat16 kernels where the CPU multiplies bfloat16 in
hardware (AMX, AVX512-BF16), and one warning naming the measured cost where XLA's slow kernels run instead.

The reference is XLA's float32 convolution of the same bfloat16-rounded operands (and its automatic derivatives):
oneDNN accumulates in float32 and rounds each result to bfloat16 once, so values and gradients agree within a few
bfloat16 steps (2^-8 relative) of the largest entry.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxcnn.backends.cpu import conv as fast_conv
from jaxcnn.backends.cpu import kernels

DN = ("NHWC", "HWIO", "NHWC")
BF16_TOLERANCE = 2e-2  # relative to the largest entry: a few bfloat16 roundings of a float32 sum


def _bf16_path_available() -> bool:
    return kernels.available() and kernels.cpu_has_fast_bfloat16()


def _loss(conv, x, w, strides, padding, groups):
    y = conv(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), strides, padding, groups)
    return (y.astype(jnp.float32) * jnp.cos(jnp.arange(y.size, dtype=jnp.float32).reshape(y.shape))).sum()


def _fast(x, w, strides, padding, groups):
    return fast_conv.conv2d(x, w, strides=strides, padding=padding, dilation=(1, 1), groups=groups)


def _reference(x, w, strides, padding, groups):  # float32 arithmetic on the bfloat16 values
    return lax.conv_general_dilated(x.astype(jnp.float32), w.astype(jnp.float32), strides, padding,
                                    dimension_numbers=DN, feature_group_count=groups)


@pytest.mark.parametrize("devices", [1, 8], ids=["all-cores-batch-split", "one-thread-per-device"])
@pytest.mark.parametrize("shape, kernel, strides, groups", [
    ((8, 12, 12, 16), (3, 3, 16, 16), (1, 1), 1),
    ((6, 11, 9, 8), (3, 3, 8, 32), (2, 2), 1),
    ((4, 8, 8, 32), (1, 1, 32, 16), (1, 1), 1),
    ((4, 8, 8, 16), (3, 3, 8, 16), (1, 1), 2),
])
def test_bfloat16_convolution_and_gradients_match_float32_reference(shape, kernel, strides, groups, devices):
    if not _bf16_path_available():
        pytest.skip("no bfloat16 hardware (amx_bf16 / avx512_bf16) or the native kernels are not built")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    w = jnp.asarray(rng.standard_normal(kernel) * 0.2, jnp.float32)
    padding = ((kernel[0] // 2,) * 2, (kernel[1] // 2,) * 2)
    with kernels.concurrent_devices(devices):
        fast = jax.jit(lambda x, w: _fast(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), strides, padding, groups))
        grad = jax.jit(jax.grad(lambda x, w: _loss(_fast, x, w, strides, padding, groups), argnums=(0, 1)))
        text = fast.lower(x, w).as_text()
        y, (dx, dw) = fast(x, w), grad(x, w)
    assert "jaxcnn_onednn_conv_fwd" in text  # oneDNN ran it, not XLA
    assert y.dtype == jnp.bfloat16
    y_ref = _reference(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), strides, padding, groups)
    dx_ref, dw_ref = jax.grad(lambda x, w: _loss(_reference, x, w, strides, padding, groups), argnums=(0, 1))(x, w)
    for name, got, want in [("y", y, y_ref), ("dx", dx, dx_ref), ("dw", dw, dw_ref)]:
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        assert got.shape == want.shape, name
        error = np.abs(got - want).max() / np.abs(want).max()
        assert error < BF16_TOLERANCE, (name, error)


def test_cpu_flags_decide_whether_bfloat16_is_fast(tmp_path):
    def cpuinfo(flags: str) -> str:
        path = tmp_path / f"cpuinfo_{flags.replace(' ', '_')}"
        path.write_text(f"processor\t: 0\nflags\t\t: fpu sse2 avx512f {flags}\n\nprocessor\t: 1\n")
        return str(path)

    assert kernels.cpu_has_fast_bfloat16(cpuinfo("amx_tile amx_bf16"))
    assert kernels.cpu_has_fast_bfloat16(cpuinfo("avx512_bf16"))
    assert not kernels.cpu_has_fast_bfloat16(cpuinfo("avx512bw avx512vl"))
    assert not kernels.cpu_has_fast_bfloat16(str(tmp_path / "missing"))


def test_bfloat16_on_a_cpu_without_bfloat16_hardware_warns_once_with_the_cost(monkeypatch):
    if not kernels.available():
        pytest.skip("the native kernels are not built here")
    monkeypatch.setattr(kernels, "cpu_has_fast_bfloat16", lambda *_: False)
    kernels.warn_slow_bfloat16.cache_clear()
    x = jnp.ones((2, 6, 6, 4), jnp.bfloat16)
    w = jnp.ones((3, 3, 4, 4), jnp.bfloat16)
    try:
        with pytest.warns(RuntimeWarning, match=r"runs its convolutions \(this CPU has neither AMX nor AVX512-BF16\) "
                                                r"in XLA's kernels.*100x slower"):
            y = _fast(x, w, (1, 1), ((1, 1), (1, 1)), 1)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a second layer: no second warning
            _fast(x, w, (1, 1), ((1, 1), (1, 1)), 1)
            _fast(x.astype(jnp.float32), w.astype(jnp.float32), (1, 1), ((1, 1), (1, 1)), 1)  # float32: none
    finally:
        kernels.warn_slow_bfloat16.cache_clear()
    assert y.dtype == jnp.bfloat16 and float(y[0, 2, 2, 0]) == 36.0  # XLA's convolution still gives the values


def test_bfloat16_with_the_native_kernels_switched_off_does_not_warn(monkeypatch):
    monkeypatch.setenv("JAXCNN_ONEDNN", "0")  # the user chose XLA's kernels (or a cost analysis is traced)
    kernels.warn_slow_bfloat16.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _fast(jnp.ones((2, 6, 6, 4), jnp.bfloat16), jnp.ones((3, 3, 4, 4), jnp.bfloat16), (1, 1), ((1, 1),) * 2, 1)


def test_bfloat16_dense_product_runs_in_float32_sgemm_and_matches_the_reference():
    if not kernels.available():
        pytest.skip("the native kernels are not built here")
    from jaxcnn.backends.cpu import dense

    rng = np.random.default_rng(1)
    a = jnp.asarray(rng.standard_normal((2, 16, 40)), jnp.float32).astype(jnp.bfloat16)
    b = jnp.asarray(rng.standard_normal((40, 24)), jnp.float32).astype(jnp.bfloat16)
    dims = (((2,), (0,)), ((), ()))

    def loss(product, a, b):
        y = product(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), dims)
        return (y.astype(jnp.float32) * jnp.sin(jnp.arange(y.size, dtype=jnp.float32).reshape(y.shape))).sum(), y

    def reference(a, b, dims):  # float32 arithmetic on the bfloat16 values, rounded once
        return lax.dot_general(a.astype(jnp.float32), b.astype(jnp.float32), dims).astype(jnp.bfloat16)

    fast = jax.jit(jax.value_and_grad(lambda a, b: loss(dense.dot_general, a, b), argnums=(0, 1), has_aux=True))
    assert "jaxcnn_onednn_matmul" in fast.lower(a, b).as_text()
    (_, y), (da, db) = fast(a, b)
    (_, y_ref), (da_ref, db_ref) = jax.value_and_grad(lambda a, b: loss(reference, a, b), argnums=(0, 1),
                                                      has_aux=True)(a, b)
    assert y.dtype == da.dtype == jnp.bfloat16
    for got, want in [(y, y_ref), (da, da_ref), (db, db_ref)]:
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        assert np.abs(got - want).max() / np.abs(want).max() < BF16_TOLERANCE
