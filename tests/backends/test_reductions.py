"""jaxcnn.backends.cpu.reductions: per-channel sums equal NumPy's (float64) for every shape, and add_bias's gradient is the
plain `y + bias` gradient."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxcnn.backends.cpu.reductions import _fold, add_bias, channel_sum

SHAPES = [(128, 28, 28, 6), (2, 3, 5, 7), (3, 1, 1, 512), (8, 9, 9, 16), (4, 16), (5,), (2, 7, 13, 3), (1, 2, 2, 1)]


@pytest.mark.parametrize("shape", SHAPES)
def test_channel_sum_matches_numpy(shape):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    want = x.astype(np.float64).reshape(-1, shape[-1]).sum(0) if len(shape) > 1 else x.astype(np.float64)
    np.testing.assert_allclose(np.asarray(channel_sum(jnp.asarray(x))), want, rtol=1e-5, atol=1e-3)


def test_the_fold_divides_each_example_and_stays_near_the_row_width():
    assert _fold(28 * 28, 6) == 16  # 16 * 6 = 96 floats per row, 784 = 16 * 49
    assert _fold(13 * 7, 3) == 13  # a prime-ish size still finds a divisor
    assert _fold(1, 16) == 1 and _fold(64, 512) == 1  # nothing to fold
    for inner, c in [(28 * 28, 6), (32 * 32, 16), (10 * 10, 16), (7 * 7, 64)]:
        k = _fold(inner, c)
        assert inner % k == 0 and k * c <= 128


def test_channel_sum_of_a_batch_sharded_over_devices_is_the_global_sum():
    mesh = Mesh(np.array(jax.devices()), ("data",))
    x = np.random.default_rng(1).standard_normal((16, 10, 10, 6)).astype(np.float32)
    placed = jax.device_put(x, NamedSharding(mesh, P("data")))
    got = jax.jit(channel_sum, out_shardings=NamedSharding(mesh, P()))(placed)
    np.testing.assert_allclose(np.asarray(got), x.astype(np.float64).sum((0, 1, 2)), rtol=1e-5)


@pytest.mark.parametrize("y_dtype", [jnp.float32, jnp.bfloat16])
def test_add_bias_value_and_gradients_match_plain_add(y_dtype):
    rng = np.random.default_rng(2)
    y = jnp.asarray(rng.standard_normal((4, 6, 6, 5)), y_dtype)
    b = jnp.asarray(rng.standard_normal(5), jnp.float32)
    g = jnp.asarray(rng.standard_normal((4, 6, 6, 5)), jnp.promote_types(y_dtype, jnp.float32))
    out, vjp = jax.vjp(add_bias, y, b)
    ref, ref_vjp = jax.vjp(lambda a, c: a + c, y, b)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
    (dy, db), (ref_dy, ref_db) = vjp(g), ref_vjp(g)
    assert dy.dtype == y.dtype and db.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(dy), np.asarray(ref_dy))
    np.testing.assert_allclose(np.asarray(db), np.asarray(g, np.float64).sum((0, 1, 2)), rtol=1e-5)
    # second order through the custom VJP: the Hessian of sum((y + c)^2) in c is 2 N·H·W times the identity
    hvp = jax.jvp(jax.grad(lambda c: jnp.sum(jnp.square(add_bias(y, c)))), (b,), (jnp.ones_like(b),))[1]
    np.testing.assert_allclose(np.asarray(hvp), 2.0 * y.size / y.shape[-1] * np.ones(5), rtol=1e-5)
