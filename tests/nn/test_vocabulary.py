"""The public vocabulary of jaxcnn.nn: one name per idea (kernel_size, window_shape, strides), the old names as
deprecated aliases, BatchNorm as a module and a function, and block arguments that fail with errors naming the block
and the argument."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcnn.nn as jnn
from jaxcnn.nn import blocks


def test_conv_output_size_takes_kernel_size_and_strides_and_the_old_names_warn():
    assert jnn.conv_output_size(32, kernel_size=3, strides=2, padding=1) == (32 + 2 - 3) // 2 + 1
    with pytest.warns(DeprecationWarning) as caught:
        assert jnn.conv_output_size(32, kernel=3, stride=2, padding=1) == 16
    assert {str(w.message).split(": ")[1] for w in caught} == {
        "kernel= is a deprecated name of kernel_size=; pass kernel_size=",
        "stride= is a deprecated name of strides=; pass strides="}
    with pytest.raises(TypeError, match="pass strides="):
        jnn.conv_output_size(32, 3, stride=2, strides=2)


@pytest.mark.parametrize("pool", [jnn.max_pool, jnn.avg_pool, jnn.l2_pool])
def test_pooling_takes_window_shape_and_window_warns(pool):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 6, 6, 2)), jnp.float32)
    want = pool(x, window_shape=3, strides=1, padding=1)
    with pytest.warns(DeprecationWarning, match="window= is a deprecated name of window_shape="):
        np.testing.assert_array_equal(pool(x, window=3, strides=1, padding=1), want)
    layer = jnn.Pool2d({jnn.max_pool: "max", jnn.avg_pool: "avg", jnn.l2_pool: "l2"}[pool], window_shape=3, strides=1,
                       padding=1)
    np.testing.assert_array_equal(layer.apply({}, x), want)
    with pytest.warns(DeprecationWarning, match="window_shape="):
        np.testing.assert_array_equal(layer.clone(window_shape=2, window=3).apply({}, x), want)


def numpy_batch_norm(x, scale, bias, mean=None, var=None, eps=1e-5):
    x = np.asarray(x, np.float64)
    axes = tuple(range(x.ndim - 1))
    mean = x.mean(axes) if mean is None else np.asarray(mean, np.float64)
    var = ((x - x.mean(axes)) ** 2).mean(axes) if var is None else np.asarray(var, np.float64)
    return (x - mean) / np.sqrt(var + eps) * scale + bias, mean, var


def test_batch_norm_function_and_module_are_exported_and_match_numpy():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((4, 5, 5, 3)) * 2 + 1, jnp.float32)
    scale, bias = jnp.asarray([0.5, 1.0, 2.0], jnp.float32), jnp.asarray([0.0, -1.0, 3.0], jnp.float32)
    for got, want in zip(jnn.batch_norm(x, scale, bias), numpy_batch_norm(x, scale, bias)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    running = (jnp.asarray([0.1, 0.2, 0.3]), jnp.asarray([1.0, 2.0, 0.5]))
    y, _, _ = jnn.batch_norm(x, scale, bias, mean=running[0], var=running[1], relu=True)
    want, _, _ = numpy_batch_norm(x, scale, bias, *running)
    np.testing.assert_allclose(y, np.maximum(want, 0), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="give both mean and var"):
        jnn.batch_norm(x, scale, bias, mean=running[0])
    with pytest.raises(ValueError, match=r"scale must have shape \(3,\)"):
        jnn.batch_norm(x, scale[:2], bias)

    layer = jnn.BatchNorm()
    variables = layer.init(jax.random.PRNGKey(0), x)
    y, updates = layer.apply(variables, x, mutable=["batch_stats"])
    np.testing.assert_allclose(y, numpy_batch_norm(x, 1.0, 0.0)[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(updates["batch_stats"]["mean"], 0.1 * np.asarray(x).mean((0, 1, 2)), rtol=1e-5)


def conv_params(block: nn.Module, x):
    return block.init(jax.random.PRNGKey(0), x)["params"]["conv"]


def test_conv_norm_act_has_a_conv_bias_only_without_a_norm_after_it():
    x = jnp.ones((1, 8, 8, 3))
    batch = functools.partial(jnn.make_norm, "batch", train=True)
    assert "bias" not in conv_params(blocks.ConvNormAct(4, norm=batch), x)
    assert "bias" in conv_params(blocks.ConvNormAct(4), x)  # no norm
    assert "bias" in conv_params(blocks.ConvNormAct(4, norm=functools.partial(jnn.make_norm, "none", train=True)), x)
    assert "bias" in conv_params(blocks.ConvNormAct(4, norm=batch, preact=True), x)  # the norm comes first
    assert "bias" in conv_params(blocks.ConvNormAct(4, norm=batch, use_bias=True), x)
    assert "bias" in conv_params(  # a conv factory that chooses for itself keeps its choice
        blocks.ConvNormAct(4, norm=batch, conv=functools.partial(jnn.Conv2d, use_bias=True)), x)


def test_wrong_block_arguments_name_the_block_and_the_argument():
    x = jnp.ones((1, 8, 8, 3))
    with pytest.raises(TypeError, match=r"ConvNormAct.*norm=.*make_norm\(\) missing 1 required positional argument: "
                                        r"'kind'.*partial\(make_norm, 'batch', train=True\)"):
        blocks.ConvNormAct(4, norm=functools.partial(jnn.make_norm, train=True)).init(jax.random.PRNGKey(0), x)
    with pytest.raises(TypeError, match=r"BasicBlock.*conv=.*cannot be called"):
        blocks.BasicBlock(4, conv=jnn.Dense).init(jax.random.PRNGKey(0), x)
    with pytest.raises(TypeError, match=r"ConvNormAct.*act='relu' is not a function.*activation\('relu'\)"):
        blocks.ConvNormAct(4, act="relu").init(jax.random.PRNGKey(0), x)
