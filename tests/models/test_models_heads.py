"""The shared classifier head against NumPy: pooling, flatten order, hidden layers, dropout placement, class maps."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcnn.models.heads import ClassifierHead
from jaxcnn.nn import layers

RNG = np.random.default_rng(0)
FAST_KEY = jax.random.key(0, impl="unsafe_rbg")


def init(module, x):
    return jax.jit(module.init)(FAST_KEY, x)


def dense(x, p):
    return x @ np.asarray(p["kernel"]) + np.asarray(p["bias"])


@pytest.mark.parametrize("pool, order, reference", [
    ("gap", "hwc", lambda x: x.mean(axis=(1, 2))),
    ("gmp", "hwc", lambda x: x.max(axis=(1, 2))),
    ("flatten", "hwc", lambda x: x.reshape(len(x), -1)),
    # PyTorch flattens [N, C, H, W]: channel-major
    ("flatten", "chw", lambda x: np.stack([np.concatenate([x[n, :, :, c].ravel() for c in range(x.shape[3])])
                                           for n in range(len(x))])),
])
def test_head_pools_then_dense_layers_match_numpy(pool, order, reference):
    head = ClassifierHead(4, pool=pool, flatten_order=order, hidden=(6,), act=jnp.tanh)
    x = RNG.normal(size=(2, 3, 2, 5)).astype(np.float32)
    variables = init(head, x)
    features, logits = jax.jit(head.apply)(variables, x)
    p = variables["params"]
    assert set(p) == {"fc1", "logits"}
    hidden = np.tanh(dense(reference(x), p["fc1"]))
    np.testing.assert_allclose(features["pre_logits"], hidden, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits, dense(hidden, p["logits"]), rtol=1e-5, atol=1e-5)


def test_head_takes_flat_features_as_they_are():
    head = ClassifierHead(3, pool="flatten", pool_size=7)
    x = RNG.normal(size=(2, 5)).astype(np.float32)
    variables = init(head, x)
    np.testing.assert_allclose(head.apply(variables, x)[1], dense(x, variables["params"]["logits"]), rtol=1e-5,
                               atol=1e-6)


def test_class_maps_are_averaged_into_the_logits():
    conv1x1 = functools.partial(layers.Conv2d, kernel_size=1, padding=0)
    head = ClassifierHead(3, class_maps=True, dense=conv1x1)
    x = RNG.normal(size=(2, 4, 4, 5)).astype(np.float32)
    variables = init(head, x)
    features, logits = head.apply(variables, x)
    p = variables["params"]["logits"]
    maps = x @ np.asarray(p["kernel"])[0, 0] + np.asarray(p["bias"])
    np.testing.assert_allclose(features["class_maps"], maps, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits, maps.mean(axis=(1, 2)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(features["pre_logits"], x.mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    ({"pool": "avg"}, r"pool='avg' is not one of 'gap', 'gmp', 'flatten'"),
    ({"flatten_order": "nchw"}, r"flatten_order='nchw'"),
    ({"class_maps": True, "hidden": (8,)}, r"class_maps=True needs .* hidden=\(\)"),
    ({"class_maps": True, "pool": "flatten"}, r"class_maps=True needs pool='gap' or 'gmp'"),
])
def test_head_rejects_bad_knobs_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ClassifierHead(3, **kwargs)


def test_head_dropout_sits_on_the_hidden_outputs():
    """Dropout on the inputs of fc2 and logits, never on fc1's (the flattened conv features)."""
    head = ClassifierHead(3, pool="flatten", hidden=(5, 4), dropout=0.5)
    x = RNG.normal(size=(64, 2, 2, 3)).astype(np.float32)
    variables = init(head, x)

    @jax.jit
    def dense_inputs(variables, x):
        captured = {}

        def spy(next_fun, args, kwargs, context):
            if isinstance(context.module, layers.Dense):
                captured[context.module.name] = args[0]
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(spy):
            head.apply(variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
        return captured

    zero_fraction = {k: float((v == 0).mean()) for k, v in dense_inputs(variables, x).items()}
    assert zero_fraction["fc1"] == 0.0
    assert 0.3 < zero_fraction["fc2"] and 0.3 < zero_fraction["logits"]
