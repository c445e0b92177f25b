"""jaxcnn.backends.cpu.kernels: float32 CPU convolutions run by oneDNN through XLA FFI custom calls.

Outputs and first derivatives are checked against NumPy loops and lax.conv for every geometry in
tests/backends/test_conv.py (which runs each test with and without oneDNN). Here: that the library builds and is the
default on the CPU, which convolutions it takes, higher-order derivatives (the primitive's bilinear transpose
rules), eager calls, vmap, lowering for GPU (no custom call), and the fallbacks (JAXCNN_ONEDNN=0, no compiler).
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxcnn.backends.cpu import conv as fast_conv
from jaxcnn.backends.cpu import kernels as onednn
from reference_numpy import np_conv2d

DN = ("NHWC", "HWIO", "NHWC")
PAD1 = ((1, 1), (1, 1))

needs_onednn = pytest.mark.skipif(not onednn.available(), reason="oneDNN library unavailable "
                                  "(test_library_builds_and_is_the_cpu_default says why)")


def plain(x, k, strides=(1, 1), padding=PAD1, dilation=(1, 1), groups=1):
    return lax.conv_general_dilated(x, k, strides, padding, rhs_dilation=dilation, dimension_numbers=DN,
                                    feature_group_count=groups)


def fast(x, k, strides=(1, 1), padding=PAD1, dilation=(1, 1), groups=1):
    return fast_conv.conv2d(x, k, strides=strides, padding=padding, dilation=dilation, groups=groups)


def case(seed, x_shape, k_shape):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.standard_normal(x_shape), jnp.float32),
            jnp.asarray(rng.standard_normal(k_shape) * 0.3, jnp.float32))


def uses_onednn(fn, *args) -> bool:
    """Whether tracing fn now binds the oneDNN primitive (a fresh function: JAX caches traces per function)."""
    return "jaxcnn_onednn_conv" in str(jax.make_jaxpr(lambda *a: fn(*a))(*args))


def test_library_builds_and_is_the_cpu_default():
    assert onednn.enabled(), "JAXCNN_ONEDNN is set to 0 in this environment"
    assert onednn.available(), ("the oneDNN convolution library did not build: install a C++ compiler and "
                                "oneDNN's headers (apt-get install g++ libdnnl-dev); ./setup.sh does this")
    x, k = case(0, (2, 8, 8, 4), (3, 3, 4, 5))
    assert uses_onednn(fast, x, k)


@needs_onednn
@pytest.mark.parametrize("hw, cin, cout, stride", [(32, 3, 16, 1), (32, 16, 16, 1), (32, 16, 32, 2),
                                                   (16, 32, 32, 1), (8, 64, 64, 1), (28, 1, 6, 1)])
def test_resnet20_and_lenet_layers_get_jit_kernels(hw, cin, cout, stride):
    """oneDNN's JIT kernels, not its reference loops (which would be slower than XLA), for common CNN layers."""
    out = (hw + 2 - 3) // stride + 1
    geometry = onednn.Geometry((128, hw, hw, cin), (3, 3, cin, cout), (128, out, out, cout), (stride, stride),
                               PAD1, (1, 1), 1)
    impls = onednn.implementations(geometry)
    assert set(impls) == {"forward", "backward_data", "backward_weights"}
    assert not any(name.startswith("ref") for name in impls.values()), impls
    assert onednn.usable(geometry, jnp.float32, jnp.float32)


@needs_onednn
def test_float32_and_bfloat16_with_hardware_support_go_to_onednn():
    x, k = case(1, (2, 8, 8, 4), (3, 3, 4, 5))
    assert uses_onednn(fast, x, k)
    bf16 = uses_onednn(fast, x.astype(jnp.bfloat16), k.astype(jnp.bfloat16))
    assert bf16 == onednn.cpu_has_fast_bfloat16()  # AMX / AVX512-BF16 (tests/backends/test_bfloat16.py)
    assert not uses_onednn(fast, x.astype(jnp.float16), k.astype(jnp.float16))
    assert not onednn.usable(onednn.Geometry((2, 8, 8, 4), (3, 3, 4, 5), (2, 8, 8, 5), (1, 1), PAD1, (1, 1), 1),
                             jnp.float32, jnp.bfloat16)  # mixed operands


@needs_onednn
@pytest.mark.parametrize("strides, padding, dilation, groups, cin, cout", [
    ((1, 1), PAD1, (1, 1), 1, 4, 5),
    ((2, 1), ((0, 2), (1, 0)), (1, 2), 1, 3, 4),
    ((1, 1), PAD1, (1, 1), 2, 4, 6),
    ((1, 1), PAD1, (1, 1), 4, 4, 4),
])
def test_second_and_mixed_derivatives_match_xla(strides, padding, dilation, groups, cin, cout):
    """Forward-over-reverse (Hessian) and reverse-over-reverse: the transposes of the three ops are each other."""
    x, k = case(2, (2, 6, 5, cin), (3, 3, cin // groups, cout))

    def loss(conv):
        return lambda x, k: jnp.sum(jnp.tanh(conv(x, k, strides, padding, dilation, groups)) ** 2)

    assert uses_onednn(loss(fast), x, k)
    hess_k = jax.hessian(loss(fast), argnums=1)(x, k)
    np.testing.assert_allclose(hess_k, jax.hessian(loss(plain), argnums=1)(x, k), rtol=1e-4, atol=1e-4)

    def grad_norm(conv):  # reverse over reverse, through both gradients
        return lambda x, k: sum(jnp.sum(g ** 2) for g in jax.grad(loss(conv), (0, 1))(x, k))

    got = jax.grad(grad_norm(fast), (0, 1))(x, k)
    want = jax.grad(grad_norm(plain), (0, 1))(x, k)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


@needs_onednn
@pytest.mark.parametrize("strides, padding", [((1, 1), PAD1), ((2, 2), ((0, 0), (0, 0)))])
def test_one_channel_inputs_fused_forward_and_onednn_derivatives(strides, padding):
    """One input channel: the value from fast_conv's fused multiply-adds (no oneDNN call in the forward pass),
    the gradients through oneDNN, and forward mode, Hessians and reverse-over-reverse as XLA's convolution."""
    x, k = case(5, (2, 9, 8, 1), (5, 5, 1, 4))
    conv = lambda a, b: fast(a, b, strides, padding)  # noqa: E731
    ref = lambda a, b: plain(a, b, strides, padding)  # noqa: E731
    np.testing.assert_allclose(conv(x, k), np_conv2d(np.asarray(x), np.asarray(k), strides, padding), rtol=1e-4,
                               atol=1e-4)
    assert not uses_onednn(conv, x, k)
    loss = lambda f: lambda a, b: jnp.sum(jnp.tanh(f(a, b)) ** 2)  # noqa: E731
    assert uses_onednn(jax.grad(loss(conv), argnums=1), x, k)
    for got, want in zip(jax.grad(loss(conv), (0, 1))(x, k), jax.grad(loss(ref), (0, 1))(x, k)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    tangents = case(6, x.shape, k.shape)
    np.testing.assert_allclose(jax.jvp(conv, (x, k), tangents)[1], jax.jvp(ref, (x, k), tangents)[1], rtol=1e-4,
                               atol=1e-4)
    np.testing.assert_allclose(jax.hessian(loss(conv), argnums=1)(x, k), jax.hessian(loss(ref), argnums=1)(x, k),
                               rtol=1e-4, atol=1e-4)


@needs_onednn
def test_eager_jit_and_numpy_agree():
    x, k = case(3, (3, 10, 9, 6), (3, 3, 6, 7))
    want = np_conv2d(x, k, (2, 2), ((1, 0), (2, 1)), (1, 1), 1)
    eager = fast(x, k, (2, 2), ((1, 0), (2, 1)))
    jitted = jax.jit(lambda x, k: fast(x, k, (2, 2), ((1, 0), (2, 1))))(x, k)
    np.testing.assert_allclose(eager, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jitted, want, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_vmap_over_kernels_and_inputs():
    x, k = case(4, (2, 7, 7, 3), (3, 3, 3, 4))
    xs, ks = jnp.stack([x, -2 * x]), jnp.stack([k, 0.5 * k])
    got = jax.vmap(fast)(xs, ks)
    want = jnp.stack([plain(x, k), plain(-2 * x, 0.5 * k)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    grads = jax.vmap(jax.grad(lambda x, k: jnp.sum(fast(x, k) ** 2), (0, 1)))(xs, ks)
    want_grads = jax.vmap(jax.grad(lambda x, k: jnp.sum(plain(x, k) ** 2), (0, 1)))(xs, ks)
    for g, w in zip(grads, want_grads):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


@needs_onednn
def test_gpu_lowering_is_xla_convolution():
    """On GPU the primitive lowers to XLA's convolution: no CPU custom call reaches the GPU compiler."""
    x, k = case(5, (2, 8, 8, 4), (3, 3, 4, 5))
    step = jax.jit(jax.grad(lambda x, k: jnp.sum(fast(x, k) ** 2), (0, 1)))
    cuda = jax.export.export(step, platforms=["cuda"])(x, k).mlir_module()
    assert "jaxcnn_onednn" not in cuda and "stablehlo.convolution" in cuda
    assert "jaxcnn_onednn_conv_bwd_weights" in step.lower(x, k).as_text()  # and the CPU uses oneDNN


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("JAXCNN_ONEDNN", "0")
    x, k = case(6, (2, 8, 8, 4), (3, 3, 4, 5))
    assert not onednn.available()
    assert not uses_onednn(fast, x, k)
    np.testing.assert_allclose(fast(x, k), plain(x, k), rtol=1e-5, atol=1e-5)


def test_missing_compiler_warns_once_and_falls_back(monkeypatch, tmp_path):
    """No C++ compiler: one warning naming the fix, then XLA's convolutions; nothing else changes."""
    monkeypatch.setenv("JAXCNN_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    onednn._library.cache_clear()
    onednn.implementations.cache_clear()
    try:
        x, k = case(7, (2, 8, 8, 4), (3, 3, 4, 5))
        with pytest.warns(RuntimeWarning, match="apt-get install g\\+\\+ libdnnl-dev"):
            assert not onednn.available()
        assert not uses_onednn(fast, x, k)
        np.testing.assert_allclose(fast(x, k), plain(x, k), rtol=1e-5, atol=1e-5)
        assert not list(tmp_path.glob("*.so"))
    finally:
        monkeypatch.undo()
        onednn._library.cache_clear()
        onednn.implementations.cache_clear()


def test_geometry_params_layout():
    geometry = onednn.Geometry((2, 9, 8, 4), (3, 2, 2, 6), (2, 4, 9, 6), (2, 1), ((1, 0), (2, 1)), (1, 2), 2, 1)
    assert geometry.params().tolist() == [2, 1, 1, 0, 2, 1, 1, 2, 2, 1]
    assert geometry.dims().tolist()[:9] == [2, 9, 8, 4, 3, 2, 6, 4, 9]
    assert geometry.out_shape("backward_weights") == (3, 2, 2, 6)


def test_one_thread_per_device_when_xla_runs_several_cpu_devices():
    """The tests run with 8 CPU devices (conftest): each convolution gets cores // 8, at least 1, OpenMP threads."""
    assert jax.local_device_count("cpu") == 8
    assert onednn.threads_per_device() == 1


def test_threads_follow_the_devices_a_strategy_runs_at_once():
    """A one-device step in an 8-device process gets every core (0); n devices get cores // n each."""
    cores = len(os.sched_getaffinity(0))
    with onednn.concurrent_devices(1):
        assert onednn.threads_per_device() == 0
        with onednn.concurrent_devices(2):
            assert onednn.threads_per_device() == max(1, cores // 2)
        assert onednn.threads_per_device() == 0
    assert onednn.threads_per_device() == 1  # outside any strategy: the 8 local CPU devices
    with pytest.raises(ValueError, match="at least 1"):
        with onednn.concurrent_devices(0):
            pass


def test_strategies_trace_their_steps_with_their_device_count(monkeypatch):
    from jaxcnn.config import ParallelConfig
    from jaxcnn.train import parallel

    seen = []
    monkeypatch.setattr(onednn, "threads_per_device", lambda: seen.append(onednn._CONCURRENT_DEVICES.get()) or 1)
    x = jnp.ones((8, 6, 6, 3), jnp.float32)
    k = jnp.ones((3, 3, 3, 4), jnp.float32)

    def eval_step(state, batch):
        return {"s": jnp.sum(fast(batch["image"], state))}

    for strategy_name, n in (("single", None), ("jit", 1), ("shard_map", 4)):
        strategy = parallel.make_strategy(ParallelConfig(strategy=strategy_name, num_devices=n), 8)
        seen.clear()
        batch = {"image": jax.device_put(x, strategy.batch_sharding)}
        strategy.compile_eval_step(eval_step)(strategy.place_state(k), batch)
        assert seen and set(seen) == {n or 1}, (strategy_name, seen)


@needs_onednn
def test_all_threads_setting_restores_the_default_on_the_calling_thread():
    """OpenMP's thread count is per thread and sticks: a one-thread convolution must not leave a later
    all-cores one (threads=0) on one thread (one-device steps in multi-device processes ran at half speed)."""
    import ctypes
    import threading

    gomp = ctypes.CDLL("libgomp.so.1")
    fresh = []  # a new thread starts from the process's default (this one may have run one-thread calls already)
    reader = threading.Thread(target=lambda: fresh.append(gomp.omp_get_max_threads()))
    reader.start()
    reader.join()
    for threads, expected in ((1, 1), (0, fresh[0])):
        geometry = onednn.Geometry((2, 8, 8, 4), (3, 3, 4, 5), (2, 8, 8, 5), (1, 1), PAD1, (1, 1), 1, threads)
        assert onednn.implementations.__wrapped__(geometry)  # uncached: calls the library on this thread
        assert gomp.omp_get_max_threads() == expected, threads


@needs_onednn
def test_xla_convolutions_context():
    x, k = case(8, (2, 8, 8, 4), (3, 3, 4, 5))
    with onednn.xla_convolutions():
        assert not uses_onednn(fast, x, k)
    assert uses_onednn(fast, x, k)


@needs_onednn
def test_devices_running_at_once_get_their_own_results():
    """pmap over the 8 CPU devices runs 8 oneDNN calls in parallel threads; each must see only its own data
    (a shared scratchpad gave wrong filter gradients) and repeat bit for bit."""
    xs, k = case(9, (8, 4, 12, 12, 16), (3, 3, 16, 16))
    grad = jax.grad(lambda x, k: jnp.sum(jnp.tanh(fast(x, k)) ** 2), (0, 1))
    runs = [jax.pmap(grad, in_axes=(0, None))(xs, k) for _ in range(3)]
    with onednn.xla_convolutions():
        want = [jax.jit(lambda x, k: jax.grad(lambda x, k: jnp.sum(jnp.tanh(fast(x, k)) ** 2), (0, 1))(x, k))(x, k)
                for x in xs]
    for d in range(8):  # 16 channels of whole 4x4 tiles run as Winograd: errors scale with the largest value
        for got, ref in ((runs[0][1][d], want[d][1]), (runs[0][0][d], want[d][0])):
            np.testing.assert_allclose(got, ref, rtol=1e-4, atol=3e-5 * float(np.max(np.abs(ref))))
    for again in runs[1:]:
        for a, b in zip(again, runs[0]):
            np.testing.assert_array_equal(a, b)


@needs_onednn
def test_binding_the_primitive_directly_loads_the_library(tmp_path):
    """A fresh process that binds the primitive without going through fast_conv (no `usable` call first)."""
    code = ("import jax, jax.numpy as jnp\n"
            "from jaxcnn.backends.cpu import kernels as onednn\n"
            "g = onednn.Geometry((2, 6, 6, 3), (3, 3, 3, 4), (2, 6, 6, 4), (1, 1), ((1, 1), (1, 1)), (1, 1), 1)\n"
            "y = jax.jit(lambda x, k: onednn.conv2d(x, k, g))(jnp.ones((2, 6, 6, 3)), jnp.ones((3, 3, 3, 4)))\n"
            "print(float(y[0, 2, 2, 0]))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "XLA_FLAGS": ""})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "27.0"  # 3x3 window of ones times 3 channels


@needs_onednn
@pytest.mark.parametrize("batch", [1, 3, 4, 6])
@pytest.mark.parametrize("groups, cin, cout, stride", [(1, 3, 8, 1), (1, 16, 16, 2), (2, 4, 6, 1)])
def test_batch_split_over_xla_threads_matches_xla(batch, groups, cin, cout, stride):
    """With every core (one device), a batch that splits evenly over XLA's threads runs as one one-thread primitive
    per slice (filter gradients summed over the slices); odd batches run as one call. Both agree with XLA."""
    x, k = case(20 + batch, (batch, 9, 9, cin), (3, 3, cin // groups, cout))
    strides = (stride, stride)

    def loss(conv):
        return lambda x, k: jnp.sum(jnp.sin(conv(x, k, strides, PAD1, (1, 1), groups)) ** 2)

    assert uses_onednn(loss(fast), x, k)
    np.testing.assert_allclose(jax.jit(lambda x, k: fast(x, k, strides, PAD1, (1, 1), groups))(x, k),
                               plain(x, k, strides, PAD1, (1, 1), groups), rtol=1e-5, atol=1e-5)
    for got, want in zip(jax.jit(jax.grad(loss(fast), (0, 1)))(x, k), jax.grad(loss(plain), (0, 1))(x, k)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
