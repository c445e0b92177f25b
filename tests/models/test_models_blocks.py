"""The blocks against NumPy written from the papers' descriptions (tests/reference_numpy.py's loop convolution)."""

from __future__ import annotations

import contextlib
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from reference_numpy import np_conv2d, np_max_pool

from jaxcnn import backends
from jaxcnn.models import create_model
from jaxcnn.nn import layers
from jaxcnn.nn.blocks import (
    BasicBlock,
    BottleneckBlock,
    ConvNormAct,
    InceptionBlock,
    Shortcut,
    adaptive_avg_pool,
)

RNG = np.random.default_rng(0)


def relu(x):
    return np.maximum(x, 0)


def bn_eval(x, p, s, eps=1e-5):
    return (x - s["mean"]) / np.sqrt(s["var"] + eps) * p["scale"] + p["bias"]


# Compiling threefry for every parameter initializer dominates these tests; this key type compiles 5x faster.
FAST_KEY = jax.random.key(0, impl="unsafe_rbg")


def init(module, x, **kwargs):
    return jax.jit(functools.partial(module.init, **kwargs))(FAST_KEY, x)


def abstract_init(module, x):
    """The variables' shapes only (no initializer runs): for tests that replace the values anyway."""
    return jax.eval_shape(module.init, jax.random.PRNGKey(0), x)


def apply(module, variables, x, **kwargs):
    return jax.jit(functools.partial(module.apply, **kwargs))(variables, x)


def randomize(tree):
    """Replaces every leaf by random numbers (running variances positive), so nothing is trivially 0 or 1."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: np.asarray(
            RNG.uniform(0.5, 1.5, leaf.shape) if "var" in str(path[-1]) else RNG.normal(0, 0.5, leaf.shape),
            np.float32),
        tree,
    )


def norm_def(train=False):
    return functools.partial(layers.make_norm, "batch", train=train)


def test_basic_block_option_a_stride_2_matches_numpy():
    x = RNG.normal(size=(2, 7, 7, 4)).astype(np.float32)  # odd size: ceil(7 / 2) = 4 rows out
    block = BasicBlock(8, strides=2, shortcut="A", conv=functools.partial(layers.Conv2d, use_bias=False),
                       norm=norm_def())
    variables = randomize(abstract_init(block, x))
    got = apply(block, variables, x)
    p, s = variables["params"], variables["batch_stats"]
    y = np_conv2d(x, p["conv1"]["kernel"], stride=2, padding=((1, 1), (1, 1)))
    y = relu(bn_eval(y, p["norm1"], s["norm1"]))
    y = bn_eval(np_conv2d(y, p["conv2"]["kernel"], padding=((1, 1), (1, 1))), p["norm2"], s["norm2"])
    shortcut = np.concatenate([x[:, ::2, ::2], np.zeros((2, 4, 4, 4))], axis=-1)  # every 2nd cell, zero channels
    np.testing.assert_allclose(got, relu(y + shortcut), rtol=1e-4, atol=1e-4)
    assert "shortcut" not in p  # option A has no parameters


@pytest.mark.parametrize("shortcut, strides", [("A", 2), ("B", 2), ("B", 1)])
def test_basic_block_in_training_matches_numpy_with_batch_statistics(shortcut, strides):
    """Training mode: BatchNorm with the batch's statistics; the last norm, the shortcut sum and the ReLU are one
    BatchNorm call with a residual (one native kernel on the CPU)."""
    x = RNG.normal(size=(4, 6, 6, 4)).astype(np.float32)
    block = BasicBlock(8, strides=strides, shortcut=shortcut, conv=functools.partial(layers.Conv2d, use_bias=False),
                       norm=norm_def(train=True))
    variables = randomize(abstract_init(block, x))
    fn = jax.jit(lambda v, x: block.apply(v, x, mutable=["batch_stats"])[0])
    if jax.default_backend() == "cpu" and backends.native_kernels_available():
        assert "jaxcnn_batch_norm_add_fwd" in fn.lower(variables, x).as_text()
    p = variables["params"]

    def bn_train(y, params):
        mean, var = y.mean((0, 1, 2)), y.var((0, 1, 2))
        return (y - mean) / np.sqrt(var + 1e-5) * params["scale"] + params["bias"]

    pad = ((1, 1), (1, 1))
    y = relu(bn_train(np_conv2d(x, p["conv1"]["kernel"], stride=strides, padding=pad), p["norm1"]))
    y = bn_train(np_conv2d(y, p["conv2"]["kernel"], padding=pad), p["norm2"])
    if shortcut == "A":
        short = np.concatenate([x[:, ::2, ::2], np.zeros(x[:, ::2, ::2].shape)], axis=-1)
    else:
        short = bn_train(np_conv2d(x, p["shortcut"]["conv"]["kernel"], stride=strides), p["shortcut"]["norm"])
    np.testing.assert_allclose(fn(variables, x), relu(y + short), rtol=2e-4, atol=2e-4)


def test_preact_bottleneck_with_groups_and_projection_matches_numpy():
    x = RNG.normal(size=(2, 6, 6, 8)).astype(np.float32)
    block = BottleneckBlock(4, strides=2, groups=2, base_width=64, shortcut="B", preact=True,
                            conv=functools.partial(layers.Conv2d, use_bias=False), norm=norm_def())
    variables = randomize(abstract_init(block, x))
    got = apply(block, variables, x)
    p, s = variables["params"], variables["batch_stats"]
    width = 4 * 2  # int(planes * 64 / 64) * groups
    assert p["conv2"]["kernel"].shape == (3, 3, width // 2, width)
    pre = relu(bn_eval(x, p["norm1"], s["norm1"]))
    y = np_conv2d(pre, p["conv1"]["kernel"])
    y = np_conv2d(relu(bn_eval(y, p["norm2"], s["norm2"])), p["conv2"]["kernel"], stride=2,
                  padding=((1, 1), (1, 1)), groups=2)
    y = np_conv2d(relu(bn_eval(y, p["norm3"], s["norm3"])), p["conv3"]["kernel"])
    # He et al. (2016): the projection takes the pre-activated input and has no BN.
    shortcut = np_conv2d(pre, p["shortcut"]["conv"]["kernel"], stride=2)
    np.testing.assert_allclose(got, y + shortcut, rtol=1e-4, atol=1e-4)
    assert got.shape == (2, 3, 3, 16)


def test_residual_false_removes_the_shortcut():
    x = RNG.normal(size=(1, 4, 4, 8)).astype(np.float32)
    conv = functools.partial(layers.Conv2d, use_bias=False)
    plain = BasicBlock(8, residual=False, conv=conv, norm=norm_def())
    res = BasicBlock(8, residual=True, conv=conv, norm=norm_def())
    variables = randomize(abstract_init(plain, x))
    p, s = variables["params"], variables["batch_stats"]
    y = relu(bn_eval(np_conv2d(x, p["conv1"]["kernel"], padding=((1, 1), (1, 1))), p["norm1"], s["norm1"]))
    y = bn_eval(np_conv2d(y, p["conv2"]["kernel"], padding=((1, 1), (1, 1))), p["norm2"], s["norm2"])
    np.testing.assert_allclose(apply(plain, variables, x), relu(y), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(apply(res, variables, x), relu(y + x), rtol=1e-4, atol=1e-4)


def test_shortcut_a_cannot_drop_channels():
    with pytest.raises(ValueError, match="use shortcut='B'"):
        Shortcut(4, 1, "A").init(jax.random.PRNGKey(0), jnp.ones((1, 4, 4, 8)))


def test_zero_init_residual_makes_each_block_start_as_its_shortcut():
    model = create_model("resnet20", zero_init_residual=True, stage_sizes=(3, 1, 1))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 4, 3))
    variables = init(model, x)
    features = apply(model, variables, x, return_features=True)
    # Every block's branch is 0 at init, so stage 1 (no shape change) outputs relu(stem) = stem.
    np.testing.assert_allclose(features["stage1"], features["stem"], rtol=1e-6)


def test_inception_block_matches_numpy():
    x = RNG.normal(size=(1, 5, 5, 6)).astype(np.float32)
    conv_block = functools.partial(ConvNormAct, conv=layers.Conv2d)
    block = InceptionBlock(2, 3, 4, 1, 2, 3, kernel5=5, conv_block=conv_block)
    variables = randomize(abstract_init(block, x))
    p = variables["params"]

    def cba(y, q, pad):  # conv (with bias: no norm here) then ReLU
        return relu(np_conv2d(y, q["conv"]["kernel"], padding=((pad, pad), (pad, pad))) + q["conv"]["bias"])

    pooled = np_max_pool(x, 3, 1, padding=((1, 1), (1, 1)))
    expected = np.concatenate([
        cba(x, p["branch1"], 0),
        cba(cba(x, p["branch2_reduce"], 0), p["branch2"], 1),
        cba(cba(x, p["branch3_reduce"], 0), p["branch3"], 2),
        cba(pooled, p["branch4"], 0),
    ], axis=-1)
    np.testing.assert_allclose(apply(block, variables, x), expected, rtol=1e-4, atol=1e-4)


def _np_adaptive_avg_pool(x, out):
    """PyTorch's AdaptiveAvgPool2d by its definition: bins [floor(i H / o), ceil((i + 1) H / o))."""
    n, h, w, c = x.shape
    y = np.zeros((n, out, out, c))
    for i in range(out):
        for j in range(out):
            r0, r1 = (i * h) // out, -(-((i + 1) * h) // out)
            c0, c1 = (j * w) // out, -(-((j + 1) * w) // out)
            y[:, i, j] = x[:, r0:r1, c0:c1].mean(axis=(1, 2))
    return y


@pytest.mark.parametrize("size, out", [(1, 7), (5, 7), (7, 7), (10, 7), (13, 6), (32, 6)])
def test_adaptive_avg_pool_matches_pytorch_definition(size, out):
    x = RNG.normal(size=(2, size, size, 3)).astype(np.float32)
    np.testing.assert_allclose(adaptive_avg_pool(jnp.asarray(x), (out, out)), _np_adaptive_avg_pool(x, out),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("window", [None, 2], ids=["no-pool", "max-pool"])
@pytest.mark.parametrize("native", [True, False], ids=["native", "xla"])
def test_conv_bias_before_batchnorm_matches_the_sum_it_stands_for(native, window):
    """ConvNormAct hands the conv's bias to the BatchNorm instead of adding it, and with ``max_pool_window`` the
    norm pools too: outputs, running statistics and gradients against NumPy / plain JAX that add the bias to every
    value first and pool afterwards."""
    x = RNG.normal(size=(4, 6, 6, 3)).astype(np.float32)
    block = ConvNormAct(5, conv=functools.partial(layers.Conv2d, use_bias=True), max_pool_window=window,
                        norm=functools.partial(layers.make_norm, "batch", train=True))
    variables = randomize(abstract_init(block, x))
    variables["params"]["conv"]["bias"] = np.float32([3.0, -2.0, 0.5, 10.0, -7.0])  # large next to the conv's values
    p, s = variables["params"], variables["batch_stats"]
    conv = np_conv2d(x.astype(np.float64), p["conv"]["kernel"], padding=((1, 1), (1, 1))) + p["conv"]["bias"]
    mean, var = conv.mean(axis=(0, 1, 2)), conv.var(axis=(0, 1, 2))
    expected = relu((conv - mean) / np.sqrt(var + 1e-5) * p["norm"]["scale"] + p["norm"]["bias"])
    pool = (lambda y: y) if window is None else (lambda y: np_max_pool(y, window))
    expected = pool(expected)
    def kernels():
        return contextlib.nullcontext() if native else backends.xla_kernels()

    with kernels():
        y, updates = apply(block, variables, x, mutable=["batch_stats"])
        np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(updates["batch_stats"]["norm"]["mean"], 0.9 * s["norm"]["mean"] + 0.1 * mean,
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(updates["batch_stats"]["norm"]["var"], 0.9 * s["norm"]["var"] + 0.1 * var,
                                   rtol=1e-4, atol=1e-5)
        probe = RNG.normal(size=expected.shape).astype(np.float32)

        def loss(params, x):
            out, _ = block.apply({"params": params, "batch_stats": s}, x, mutable=["batch_stats"])
            return jnp.sum(out * probe)

        grads, dx = jax.jit(jax.grad(loss, argnums=(0, 1)))(p, x)

    def plain_loss(params, x):  # the sum written out, and BatchNorm's formula
        z = lax.conv_general_dilated(x, params["conv"]["kernel"], (1, 1), ((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"), precision="highest")
        z = z + params["conv"]["bias"]
        m, v = z.mean(axis=(0, 1, 2)), z.var(axis=(0, 1, 2))
        out = jax.nn.relu((z - m) * lax.rsqrt(v + 1e-5) * params["norm"]["scale"] + params["norm"]["bias"])
        if window is not None:
            out = lax.reduce_window(out, -jnp.inf, lax.max, (1, window, window, 1), (1, window, window, 1), "VALID")
        return jnp.sum(out * probe)

    want, want_dx = jax.jit(jax.grad(plain_loss, argnums=(0, 1)))(p, x)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-3, atol=1e-4)
    for path in (("conv", "kernel"), ("norm", "scale"), ("norm", "bias")):
        np.testing.assert_allclose(grads[path[0]][path[1]], want[path[0]][path[1]], rtol=1e-3, atol=1e-4)
    # A bias before a BatchNorm cancels: its gradient is 0 (exactly here; rounding noise in the written-out sum).
    np.testing.assert_array_equal(grads["conv"]["bias"], np.zeros(5, np.float32))
    np.testing.assert_allclose(want["conv"]["bias"], 0.0, atol=1e-3)
    with kernels():  # evaluation: the running statistics, the bias folded into the running mean
        y_eval = apply(block.clone(norm=functools.partial(layers.make_norm, "batch", train=False)), variables, x)
    expected_eval = pool(relu(bn_eval(conv, p["norm"], s["norm"])))
    np.testing.assert_allclose(y_eval, expected_eval, rtol=1e-4, atol=1e-4)
