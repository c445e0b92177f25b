"""jaxcnn.nn.fast_norm.BatchNorm: flax's BatchNorm in outputs, running statistics, variables and gradients.

Also against a from-scratch NumPy batch norm and its textbook gradient (float64).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcnn.nn import fast_norm, layers


def flax_bn(train: bool, dtype=None) -> nn.Module:
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype, use_fast_variance=False)


def fast_bn(train: bool, dtype=None) -> nn.Module:
    return fast_norm.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype)


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


def test_make_norm_keeps_flax_under_an_axis_name():
    assert isinstance(layers.make_norm("batch", train=True), fast_norm.BatchNorm)
    assert isinstance(layers.make_norm("batch", train=True, axis_name="batch"), nn.BatchNorm)
