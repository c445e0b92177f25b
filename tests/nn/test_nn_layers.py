"""jaxcnn.nn.layers: conv and pooling modules, normalisation choices, activations by name."""

import math
import typing

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcnn.nn import layers as L
from reference_numpy import np_avg_pool, np_conv2d, np_l2_pool, np_max_pool

KEY = jax.random.PRNGKey(0)


def _rand(seed, *shape, loc=0.0, scale=1.0):
    return (loc + scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def _param_count(tree):
    return sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(tree))


# --------------------------------------------------------------------------------------------------------
# Conv2d, Pool2d, GlobalPool
# --------------------------------------------------------------------------------------------------------


def test_conv2d_parameters_match_torchvision_counts():
    # VGG-16's first conv: 3 -> 64, 3x3, bias: 1792 parameters; ResNet's stem: 3 -> 64, 7x7, no bias: 9408.
    variables = L.Conv2d(64).init(KEY, jnp.ones((1, 8, 8, 3)))
    assert variables["params"]["kernel"].shape == (3, 3, 3, 64)
    assert _param_count(variables) == 1792
    stem = L.Conv2d(64, 7, strides=2, padding=3, use_bias=False).init(KEY, jnp.ones((1, 8, 8, 3)))
    assert _param_count(stem) == 9408
    grouped = L.Conv2d(8, (3, 2), groups=4).init(KEY, jnp.ones((1, 8, 8, 4)))["params"]
    assert grouped["kernel"].shape == (3, 2, 1, 8)


def test_conv2d_output_matches_numpy_loops():
    x = _rand(0, 2, 7, 6, 4)
    layer = L.Conv2d(6, (3, 2), strides=(2, 1), padding=((1, 1), (0, 1)), dilation=(1, 2), groups=2,
                     bias_init=nn.initializers.normal(1.0))
    variables = layer.init(KEY, x)
    kernel, bias = (np.asarray(variables["params"][k]) for k in ("kernel", "bias"))
    expected = np_conv2d(x, kernel, (2, 1), ((1, 1), (0, 1)), (1, 2), groups=2) + bias
    np.testing.assert_allclose(np.asarray(layer.apply(variables, x)), expected, rtol=1e-4, atol=1e-4)


def test_conv2d_default_padding_is_same_and_init_is_he():
    x = jnp.ones((2, 9, 9, 64))
    variables = L.Conv2d(128).init(KEY, x)
    assert L.Conv2d(128).apply(variables, x).shape == (2, 9, 9, 128)
    # He (fan-in) init: std of the kernel close to sqrt(2 / fan_in) (truncated normal rescaled to that std).
    std = float(np.std(np.asarray(variables["params"]["kernel"])))
    assert abs(std - math.sqrt(2 / (3 * 3 * 64))) < 0.05 * math.sqrt(2 / (3 * 3 * 64))
    np.testing.assert_array_equal(np.asarray(variables["params"]["bias"]), np.zeros(128))


def test_conv2d_compute_dtype_and_param_dtype():
    x = jnp.ones((1, 5, 5, 3))
    layer = L.Conv2d(4, dtype=jnp.bfloat16)
    variables = layer.init(KEY, x)
    assert variables["params"]["kernel"].dtype == jnp.float32
    assert layer.apply(variables, x).dtype == jnp.bfloat16
    assert L.Conv2d(4).apply(variables, x).dtype == jnp.float32


def test_conv2d_errors_name_the_layer_and_the_input_shape():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = L.Conv2d(4, 3, padding="valid", name="first")(x)
            return L.Conv2d(4, 5, padding="valid", name="second")(x)

    with pytest.raises(ValueError, match=r"Conv2d at 'second'.*input shape \(1, 4, 4, 4\).*larger than the padded"):
        Net().init(KEY, jnp.ones((1, 6, 6, 2)))
    with pytest.raises(ValueError, match=r"Conv2d at 'first'.*got \(6, 6, 2\)"):
        Net().init(KEY, jnp.ones((6, 6, 2)))
    with pytest.raises(ValueError, match=r"groups=4 must divide both the input channels \(6, input shape "
                       r"\(1, 6, 6, 6\)\) and features \(8\)"):
        L.Conv2d(8, groups=4).init(KEY, jnp.ones((1, 6, 6, 6)))


@pytest.mark.parametrize("kind", L.POOL_KINDS)
def test_pool2d_matches_numpy_loops(kind):
    x = _rand(1, 2, 7, 7, 3)
    reference = {"max": np_max_pool, "avg": np_avg_pool, "l2": np_l2_pool}[kind]
    y = L.Pool2d(kind, window_shape=3, strides=2, padding=1).apply({}, x)
    np.testing.assert_allclose(np.asarray(y), reference(x, (3, 3), (2, 2), ((1, 1), (1, 1))), rtol=1e-5, atol=1e-5)
    y = L.Pool2d(kind).apply({}, x)  # defaults: 2x2 window, stride 2, valid
    np.testing.assert_allclose(np.asarray(y), reference(x, (2, 2)), rtol=1e-5, atol=1e-5)


def test_pool2d_errors():
    with pytest.raises(ValueError, match="unknown pooling kind 'mean'"):
        L.Pool2d("mean").apply({}, jnp.ones((1, 4, 4, 1)))
    with pytest.raises(ValueError, match=r"Pool2d on input of shape \(1, 1, 1, 8\).*larger than the padded input 1"):
        L.Pool2d("max").apply({}, jnp.ones((1, 1, 1, 8)))


def test_global_pool():
    x = _rand(2, 2, 3, 5, 4)
    np.testing.assert_allclose(np.asarray(L.GlobalPool("avg").apply({}, x)), x.mean((1, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(L.GlobalPool("max").apply({}, x)), x.max((1, 2)))
    with pytest.raises(ValueError, match="unknown global pooling kind"):
        L.GlobalPool("min").apply({}, x)


# --------------------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------------------


def _np_standardize(x, axes, eps=1e-5):
    x = np.asarray(x, np.float64)
    mean, var = x.mean(axis=axes, keepdims=True), x.var(axis=axes, keepdims=True)
    return (x - mean) / np.sqrt(var + eps), mean, var


def test_batchnorm_train_uses_per_channel_batch_statistics_and_updates_running_ones():
    x = _rand(3, 4, 5, 6, 3, loc=2.0, scale=3.0)
    norm = L.make_norm("batch", train=True)
    variables = norm.init(KEY, x)
    y, updates = norm.apply(variables, x, mutable=["batch_stats"])
    expected, mean, var = _np_standardize(x, (0, 1, 2))
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-4, atol=1e-4)
    stats = updates["batch_stats"]
    np.testing.assert_allclose(np.asarray(stats["mean"]), 0.1 * mean.ravel(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(stats["var"]), 0.9 + 0.1 * var.ravel(), rtol=1e-5)
    # Evaluation normalises with the running statistics.
    evaluated = L.make_norm("batch", train=False).apply({**variables, **updates}, x)
    np.testing.assert_allclose(
        np.asarray(evaluated), (x - 0.1 * mean) / np.sqrt(0.9 + 0.1 * var + 1e-5), rtol=1e-4, atol=1e-4
    )


def test_batchnorm_statistics_stay_float32_with_bfloat16_compute():
    # Values near 300 with small spread: a bfloat16 reduction (8 bits of mantissa) would get the mean wrong by
    # about 1 and the variance wildly; float32 statistics match float64 ones closely.
    x = jnp.asarray(_rand(4, 16, 8, 8, 2, loc=300.0, scale=2.0), jnp.bfloat16)
    norm = L.make_norm("batch", train=True, dtype=jnp.bfloat16)
    variables = norm.init(KEY, x)
    assert variables["params"]["scale"].dtype == jnp.float32
    y, updates = norm.apply(variables, x, mutable=["batch_stats"])
    assert y.dtype == jnp.bfloat16
    assert updates["batch_stats"]["mean"].dtype == jnp.float32
    x64 = np.asarray(x.astype(jnp.float32), np.float64)
    np.testing.assert_allclose(np.asarray(updates["batch_stats"]["mean"]) / 0.1, x64.mean((0, 1, 2)), rtol=1e-5)
    np.testing.assert_allclose((np.asarray(updates["batch_stats"]["var"]) - 0.9) / 0.1, x64.var((0, 1, 2)),
                               rtol=2e-2)


def test_batchnorm_axis_name_averages_statistics_over_the_axis():
    x = _rand(5, 4, 2, 3, 3, 2, loc=1.0)  # [devices, N, H, W, C]
    norm = L.make_norm("batch", train=True, axis_name="batch")
    variables = norm.init(KEY, x[0])
    per_device = jax.vmap(lambda xs: norm.apply(variables, xs, mutable=["batch_stats"]), axis_name="batch")
    y, updates = per_device(x)
    expected, mean, _ = _np_standardize(x, (0, 1, 2, 3))
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(updates["batch_stats"]["mean"][0]), 0.1 * mean.ravel(), rtol=1e-5)


def test_ghost_batchnorm_uses_statistics_of_each_slice():
    x = _rand(6, 8, 3, 3, 2, loc=-1.0, scale=2.0)
    norm = L.make_norm("batch", train=True, virtual_batch_size=2)
    assert isinstance(norm, L.GhostBatchNorm)
    variables = norm.init(KEY, x)
    y, updates = norm.apply(variables, x, mutable=["batch_stats"])
    slice_means, slice_vars = [], []
    for k in range(4):
        part = x[2 * k : 2 * k + 2]
        expected, mean, var = _np_standardize(part, (0, 1, 2))
        np.testing.assert_allclose(np.asarray(y[2 * k : 2 * k + 2]), expected, rtol=1e-4, atol=1e-4)
        slice_means.append(mean.ravel())
        slice_vars.append(var.ravel())
    stats = updates["batch_stats"]
    np.testing.assert_allclose(np.asarray(stats["mean"]), 0.1 * np.mean(slice_means, 0), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(stats["var"]), 0.9 + 0.1 * np.mean(slice_vars, 0), rtol=1e-5)
    # Same variables as flax BatchNorm, so a checkpoint works with either.
    flax_bn = L.make_norm("batch", train=True).init(KEY, x)
    assert jax.tree.map(jnp.shape, flax_bn) == jax.tree.map(jnp.shape, variables)
    # Evaluation uses the running statistics and works for any batch size.
    evaluated = L.make_norm("batch", train=False, virtual_batch_size=2).apply({**variables, **updates}, x[:3])
    running_mean, running_var = (np.asarray(stats[k]) for k in ("mean", "var"))
    np.testing.assert_allclose(np.asarray(evaluated), (x[:3] - running_mean) / np.sqrt(running_var + 1e-5),
                               rtol=1e-4, atol=1e-4)


def test_ghost_batchnorm_with_one_slice_equals_batchnorm():
    x = _rand(7, 4, 3, 3, 5)
    ghost = L.make_norm("batch", train=True, virtual_batch_size=4)
    plain = L.make_norm("batch", train=True)
    variables = plain.init(KEY, x)
    y_ghost, stats_ghost = ghost.apply(variables, x, mutable=["batch_stats"])
    y_plain, stats_plain = plain.apply(variables, x, mutable=["batch_stats"])
    np.testing.assert_allclose(np.asarray(y_ghost), np.asarray(y_plain), rtol=1e-4, atol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), stats_ghost, stats_plain)


def test_ghost_batchnorm_rejects_indivisible_batches():
    norm = L.make_norm("batch", train=True, virtual_batch_size=4)
    variables = norm.init(KEY, jnp.ones((8, 2, 2, 3)))
    with pytest.raises(ValueError, match=r"batch of 6 examples .* not divisible by virtual_batch_size=4"):
        norm.apply(variables, jnp.ones((6, 2, 2, 3)), mutable=["batch_stats"])


@pytest.mark.parametrize("kind", ["batch", "group", "layer"])
def test_zero_init_starts_the_scale_at_zero(kind):
    x = _rand(8, 4, 3, 3, 8)
    norm = L.make_norm(kind, train=True, zero_init=True)
    variables = norm.init(KEY, x)
    np.testing.assert_array_equal(np.asarray(variables["params"]["scale"]), np.zeros(8))
    y, _ = norm.apply(variables, x, mutable=["batch_stats"])
    np.testing.assert_array_equal(np.asarray(y), np.zeros_like(x))
    assert np.all(np.asarray(L.make_norm(kind, train=True).init(KEY, x)["params"]["scale"]) == 1)


def test_norm_none_is_the_identity_without_parameters():
    x = _rand(9, 2, 3, 3, 4)
    identity = L.make_norm("none", train=True)
    assert identity(x) is x

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return L.make_norm("none", train=True)(x)

    assert Net().init(KEY, x) == {}


def test_group_norm_matches_numpy_and_adapts_the_group_count():
    x = _rand(10, 2, 4, 3, 8, loc=1.0, scale=2.0)
    norm = L.make_norm("group", train=True, num_groups=4)
    variables = norm.init(KEY, x)
    assert jax.tree.map(jnp.shape, variables) == {"params": {"bias": (8,), "scale": (8,)}}
    grouped = x.reshape(2, 4, 3, 4, 2)
    expected, _, _ = _np_standardize(grouped, (1, 2, 4))
    np.testing.assert_allclose(np.asarray(norm.apply(variables, x)), expected.reshape(x.shape), rtol=1e-4,
                               atol=1e-4)
    # At most 32 groups: 6 channels -> 6 groups of one channel each (each channel standardised on its own).
    x6 = _rand(11, 2, 4, 4, 6)
    y6 = L.make_norm("group", train=True).apply({"params": {"scale": jnp.ones(6), "bias": jnp.zeros(6)}}, x6)
    np.testing.assert_allclose(np.asarray(y6), _np_standardize(x6, (1, 2))[0], rtol=1e-4, atol=1e-4)


def test_layer_norm_normalises_each_example_over_height_width_and_channels():
    x = _rand(12, 3, 4, 5, 6, loc=5.0)
    norm = L.make_norm("layer", train=False)
    variables = norm.init(KEY, x)
    assert jax.tree.map(jnp.shape, variables) == {"params": {"bias": (6,), "scale": (6,)}}
    y = norm.apply(variables, x)
    assert y.shape == x.shape
    np.testing.assert_allclose(np.asarray(y), _np_standardize(x, (1, 2, 3))[0], rtol=1e-4, atol=1e-4)
    flat = _rand(13, 4, 10)  # [N, C] after flattening: the usual LayerNorm over C
    np.testing.assert_allclose(np.asarray(norm.apply({"params": {"scale": jnp.ones(10), "bias": jnp.zeros(10)}},
                                                     flat)), _np_standardize(flat, (1,))[0], rtol=1e-4, atol=1e-4)


def test_group_and_layer_norm_bfloat16_output():
    x = jnp.asarray(_rand(14, 2, 3, 3, 4), jnp.bfloat16)
    for kind in ("group", "layer"):
        norm = L.make_norm(kind, train=True, dtype=jnp.bfloat16)
        variables = norm.init(KEY, x)
        assert variables["params"]["scale"].dtype == jnp.float32
        assert norm.apply(variables, x).dtype == jnp.bfloat16


def test_make_norm_unknown_kind():
    with pytest.raises(ValueError, match=r"unknown norm 'instance'; use one of \('batch', 'group', 'layer', 'none'\)"):
        L.make_norm("instance", train=True)
    assert L.NORMS == typing.get_args(L.NormKind)


# --------------------------------------------------------------------------------------------------------
# Activations
# --------------------------------------------------------------------------------------------------------

_SOFTPLUS = lambda x: np.log1p(np.exp(x))  # noqa: E731
EXPECTED_ACTIVATIONS = {
    "relu": lambda x: np.maximum(x, 0),
    "relu6": lambda x: np.clip(x, 0, 6),
    "leaky_relu": lambda x: np.where(x >= 0, x, 0.01 * x),
    "elu": lambda x: np.where(x > 0, x, np.expm1(x)),
    "gelu": lambda x: x * 0.5 * (1 + np.vectorize(math.erf)(x / math.sqrt(2))),
    "silu": lambda x: x / (1 + np.exp(-x)),
    "swish": lambda x: x / (1 + np.exp(-x)),
    "tanh": np.tanh,
    "sigmoid": lambda x: 1 / (1 + np.exp(-x)),
    "softplus": _SOFTPLUS,
    "mish": lambda x: x * np.tanh(_SOFTPLUS(x)),
    "identity": lambda x: x,
}


@pytest.mark.parametrize("name", L.ACTIVATIONS)
def test_every_activation_by_name(name):
    x = np.linspace(-8, 8, 41).astype(np.float32)
    np.testing.assert_allclose(np.asarray(L.activation(name)(jnp.asarray(x))),
                               EXPECTED_ACTIVATIONS[name](x.astype(np.float64)), rtol=1e-5, atol=1e-6)


def test_activation_names():
    assert set(L.ACTIVATIONS) == set(EXPECTED_ACTIVATIONS)
    assert L.ACTIVATIONS == typing.get_args(L.Act)
    with pytest.raises(ValueError, match="unknown activation 'reul'; use one of relu, relu6, leaky_relu"):
        L.activation("reul")


def test_dense_and_dropout_are_flax_layers():
    """Dense is flax's nn.Dense with the backend's product: same parameters, names and values."""
    assert issubclass(L.Dense, nn.Dense) and L.Dense.__name__ == "Dense" and L.Dropout is nn.Dropout
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 3, 10))
    ours, flax_dense = L.Dense(7), nn.Dense(7)
    variables = flax_dense.init(jax.random.PRNGKey(1), x)
    assert jax.tree_util.tree_structure(ours.init(jax.random.PRNGKey(1), x)) == jax.tree_util.tree_structure(variables)
    np.testing.assert_allclose(ours.apply(variables, x), flax_dense.apply(variables, x), rtol=1e-5, atol=1e-5)
