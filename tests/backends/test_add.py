"""jaxcnn.backends.cpu.fan_out (`add` and `fan_out`): the native sum of two activations gives the bits of a NumPy float32
sum (rounded once to bfloat16 by ml_dtypes for bfloat16 operands), and `fan_out`'s gradient is that sum of its two
paths' gradients; in a residual block every gradient is the same bits as with XLA's add, and to second order and
under vmap the same as for x read twice.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxcnn import backends
from jaxcnn.backends.cpu import fan_out as fan_out_module
from jaxcnn.backends.cpu import kernels as onednn
from jaxcnn.nn import blocks, layers

needs_native = pytest.mark.skipif(not onednn.available(), reason="native library unavailable (g++ / libdnnl-dev)")


def operands(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    a, b = (rng.standard_normal(shape).astype(np.float32) * 4 for _ in range(2))
    a.flat[:3] = [np.inf, -np.inf, np.nan]  # infinities and NaN go through the sum too
    b.flat[:3] = [1.0, np.inf, 2.0]
    return a.astype(dtype), b.astype(dtype)


def numpy_sum(a, b):
    """a + b in float32, rounded once to a's dtype (ml_dtypes rounds to nearest even)."""
    with np.errstate(invalid="ignore"):  # inf + -inf
        return (a.astype(np.float32) + b.astype(np.float32)).astype(a.dtype)


def assert_same_values(got, want):
    """Equal bit for bit where not NaN, and NaN where NaN (XLA and the kernel keep different NaN payloads)."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype and got.shape == want.shape
    nan = np.isnan(want.astype(np.float32))
    np.testing.assert_array_equal(np.isnan(got.astype(np.float32)), nan)
    bits = np.uint16 if got.dtype.itemsize == 2 else np.uint32
    np.testing.assert_array_equal(got.view(bits)[~nan], want.view(bits)[~nan])


@needs_native
@pytest.mark.parametrize("threads", ["pool", "calling-thread"])
@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("shape", [(4, 8, 8, 16), (3, 5, 7, 9), (70001,)], ids=["NHWC", "odd", "long-1d"])
def test_native_add_gives_the_numpy_sum(shape, dtype, threads):
    a, b = operands(shape, dtype)
    devices = onednn.concurrent_devices(1) if threads == "pool" else onednn.concurrent_devices(2)
    with devices:
        got = jax.jit(fan_out_module.add)(a, b)
    assert_same_values(got, numpy_sum(a, b))


@needs_native
def test_native_add_rejects_operands_of_different_shapes_or_types():
    a = jnp.zeros((4, 4), jnp.float32)
    with pytest.raises(ValueError, match="one shape"):
        fan_out_module.add(a, jnp.zeros((4, 5), jnp.float32))
    with pytest.raises(ValueError, match="both float32 or both bfloat16"):
        fan_out_module.add(a, a.astype(jnp.bfloat16))
    with pytest.raises(ValueError, match="both float32 or both bfloat16"):
        fan_out_module.add(a.astype(jnp.float16), a.astype(jnp.float16))


def path_one(a, w):
    return jnp.sum(jnp.tanh(a.astype(jnp.float32)) * w)


def path_two(b, w):
    return jnp.sum(b.astype(jnp.float32) ** 2 * w[::-1])


def two_path_loss(fork):
    """A function reading x along two paths with different gradients, x forked by `fork`."""
    def loss(x, w):
        a, b = fork(x)
        return path_one(a, w) + path_two(b, w)
    return loss


@needs_native
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_fan_out_gradient_is_the_sum_of_the_two_paths_gradients(dtype):
    """The gradient through `fan_out` (summed natively: jaxcnn_add in the program) is the NumPy sum of the two
    paths' gradients, each taken alone, to the bit; smaller arrays and other platforms keep XLA's add."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((8, 16, 16, 16)), dtype)
    w = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    native = jax.jit(jax.grad(two_path_loss(backends.fan_out)))
    assert "jaxcnn_add" in native.lower(x, w).as_text()
    one, two = (np.asarray(jax.jit(jax.grad(path))(x, w)) for path in (path_one, path_two))
    assert_same_values(native(x, w), numpy_sum(one, two))
    small = x[:, :4, :4, :]
    assert small.size < fan_out_module.MIN_VALUES
    assert "jaxcnn_add" not in native.lower(small, w[:, :4, :4, :]).as_text()
    cuda = jax.export.export(native, platforms=["cuda"])(x, w).mlir_module()
    assert "jaxcnn_add" not in cuda


@needs_native
def test_fan_out_second_derivatives_and_vmap():
    """A Hessian-vector product through `fan_out` and its gradient under vmap: the same as for x read twice."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((4, 16, 16, 16)), jnp.float32)
    w = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    v = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)

    def hvp(fork):
        return jax.grad(lambda x: jnp.vdot(jax.grad(two_path_loss(fork))(x, w), v))(x)

    np.testing.assert_allclose(hvp(backends.fan_out), hvp(lambda t: (t, t)), rtol=1e-5, atol=1e-5)
    batched = jax.vmap(jax.grad(two_path_loss(backends.fan_out)), in_axes=(0, None))(jnp.stack([x, -x]), w)
    plain = jax.vmap(jax.grad(two_path_loss(lambda t: (t, t))), in_axes=(0, None))(jnp.stack([x, -x]), w)
    np.testing.assert_allclose(batched, plain, rtol=1e-6, atol=1e-6)  # XLA may fuse the plain sum (an FMA)


@needs_native
@pytest.mark.parametrize("preact", [False, True], ids=["post-activation", "pre-activation"])
@pytest.mark.parametrize("features, strides", [(16, 1), (32, 2)], ids=["identity", "projection"])
def test_residual_block_gradients_bit_for_bit_with_and_without_the_native_sum(monkeypatch, preact, features,
                                                                              strides):
    """A residual block forks its input (or, for a pre-activation projection, the pre-activated input) between its
    branch and its shortcut: every gradient is the same bits whether the two paths' gradients are summed natively
    or by XLA (the native sum switched off by raising its size threshold)."""
    block = blocks.BasicBlock(features, strides=strides, preact=preact,
                              conv=functools.partial(layers.Conv2d, use_bias=False),
                              norm=functools.partial(layers.make_norm, "batch", train=True))
    x = jnp.asarray(np.random.default_rng(3).standard_normal((8, 16, 16, 16)), jnp.float32)
    variables = block.init(jax.random.PRNGKey(0), x)

    def grads():
        def loss(params, x):
            y, _ = block.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
            return jnp.sum(jnp.tanh(y))
        fn = jax.jit(jax.grad(loss, (0, 1)))
        return fn.lower(variables["params"], x).as_text(), fn(variables["params"], x)

    hlo, native = grads()
    assert "jaxcnn_add" in hlo
    monkeypatch.setattr(fan_out_module, "MIN_VALUES", 1 << 40)
    hlo, plain = grads()
    assert "jaxcnn_add" not in hlo
    for got, want in zip(jax.tree_util.tree_leaves(native), jax.tree_util.tree_leaves(plain)):
        np.testing.assert_array_equal(got, want)


@needs_native
def test_fan_out_under_pmap_on_several_devices():
    """Each device sums its own shard's gradients (the kernel on the calling thread): the single-device result."""
    n_dev = jax.local_device_count()
    if n_dev < 2:
        pytest.skip("needs several CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((n_dev, 2, 16, 16, 32)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal(x.shape[1:]), jnp.float32)
    grad = jax.grad(two_path_loss(backends.fan_out))
    per_device = jax.pmap(grad, in_axes=(0, None))(x, w)
    for i in range(n_dev):
        one, two = (np.asarray(jax.jit(jax.grad(path))(x[i], w)) for path in (path_one, path_two))
        assert_same_values(per_device[i], numpy_sum(one, two))


@needs_native
def test_fan_out_in_forward_mode_and_a_residual_block_under_jvp(monkeypatch):
    """Forward mode through `fan_out` (jvp, linearize) gives x read twice's tangents; so does a residual block in
    evaluation mode, whose input is forked (its BatchNorm then uses the running statistics: no native kernel of its
    own), and vmap of the native add broadcasts an unbatched operand."""
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((8, 16, 16, 16)), jnp.float32)
    w = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    t = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    native, plain = two_path_loss(backends.fan_out), two_path_loss(lambda v: (v, v))
    np.testing.assert_allclose(jax.jvp(lambda x: native(x, w), (x,), (t,))[1],
                               jax.jvp(lambda x: plain(x, w), (x,), (t,))[1], rtol=1e-5)
    _, lin = jax.linearize(lambda x: native(x, w), x)
    np.testing.assert_allclose(lin(t), jax.jvp(lambda x: plain(x, w), (x,), (t,))[1], rtol=1e-5)

    block = blocks.BasicBlock(16, conv=functools.partial(layers.Conv2d, use_bias=False),
                              norm=functools.partial(layers.make_norm, "batch", train=False))
    variables = block.init(jax.random.PRNGKey(0), x)

    def tangent():
        fn = jax.jit(lambda x, t: jax.jvp(lambda v: block.apply(variables, v), (x,), (t,)))
        return fn.lower(x, t).as_text(), fn(x, t)

    hlo, (y, dy) = tangent()
    assert "jaxcnn_fan_out" not in hlo  # fan_out_p lowers to its operand, twice
    monkeypatch.setattr(fan_out_module, "MIN_VALUES", 1 << 40)
    _, (y_plain, dy_plain) = tangent()
    np.testing.assert_array_equal(y, y_plain)
    np.testing.assert_array_equal(dy, dy_plain)

    a = jnp.asarray(rng.standard_normal((3, 64, 64, 4)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((64, 64, 4)), jnp.float32)
    summed = jax.jit(jax.vmap(fan_out_module.add, in_axes=(0, None)))(a, b)
    np.testing.assert_array_equal(summed, np.asarray(a) + np.asarray(b)[None])
