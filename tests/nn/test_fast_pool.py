"""jaxcnn.nn.fast_pool: tiled max pooling equals lax.reduce_window(max) in value and gradient, bit for bit.

The gradient must go where XLA's select-and-scatter sends it: the first maximum of each window in row-major order
for ordinary numbers, and XLA's choice around NaN and -inf. Also checked against a NumPy loop.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxcnn.nn import fast_pool, functional


def plain_max_pool(x, window):
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, *window, 1), (1, *window, 1), "VALID")


def numpy_max_pool_grad(x, window, g):
    """Gradient of sum(max_pool(x) * g): each window's g goes to its first maximum (row-major)."""
    x, g = np.asarray(x), np.asarray(g)
    kh, kw = window
    dx = np.zeros_like(x)
    for n, i, j, c in np.ndindex(*g.shape):
        patch = x[n, i * kh : (i + 1) * kh, j * kw : (j + 1) * kw, c]
        a, b = np.unravel_index(int(np.argmax(patch)), patch.shape)
        dx[n, i * kh + a, j * kw + b, c] += g[n, i, j, c]
    return dx


@pytest.mark.parametrize("window, shape", [((2, 2), (2, 8, 8, 3)), ((2, 2), (2, 9, 7, 3)), ((3, 2), (1, 9, 8, 2))])
def test_matches_xla_bit_for_bit_with_ties_nan_and_inf(window, shape):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.integers(-2, 3, shape).astype(np.float32))  # small integers: many tied maxima
    x = x.at[0, 0, 0, 0].set(jnp.nan).at[0, 1, 3, 1].set(-jnp.inf).at[0, 0, 1, 2].set(jnp.inf)
    x = x.at[0, 2:4, 2:4, 0].set(-jnp.inf).at[0, 4, 4, 0].set(jnp.nan).at[0, 5, 5, 0].set(jnp.nan)
    out_shape = (shape[0], shape[1] // window[0], shape[2] // window[1], shape[3])
    g = jnp.asarray(rng.standard_normal(out_shape).astype(np.float32))
    y_plain, vjp_plain = jax.vjp(lambda v: plain_max_pool(v, window), x)
    y_fast, vjp_fast = jax.vjp(lambda v: fast_pool.max_pool_tiled(v, window), x)
    np.testing.assert_array_equal(np.asarray(y_fast), np.asarray(y_plain))
    np.testing.assert_array_equal(np.asarray(vjp_fast(g)[0]), np.asarray(vjp_plain(g)[0]))


def test_gradient_against_numpy_loop():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.integers(0, 4, (2, 6, 6, 2)).astype(np.float32))
    g = jnp.asarray(rng.standard_normal((2, 3, 3, 2)).astype(np.float32))
    dx = jax.grad(lambda v: jnp.sum(fast_pool.max_pool_tiled(v, (2, 2)) * g))(x)
    np.testing.assert_array_equal(np.asarray(dx), numpy_max_pool_grad(x, (2, 2), g))


def test_functional_max_pool_uses_it_only_for_tiling_windows():
    x = jnp.ones((1, 8, 8, 2))
    tiled = str(jax.make_jaxpr(lambda v: functional.max_pool(v, 2))(x))
    overlapping = str(jax.make_jaxpr(lambda v: functional.max_pool(v, 3, 2, padding=1))(x))
    assert "custom_vjp_call" in tiled and "custom_vjp_call" not in overlapping
    assert fast_pool.tiles((2, 2), (2, 2), ((0, 0), (0, 0)))
    assert not fast_pool.tiles((2, 2), (2, 2), ((0, 1), (0, 0)))
    assert not fast_pool.tiles((3, 3), (2, 2), ((0, 0), (0, 0)))


def test_jit_vmap_and_second_derivative():
    rng = np.random.default_rng(2)
    xs = jnp.asarray(rng.standard_normal((3, 2, 6, 6, 2)).astype(np.float32))

    def loss(pool):
        return lambda v: jnp.sum(jnp.sin(pool(v, (2, 2))) ** 2)

    fast_grads = jax.jit(jax.vmap(jax.grad(loss(fast_pool.max_pool_tiled))))(xs)
    plain_grads = jax.vmap(jax.grad(loss(plain_max_pool)))(xs)
    np.testing.assert_allclose(fast_grads, plain_grads, rtol=1e-6, atol=1e-6)
    tangent = jnp.ones_like(xs[0])
    hvp = lambda pool: jax.jvp(jax.grad(loss(pool)), (xs[0],), (tangent,))[1]  # noqa: E731
    np.testing.assert_allclose(hvp(fast_pool.max_pool_tiled), hvp(plain_max_pool), rtol=1e-5, atol=1e-5)


def test_integer_and_bfloat16_inputs():
    x = jnp.arange(2 * 4 * 4 * 1, dtype=jnp.int32).reshape(2, 4, 4, 1)
    np.testing.assert_array_equal(fast_pool.max_pool_tiled(x, (2, 2)),
                                  lax.reduce_window(x, jnp.iinfo(jnp.int32).min, lax.max, (1, 2, 2, 1), (1, 2, 2, 1),
                                                    "VALID"))
    xb = x.astype(jnp.bfloat16)
    dx = jax.grad(lambda v: jnp.sum(fast_pool.max_pool_tiled(v, (2, 2)).astype(jnp.float32)))(xb)
    assert dx.dtype == jnp.bfloat16 and float(dx.sum()) == 8.0


def test_windows_of_more_than_127_elements_keep_their_choice_exactly():
    """The kept choice is int8 up to 127 window elements and int32 beyond (a 12x12 global pool has 144)."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, 12, 12, 3)).astype(np.float32))
    g = jnp.asarray(rng.standard_normal((2, 1, 1, 3)).astype(np.float32))
    dx = jax.grad(lambda v: jnp.sum(fast_pool.max_pool_tiled(v, (12, 12)) * g))(x)
    np.testing.assert_array_equal(np.asarray(dx), numpy_max_pool_grad(x, (12, 12), g))
    assert fast_pool._choice_dtype((12, 12)) == jnp.int32 and fast_pool._choice_dtype((2, 2)) == jnp.int8


def test_second_order_derivatives_match_xla():
    """Forward-over-reverse through the custom VJP (a Hessian-vector product) equals XLA's own."""
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((2, 6, 6, 2)).astype(np.float32))
    v = jnp.asarray(rng.standard_normal(x.shape).astype(np.float32))

    def hvp(pool):
        f = lambda u: jnp.sum(jnp.square(pool(jnp.sin(u))))  # noqa: E731
        return jax.jvp(jax.grad(f), (x,), (v,))[1]

    np.testing.assert_allclose(np.asarray(hvp(lambda u: fast_pool.max_pool_tiled(u, (2, 2)))),
                               np.asarray(hvp(lambda u: plain_max_pool(u, (2, 2)))), rtol=1e-5, atol=1e-6)
