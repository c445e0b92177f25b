"""jaxcnn.nn.BatchNorm and jaxcnn.backends.cpu.norm: flax's BatchNorm in outputs, running statistics, variables and gradients.

Also against a from-scratch NumPy batch norm and its textbook gradient (float64).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcnn.backends.cpu import kernels as onednn
from jaxcnn.backends.cpu import norm as fast_norm
from jaxcnn.backends.cpu import pool as fast_pool
from jaxcnn.nn import layers


def flax_bn(train: bool, dtype=None) -> nn.Module:
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype, use_fast_variance=False)


def fast_bn(train: bool, dtype=None) -> nn.Module:
    return layers.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype)


def random_inputs(shape, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal(shape) * 3.0 + 5.0, jnp.float32)  # |mean| >> std: the two-pass case
    weights = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    return x, weights


def variables_for(module, x, seed=1):
    variables = module.init(jax.random.PRNGKey(0), x)
    rng = np.random.default_rng(seed)
    c = x.shape[-1]
    params = {"scale": jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32),
              "bias": jnp.asarray(rng.standard_normal(c), jnp.float32)}
    stats = {"mean": jnp.asarray(rng.standard_normal(c), jnp.float32),
             "var": jnp.asarray(rng.uniform(0.5, 2.0, c), jnp.float32)}
    assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(
        {"params": params, "batch_stats": stats})
    return {"params": params, "batch_stats": stats}


@pytest.mark.parametrize("shape", [(8, 5, 4, 3), (16, 7)], ids=["NHWC", "NC"])
def test_training_mode_matches_flax(shape):
    x, weights = random_inputs(shape)
    variables = variables_for(fast_bn(True), x)

    def run(module):
        def loss(params, x):
            y, updates = module.apply({**variables, "params": params}, x, mutable=["batch_stats"])
            return jnp.sum(jnp.tanh(y) * weights), (y, updates["batch_stats"])

        (value, (y, stats)), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(variables["params"], x)
        return y, stats, grads

    y_fast, stats_fast, grads_fast = jax.jit(lambda: run(fast_bn(True)))()
    y_flax, stats_flax, grads_flax = run(flax_bn(True))
    np.testing.assert_allclose(y_fast, y_flax, rtol=1e-6, atol=1e-6)
    for got, want in zip(jax.tree_util.tree_leaves((stats_fast, grads_fast)),
                         jax.tree_util.tree_leaves((stats_flax, grads_flax))):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_eval_mode_matches_flax():
    x, _ = random_inputs((4, 3, 3, 5))
    variables = variables_for(fast_bn(False), x)
    np.testing.assert_allclose(fast_bn(False).apply(variables, x), flax_bn(False).apply(variables, x),
                               rtol=1e-6, atol=1e-6)


def test_gradient_against_numpy_formula():
    x, weights = random_inputs((6, 4, 4, 3), seed=3)
    variables = variables_for(fast_bn(True), x)

    def loss(x, params):
        y, _ = fast_bn(True).apply({**variables, "params": params}, x, mutable=["batch_stats"])
        return jnp.sum(y * weights)

    dx, dparams = jax.grad(loss, (0, 1))(x, variables["params"])
    xs, g = np.asarray(x, np.float64).reshape(-1, 3), np.asarray(weights, np.float64).reshape(-1, 3)
    scale = np.asarray(variables["params"]["scale"], np.float64)
    mean, var = xs.mean(0), xs.var(0)
    xhat = (xs - mean) / np.sqrt(var + 1e-5)
    m = xs.shape[0]
    want_dx = scale / np.sqrt(var + 1e-5) * (g - g.mean(0) - xhat * (g * xhat).mean(0))
    np.testing.assert_allclose(np.asarray(dx).reshape(-1, 3), want_dx, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dparams["scale"], (g * xhat).sum(0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dparams["bias"], g.sum(0), rtol=1e-5, atol=1e-5)
    assert m == 96


def test_bfloat16_compute_dtype():
    x, weights = random_inputs((8, 4, 4, 3))
    xb = x.astype(jnp.bfloat16)
    variables = variables_for(fast_bn(True, jnp.bfloat16), xb)
    y_fast, _ = fast_bn(True, jnp.bfloat16).apply(variables, xb, mutable=["batch_stats"])
    y_flax, _ = flax_bn(True, jnp.bfloat16).apply(variables, xb, mutable=["batch_stats"])
    assert y_fast.dtype == y_flax.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y_fast, np.float32), np.asarray(y_flax, np.float32), rtol=1e-2, atol=1e-2)
    dx = jax.grad(lambda v: jnp.sum(fast_bn(True, jnp.bfloat16).apply(variables, v, mutable=["batch_stats"])[0]
                                    .astype(jnp.float32) * weights))(xb)
    assert dx.dtype == jnp.bfloat16


@pytest.mark.parametrize("relu", [False, True])
def test_axis_name_matches_flax_synced_batchnorm_under_pmap(relu):
    """make_norm(axis_name=...) is jaxcnn's BatchNorm with its per-channel sums all-reduced: under pmap over 8
    devices it gives flax's synced BatchNorm's outputs and gradients (summed over devices), and the whole batch's
    running statistics on every device."""
    assert isinstance(layers.make_norm("batch", train=True, axis_name="b"), layers.BatchNorm)
    d = jax.device_count()
    x, weights = random_inputs((2 * d, 4, 4, 5))
    ours = layers.make_norm("batch", train=True, axis_name="b", activation=jax.nn.relu if relu else None)
    flax = nn.BatchNorm(use_running_average=False, axis_name="b", use_fast_variance=False)
    variables = variables_for(layers.make_norm("batch", train=True), x)

    def run(module, then_relu=False):
        def loss(params, x, w):
            y, updates = module.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                                      mutable=["batch_stats"])
            y = jax.nn.relu(y) if then_relu else y
            return jnp.sum(jnp.sin(y) * w), (y, updates["batch_stats"])

        grad = jax.grad(loss, argnums=(0, 1), has_aux=True)
        split = lambda a: a.reshape(d, -1, *a.shape[1:])  # noqa: E731
        replicated = jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (d, *a.shape)), variables["params"])
        (dparams, dx), (y, stats) = jax.pmap(grad, axis_name="b")(replicated, split(x), split(weights))
        return jax.tree_util.tree_map(lambda g: g.sum(0), dparams), dx.reshape(x.shape), y.reshape(x.shape), stats

    got, want = run(ours), run(flax, then_relu=relu)
    for a, b in zip(jax.tree_util.tree_leaves(got[:3]), jax.tree_util.tree_leaves(want[:3])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=2e-6)
    x64, start = np.asarray(x, np.float64), variables["batch_stats"]  # running statistics: by hand, every replica
    for name, batch in (("mean", x64.mean((0, 1, 2))), ("var", x64.var((0, 1, 2)))):
        want_stat = 0.9 * np.asarray(start[name], np.float64) + 0.1 * batch
        np.testing.assert_allclose(np.asarray(got[3][name]), np.broadcast_to(want_stat, (d, 5)), rtol=1e-5)


# ------------------------------------------------------------------------------------- native fused kernels (CPU)

needs_onednn = pytest.mark.skipif(not onednn.available(), reason="native kernel library unavailable")


def away_from_relu_kink(shape, seed, margin=1e-2):
    """(x, weights, scale, bias) whose pre-activations BatchNorm(x) * scale + bias are all further than `margin`
    from 0, so that the ReLU's mask cannot depend on float rounding (the kernel's sums are ordered differently)."""
    rng = np.random.default_rng(seed)
    c = shape[-1]
    scale = rng.uniform(0.5, 1.5, c)
    bias = rng.standard_normal(c) * 0.5
    x = rng.standard_normal(shape) * 2.0 + 3.0
    for _ in range(20):
        xs = x.reshape(-1, c)
        pre = (xs - xs.mean(0)) / np.sqrt(xs.var(0) + 1e-5) * scale + bias
        near = np.abs(pre) < margin
        if not near.any():
            break
        xs[near] += 0.5  # moves those values (and the statistics, a little): check again
    weights = rng.standard_normal(shape)
    return tuple(jnp.asarray(a, jnp.float32) for a in (x, weights, scale, bias))


def reference_bn_relu(x, scale, bias, relu):
    """flax's BatchNorm mathematics in JAX operations, then jax.nn.relu: (y, mean, var)."""
    y, mean, var = fast_norm.batch_norm_train(x, scale, bias, 1e-5)
    return (jax.nn.relu(y) if relu else y), mean, var


def numpy_bn_relu_grads(x, g, scale, bias, relu, residual=None):
    """Float64 NumPy: y = relu?(BatchNorm(x) * scale + bias [+ residual]) and the gradient of sum(y * g) in x,
    scale, bias (and the residual, appended when given)."""
    c = x.shape[-1]
    xs, gs = np.asarray(x, np.float64).reshape(-1, c), np.asarray(g, np.float64).reshape(-1, c)
    scale, bias = np.asarray(scale, np.float64), np.asarray(bias, np.float64)
    mean, var = xs.mean(0), xs.var(0)
    rstd = 1 / np.sqrt(var + 1e-5)
    xhat = (xs - mean) * rstd
    pre = xhat * scale + bias
    if residual is not None:
        pre = pre + np.asarray(residual, np.float64).reshape(-1, c)
    y = np.maximum(pre, 0) if relu else pre
    gs = gs * (pre > 0) if relu else gs
    dbias, dscale = gs.sum(0), (gs * xhat).sum(0)
    dx = scale * rstd * (gs - dbias / len(xs) - xhat * dscale / len(xs))
    out = (y.reshape(x.shape), mean, var, dx.reshape(x.shape), dscale, dbias)
    return out if residual is None else (*out, gs.reshape(x.shape))


def residual_away_from_kink(x, scale, bias, seed):
    """A residual r for which BatchNorm(x) * scale + bias + r keeps the sign of BatchNorm(x) * scale + bias (already
    away from 0), with |r| up to 1: the ReLU's mask cannot depend on rounding."""
    c = x.shape[-1]
    xs = np.asarray(x, np.float64).reshape(-1, c)
    pre = (xs - xs.mean(0)) / np.sqrt(xs.var(0) + 1e-5) * np.asarray(scale) + np.asarray(bias)
    r = np.abs(np.random.default_rng(seed).standard_normal(xs.shape)).clip(0, 1) * np.sign(pre)
    return jnp.asarray(r.reshape(x.shape), jnp.float32)


@needs_onednn
@pytest.mark.parametrize("relu", [True, False], ids=["bn-relu", "bn"])
@pytest.mark.parametrize("shape", [(16, 8, 8, 16), (32, 10), (2, 3, 4, 5, 6)], ids=["NHWC", "NC", "rank5"])
def test_onednn_path_against_numpy(shape, relu):
    x, g, scale, bias = away_from_relu_kink(shape, seed=len(shape))

    def loss(x, scale, bias):
        y, mean, var = fast_norm.batch_norm_act_train(x, scale, bias, 1e-5, relu)
        return jnp.sum(y * g), (y, mean, var)

    fn = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))
    assert "jaxcnn_batch_norm_bwd" in fn.lower(x, scale, bias).as_text()  # the native kernels, not XLA's
    (_, (y, mean, var)), (dx, dscale, dbias) = fn(x, scale, bias)
    want = numpy_bn_relu_grads(x, g, scale, bias, relu)
    for got, expected in zip((y, mean, var, dx, dscale, dbias), want):
        np.testing.assert_allclose(np.asarray(got, np.float64), expected, rtol=2e-4, atol=2e-4)


@needs_onednn
def test_native_statistics_where_the_mean_dwarfs_the_spread():
    """The kernel's one-pass moments (about a shift near the mean) against float64 where mean(x**2) - mean**2
    without a shift loses most float32 digits (mean 300, std 2: 12% off), a constant channel (variance 0) and a
    channel whose mean drifts along the batch (the shift is the mean of rows spread over x, not the first rows)."""
    rng = np.random.default_rng(7)
    n, c = 64 * 9 * 9, 3
    x = np.empty((n, c))
    x[:, 0] = 300.0 + 2.0 * rng.standard_normal(n)
    x[:, 1] = -41.5
    x[:, 2] = np.linspace(-500.0, 500.0, n) + rng.standard_normal(n)
    x = jnp.asarray(x.reshape(64, 9, 9, c), jnp.float32)
    _, mean, var = jax.jit(lambda x: fast_norm.batch_norm_act_train(x, jnp.ones(c), jnp.zeros(c), 1e-5, False))(x)
    xs = np.asarray(x, np.float64).reshape(-1, c)
    spread = xs.std(0) + np.abs(xs.mean(0))  # the float32 sums' own rounding scales with it
    np.testing.assert_array_less(np.abs(np.asarray(mean, np.float64) - xs.mean(0)), 1e-6 * spread + 1e-12)
    np.testing.assert_allclose(np.asarray(var, np.float64), xs.var(0), rtol=1e-5, atol=1e-9)


def bf16_ulps(a, b):
    """|a - b| in units of b's bfloat16 spacing (8 significant bits; values below 1e-3 count from 1e-3)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b) / (np.maximum(np.abs(b), 1e-3) * 2.0 ** -7)


@needs_onednn
@pytest.mark.parametrize("relu", [True, False], ids=["bn-relu", "bn"])
@pytest.mark.parametrize("shape", [(16, 8, 8, 16), (5, 7, 3, 48), (3, 5, 5, 208)],
                         ids=["16ch", "48ch-105rows", "208ch-75rows"])
def test_native_bfloat16_path_against_numpy(shape, relu):
    """bfloat16 activations, y asked for in bfloat16: the native kernel computes in float32 and rounds y and dx once.
    The shapes take every way the AVX-512 loops group channels (16 = 1 vector; 48 = 2 + 1; 208 = 8 + 4 + 1) and
    row counts that are not a multiple of the rows summed side by side.

    Reference: float64 NumPy on the bfloat16 values of x and of the cotangent, rounded to bfloat16 at the end."""
    x, g, scale, bias = away_from_relu_kink(shape, seed=12)
    xb, gb = x.astype(jnp.bfloat16), g.astype(jnp.bfloat16)

    def loss(x, scale, bias):
        y, mean, var = fast_norm.batch_norm_act_train(x, scale, bias, 1e-5, relu, dtype=jnp.bfloat16)
        return jnp.sum(y.astype(jnp.float32) * gb.astype(jnp.float32)), (y, mean, var)

    fn = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))
    hlo = fn.lower(xb, scale, bias).as_text()
    assert "jaxcnn_batch_norm_bwd" in hlo and "jaxcnn_batch_norm_fwd" in hlo
    (_, (y, mean, var)), (dx, dscale, dbias) = fn(xb, scale, bias)
    assert y.dtype == dx.dtype == jnp.bfloat16 and mean.dtype == dscale.dtype == jnp.float32
    want_y, want_mean, want_var, want_dx, want_dscale, want_dbias = numpy_bn_relu_grads(
        np.asarray(xb, np.float64), np.asarray(gb, np.float64), scale, bias, relu)
    assert bf16_ulps(y, want_y).max() <= 1.0 and bf16_ulps(dx, want_dx).max() <= 1.0
    for got, expected in ((mean, want_mean), (var, want_var), (dscale, want_dscale), (dbias, want_dbias)):
        np.testing.assert_allclose(np.asarray(got, np.float64), expected, rtol=2e-4, atol=2e-4)


@needs_onednn
@pytest.mark.parametrize("relu", [True, False], ids=["bn-add-relu", "bn-add"])
def test_native_residual_path_against_numpy(relu):
    """relu?(BatchNorm(x) + residual) in one native call: values and all four gradients against float64 NumPy."""
    x, g, scale, bias = away_from_relu_kink((16, 8, 8, 16), seed=13)
    r = residual_away_from_kink(x, scale, bias, seed=14)

    def loss(x, scale, bias, r):
        y, mean, var = fast_norm.batch_norm_act_train(x, scale, bias, 1e-5, relu, residual=r)
        return jnp.sum(y * g), (y, mean, var)

    fn = jax.jit(jax.value_and_grad(loss, (0, 1, 2, 3), has_aux=True))
    hlo = fn.lower(x, scale, bias, r).as_text()
    assert "jaxcnn_batch_norm_add_fwd" in hlo and "jaxcnn_batch_norm_add_bwd" in hlo
    (_, (y, mean, var)), (dx, dscale, dbias, dr) = fn(x, scale, bias, r)
    want = numpy_bn_relu_grads(x, g, scale, bias, relu, residual=r)
    for got, expected in zip((y, mean, var, dx, dscale, dbias, dr), want):
        np.testing.assert_allclose(np.asarray(got, np.float64), expected, rtol=2e-4, atol=2e-4)


@needs_onednn
def test_native_residual_path_bfloat16_and_second_derivatives():
    """bfloat16 activations with a residual: within one bfloat16 step of float64 NumPy; and a Hessian-vector
    product through the fused layer equals the JAX composition's."""
    x, g, scale, bias = away_from_relu_kink((16, 8, 8, 16), seed=15)
    r = residual_away_from_kink(x, scale, bias, seed=16)
    xb, rb, gb = x.astype(jnp.bfloat16), r.astype(jnp.bfloat16), g.astype(jnp.bfloat16)

    def loss(x, scale, bias, r):
        y, _, _ = fast_norm.batch_norm_act_train(x, scale, bias, 1e-5, True, dtype=jnp.bfloat16, residual=r)
        return jnp.sum(y.astype(jnp.float32) * gb.astype(jnp.float32)), y

    (_, y), (dx, _, dbias, dr) = jax.jit(jax.value_and_grad(loss, (0, 1, 2, 3), has_aux=True))(xb, scale, bias, rb)
    want_y, _, _, want_dx, _, want_dbias, want_dr = numpy_bn_relu_grads(
        np.asarray(xb, np.float64), np.asarray(gb, np.float64), scale, bias, True, residual=np.asarray(rb, np.float64))
    assert y.dtype == dx.dtype == dr.dtype == jnp.bfloat16
    assert bf16_ulps(y, want_y).max() <= 1.0 and bf16_ulps(dx, want_dx).max() <= 1.0
    np.testing.assert_array_equal(np.asarray(dr, np.float64), want_dr)  # dy where the ReLU passed it, exactly
    np.testing.assert_allclose(dbias, want_dbias, rtol=2e-4, atol=2e-4)

    v = jnp.asarray(np.random.default_rng(17).standard_normal(x.shape), jnp.float32)

    def hvp(layer):
        def loss(x, s, r):
            return jnp.sum(jnp.tanh(layer(x, s, r)) * g)
        return jax.grad(lambda x, s, r: jnp.vdot(jax.grad(loss, (0, 2))(x, s, r)[0], v), (0, 1, 2))(x, scale, r)

    fused = hvp(lambda x, s, r: fast_norm.batch_norm_act_train(x, s, bias, 1e-5, True, residual=r)[0])
    composed = hvp(lambda x, s, r: jax.nn.relu(fast_norm.batch_norm_train(x, s, bias, 1e-5)[0] + r))
    for got, want in zip(fused, composed):
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)


@needs_onednn
def test_onednn_path_statistics_cotangents_and_second_derivatives():
    """Losses that use the batch mean and variance, and a Hessian-vector product: the same as the JAX reference."""
    x, g, scale, bias = away_from_relu_kink((8, 4, 4, 8), seed=5)
    v = jnp.asarray(np.random.default_rng(6).standard_normal(x.shape), jnp.float32)

    def loss_with(fn):
        def loss(x, scale, bias):
            y, mean, var = fn(x, scale, bias)
            return jnp.sum(jnp.tanh(y) * g) + jnp.sum(mean ** 2) + jnp.sum(jnp.sqrt(var))
        return loss

    fast = loss_with(lambda x, s, b: fast_norm.batch_norm_act_train(x, s, b, 1e-5, True))
    ref = loss_with(lambda x, s, b: reference_bn_relu(x, s, b, True))
    for got, want in zip(jax.grad(fast, (0, 1, 2))(x, scale, bias), jax.grad(ref, (0, 1, 2))(x, scale, bias)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)

    def hvp(loss):  # reverse over reverse: custom_vjp functions (this layer, batch_norm_train) have no forward mode
        return jax.grad(lambda x, s: jnp.vdot(jax.grad(loss)(x, s, bias), v), (0, 1))(x, scale)

    for got, want in zip(hvp(fast), hvp(ref)):
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)


@needs_onednn
def test_onednn_path_under_vmap():
    x, g, scale, bias = away_from_relu_kink((3, 8, 4, 4, 8), seed=7)  # 3 independent batches of [8, 4, 4, 8]
    fast = jax.vmap(lambda x: fast_norm.batch_norm_act_train(x, scale, bias, 1e-5, True))
    ref = jax.vmap(lambda x: reference_bn_relu(x, scale, bias, True))
    for got, want in zip(fast(x), ref(x)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    dfast = jax.grad(lambda x: jnp.sum(fast(x)[0] * g))(x)
    dref = jax.grad(lambda x: jnp.sum(ref(x)[0] * g))(x)
    np.testing.assert_allclose(dfast, dref, rtol=1e-4, atol=1e-5)


@needs_onednn
def test_exported_for_gpu_without_cpu_kernels():
    """A training step traced here and exported for CUDA holds XLA's BatchNorm, not the CPU's custom calls."""
    x, g, scale, bias = away_from_relu_kink((8, 4, 4, 8), seed=10)
    step = jax.jit(jax.grad(lambda x, s, b: jnp.sum(fast_norm.batch_norm_act_train(x, s, b, 1e-5, True)[0] * g),
                            (0, 1, 2)))
    cuda = jax.export.export(step, platforms=["cuda"])(x, scale, bias).mlir_module()
    assert "jaxcnn_onednn" not in cuda and "jaxcnn_batch_norm" not in cuda
    assert "jaxcnn_batch_norm_bwd" in step.lower(x, scale, bias).as_text()


def test_xla_path_off_the_cpu_or_when_switched_off(monkeypatch):
    """Other backends (and JAXCNN_ONEDNN=0) run the composition in XLA, with the same values."""
    x, g, scale, bias = away_from_relu_kink((8, 4, 4, 8), seed=8)
    want = reference_bn_relu(x, scale, bias, True)
    for patch in (lambda: monkeypatch.setattr(onednn.jax, "default_backend", lambda: "gpu"),
                  lambda: monkeypatch.setenv("JAXCNN_ONEDNN", "0")):
        patch()
        fn = jax.jit(lambda x: fast_norm.batch_norm_act_train(x, scale, bias, 1e-5, True))
        assert "jaxcnn_batch_norm" not in fn.lower(x).as_text()
        for got, expected in zip(fn(x), want):
            np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
        monkeypatch.undo()


@pytest.mark.parametrize("axis_name", [None, "batch"])
def test_make_norm_with_activation_is_the_composition(axis_name):
    """make_norm(..., activation=relu) is relu(make_norm(...)): same variables, values, statistics and gradients,
    fused into the fast BatchNorm when there is no axis_name; other activations are applied after the norm."""
    x, g, _, _ = away_from_relu_kink((8, 4, 4, 6), seed=9)
    if axis_name is None:
        assert isinstance(layers.make_norm("batch", train=True, activation=jax.nn.relu), layers.BatchNorm)
    variables = variables_for(fast_bn(True) if axis_name is None else flax_bn(True), x)

    def run(layer_fn):
        class Host(nn.Module):
            @nn.compact
            def __call__(self, v):
                return layer_fn()(v)

        def loss(params, x):
            y, upd = Host().apply({"params": {"norm": params}, "batch_stats": {"norm": variables["batch_stats"]}},
                                  x, mutable=["batch_stats"])
            return jnp.sum(y * g), (y, upd)

        if axis_name is not None:
            return jax.vmap(jax.value_and_grad(loss, (0, 1), has_aux=True), in_axes=(None, 0),
                            axis_name=axis_name)(variables["params"], x[None])
        return jax.value_and_grad(loss, (0, 1), has_aux=True)(variables["params"], x)

    for act in (jax.nn.relu, jax.nn.gelu):
        fused = run(lambda: layers.make_norm("batch", train=True, axis_name=axis_name, name="norm", activation=act))
        composed = run(lambda: (lambda n: (lambda v: act(n(v))))(
            layers.make_norm("batch", train=True, axis_name=axis_name, name="norm")))
        for got, want in zip(jax.tree_util.tree_leaves(fused), jax.tree_util.tree_leaves(composed)):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@needs_onednn
def test_pool_follows_keeps_xla_fusions_with_the_same_values():
    """make_norm(pool_follows=True): the XLA path (no custom call), same variables, outputs and gradients."""
    x, g, _, _ = away_from_relu_kink((8, 4, 4, 6), seed=11)
    layers_by_flag = {flag: layers.make_norm("batch", train=True, activation=jax.nn.relu, pool_follows=flag)
                      for flag in (False, True)}
    assert layers_by_flag[True].pool_follows and not layers_by_flag[False].pool_follows
    variables = variables_for(fast_bn(True), x)
    results = {}
    for flag, layer in layers_by_flag.items():
        def loss(params, x, layer=layer):
            y, upd = layer.apply({**variables, "params": params}, x, mutable=["batch_stats"])
            return jnp.sum(y * g), (y, upd)

        fn = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))
        assert ("jaxcnn_batch_norm" in fn.lower(variables["params"], x).as_text()) is not flag
        results[flag] = fn(variables["params"], x)
    for got, want in zip(jax.tree_util.tree_leaves(results[True]), jax.tree_util.tree_leaves(results[False])):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def numpy_max_pool_choice(y, window):
    """Float64 NumPy max over non-overlapping windows and the chosen element (the first maximum, row-major), for
    the pooled cotangent's scatter."""
    kh, kw = window
    n, h, w, c = y.shape
    ho, wo = h // kh, w // kw
    windows = y[:, :ho * kh, :wo * kw].reshape(n, ho, kh, wo, kw, c).transpose(0, 1, 3, 5, 2, 4)
    flat = windows.reshape(n, ho, wo, c, kh * kw)
    return flat.max(-1), flat.argmax(-1)


def numpy_scatter(g, choice, shape, window):
    kh, kw = window
    n, ho, wo, c = g.shape
    dy = np.zeros(shape)
    idx = np.indices(g.shape)
    dy[idx[0], idx[1] * kh + choice // kw, idx[2] * kw + choice % kw, idx[3]] = g
    return dy


@needs_onednn
@pytest.mark.parametrize("relu", [True, False], ids=["bn-relu-pool", "bn-pool"])
@pytest.mark.parametrize("shape", [(8, 12, 12, 16), (4, 7, 7, 32), (3, 5, 6, 24)],
                         ids=["avx512", "avx512-odd-size", "portable-24ch"])
def test_native_norm_max_pool_is_the_composition(shape, relu):
    """BatchNorm (+ ReLU) then a 2x2 max pool in one native call each way: the separate native kernels' values
    (the statistics bit for bit), both against float64 NumPy, and their gradients to float32 rounding; a program
    exported for a GPU holds none of it."""
    x, _, scale, bias = away_from_relu_kink(shape, seed=sum(shape))
    rng = np.random.default_rng(len(shape))

    def fused(x, s, b):
        return fast_norm.batch_norm_act_max_pool_train(x, s, b, 1e-5, relu, (2, 2))

    def separate(x, s, b):
        y, mean, var = fast_norm.batch_norm_act_train(x, s, b, 1e-5, relu)
        return fast_pool.max_pool_tiled(y, (2, 2)), mean, var

    got, want = jax.jit(fused)(x, scale, bias), jax.jit(separate)(x, scale, bias)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6, atol=1e-6)  # bit for bit in the AVX-512 loops
    np.testing.assert_array_equal(got[1], want[1])  # the same statistics code
    np.testing.assert_array_equal(got[2], want[2])
    g = jnp.asarray(rng.standard_normal(got[0].shape), jnp.float32)
    y64, _, _, _, _, _ = numpy_bn_relu_grads(x, np.zeros(shape), scale, bias, relu)
    pooled, choice = numpy_max_pool_choice(y64, (2, 2))
    np.testing.assert_allclose(got[0], pooled, rtol=2e-4, atol=2e-4)
    _, _, _, dx, dscale, dbias = numpy_bn_relu_grads(x, numpy_scatter(np.asarray(g, np.float64), choice, shape,
                                                                      (2, 2)), scale, bias, relu)

    def grads(fn):
        step = jax.jit(jax.grad(lambda x, s, b: jnp.sum(fn(x, s, b)[0] * g), (0, 1, 2)))
        return step, step(x, scale, bias)

    step, fused_grads = grads(fused)
    assert "jaxcnn_batch_norm_max_pool_bwd" in step.lower(x, scale, bias).as_text()
    for a, b, c in zip(fused_grads, grads(separate)[1], (dx, dscale, dbias)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(a, c, rtol=2e-4, atol=2e-4)
    cuda = jax.export.export(step, platforms=["cuda"])(x, scale, bias).mlir_module()
    assert "jaxcnn_batch_norm" not in cuda


@needs_onednn
def test_native_norm_max_pool_statistics_cotangents_and_second_derivatives():
    """Losses that use the batch statistics, and a Hessian-vector product, through the fused call: the same as
    JAX's composition of BatchNorm, ReLU and lax's max pool."""
    x, _, scale, bias = away_from_relu_kink((4, 6, 6, 16), seed=11)
    rng = np.random.default_rng(12)
    g = jnp.asarray(rng.standard_normal((4, 3, 3, 16)), jnp.float32)
    v = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)

    def reference(x, s, b):
        y, mean, var = reference_bn_relu(x, s, b, True)
        pooled = jax.lax.reduce_window(y, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
        return pooled, mean, var

    def loss_with(fn):
        def loss(x, s, b):
            y, mean, var = fn(x, s, b)
            return jnp.sum(jnp.tanh(y) * g) + jnp.sum(mean ** 2) + jnp.sum(jnp.sqrt(var))
        return loss

    fast = loss_with(lambda x, s, b: fast_norm.batch_norm_act_max_pool_train(x, s, b, 1e-5, True, (2, 2)))
    ref = loss_with(reference)
    for got, want in zip(jax.grad(fast, (0, 1, 2))(x, scale, bias), jax.grad(ref, (0, 1, 2))(x, scale, bias)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)

    def hvp(loss):
        return jax.grad(lambda x, s: jnp.vdot(jax.grad(loss)(x, s, bias), v), (0, 1))(x, scale)

    for got, want in zip(hvp(fast), hvp(ref)):
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)


@needs_onednn
@pytest.mark.parametrize("c", [16, 12], ids=["vector-loops", "portable-loops"])
def test_bfloat16_nan_stays_in_its_channel(c):
    """A NaN in one channel's input: that channel's y and dx come out NaN (as XLA rounds a NaN to bfloat16: a quiet
    NaN), the other channels' values finite and equal to the run without it (channels in multiples of 16 take the
    AVX-512 bfloat16 loops, 12 the portable ones)."""
    rng = np.random.default_rng(21)
    x = rng.standard_normal((4, 6, 6, c)).astype(np.float32)
    g = jnp.asarray(rng.standard_normal(x.shape), jnp.bfloat16)
    scale, bias = jnp.ones(c), jnp.zeros(c)

    def run(x):
        def loss(x):
            y, _, _ = fast_norm.batch_norm_act_train(x, scale, bias, 1e-5, False, dtype=jnp.bfloat16)
            return jnp.sum(y.astype(jnp.float32) * g.astype(jnp.float32)), y
        fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
        xb = jnp.asarray(x, jnp.bfloat16)
        assert "jaxcnn_batch_norm_bwd" in fn.lower(xb).as_text()
        (_, y), dx = fn(xb)
        return np.asarray(y, np.float32), np.asarray(dx, np.float32)

    y0, dx0 = run(x)
    x[1, 2, 3, 5] = np.nan
    y, dx = run(x)
    assert np.isnan(y[..., 5]).all() and np.isnan(dx[..., 5]).all()
    others = [k for k in range(c) if k != 5]
    np.testing.assert_array_equal(y[..., others], y0[..., others])
    np.testing.assert_array_equal(dx[..., others], dx0[..., others])


@needs_onednn
def test_bfloat16_rounding_instruction_gives_the_integer_roundings_bits():
    """Where the CPU has AVX512-BF16, the bfloat16 loops round with its instruction; JAXCNN_AVX512_BF16=0 keeps the
    vector integer rounding. Both give the same bits for y, dx, the residual's gradient and the statistics (a run in
    a subprocess for each, NaN and infinities among the values)."""
    with open("/proc/cpuinfo") as f:
        has_instruction = "avx512_bf16" in f.read().split()
    if not has_instruction:
        pytest.skip("the CPU has no AVX512-BF16: only the integer rounding runs")
    code = textwrap.dedent("""
        import sys
        import jax, jax.numpy as jnp, numpy as np
        from jaxcnn.backends.cpu import norm
        rng = np.random.default_rng(3)
        shape = (4, 5, 6, 48)
        x = rng.standard_normal(shape).astype(np.float32) * 3.0
        x[0, 0, 0, :3] = [np.nan, np.inf, -np.inf]
        x, r, g = (jnp.asarray(v, jnp.bfloat16) for v in (x, rng.standard_normal(shape), rng.standard_normal(shape)))
        scale, bias = jnp.asarray(rng.uniform(0.5, 1.5, 48), jnp.float32), jnp.asarray(rng.standard_normal(48), jnp.float32)

        def loss(x, r):
            y, mean, var = norm.batch_norm_act_train(x, scale, bias, 1e-5, True, dtype=jnp.bfloat16, residual=r)
            return jnp.sum(y.astype(jnp.float32) * g.astype(jnp.float32)), (y, mean, var)

        (_, aux), grads = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(x, r)
        from jaxcnn.backends.cpu import kernels
        print("instruction", kernels.bfloat16_rounding_instruction())
        np.savez(sys.argv[1], *[np.asarray(v).view(np.uint16) if v.dtype == jnp.bfloat16 else np.asarray(v)
                                for v in (*aux, *grads)])
    """)
    runs = []
    for value in (None, "0"):
        env = {k: v for k, v in os.environ.items() if k != "JAXCNN_AVX512_BF16"}
        if value is not None:
            env["JAXCNN_AVX512_BF16"] = value
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "out.npz")
            run = subprocess.run([sys.executable, "-c", code, out], env=env, check=True, capture_output=True,
                                 text=True)
            assert f"instruction {value is None}" in run.stdout, run.stdout  # which rounding ran
            with np.load(out) as f:
                runs.append([f[k] for k in sorted(f.files, key=lambda k: int(k.split("_")[1]))])
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)
