"""jaxcnn.backends.cpu.pool: tiled max pooling equals lax.reduce_window(max) in value and gradient, bit for bit.

The gradient must go where XLA's select-and-scatter sends it: the first maximum of each window in row-major order
for ordinary numbers, and XLA's choice around NaN and -inf. Also checked against a NumPy loop.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxcnn.backends.cpu import kernels as onednn
from jaxcnn.backends.cpu import pool as fast_pool
from jaxcnn.nn import functional


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


# ------------------------------------------------------------------------------- the native kernel (CPU, float32)

needs_native = pytest.mark.skipif(not onednn.available(), reason="jaxcnn's native library unavailable")


def xla_path(x, window):
    """The XLA formulation of the same custom VJP (what runs off the CPU): the reference for the native kernel."""
    return fast_pool._max_pool_tiled(x, window, False)


def native_path(x, window):
    return fast_pool._max_pool_tiled(x, window, True)


def awkward_input(shape, seed):
    """Small integers (tied maxima) with NaN, +inf and -inf, including a window of -inf and windows of NaN."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-2, 3, shape).astype(np.float32)
    flat = x.reshape(-1)
    picks = rng.choice(flat.size, size=max(3, flat.size // 50), replace=False)
    flat[picks[0::3]] = np.nan
    flat[picks[1::3]] = np.inf
    flat[picks[2::3]] = -np.inf
    x[0, :2, :2, 0] = -np.inf
    return jnp.asarray(x)


# Channel counts that take the kernel's packed path (several windows per vector: C = 1, 3, 6 with kw = 2, C = 1
# with kw = 3), the one-window path (C = 6 with kw = 3, C = 16, 17, 40: full and masked vectors), 1x1 and 3x1
# windows, and heights and widths that leave rows and columns past the last whole window.
NATIVE_CASES = [((2, 8, 8, 1), (2, 2)), ((2, 9, 7, 3), (2, 2)), ((2, 28, 28, 6), (2, 2)), ((1, 9, 10, 1), (3, 3)),
                ((2, 9, 10, 6), (3, 3)), ((2, 6, 6, 16), (2, 2)), ((1, 7, 9, 17), (2, 2)), ((1, 6, 5, 40), (3, 1)),
                ((1, 4, 4, 5), (1, 1)), ((2, 5, 33, 2), (2, 2)), ((1, 1, 4, 2), (2, 2))]


@needs_native
@pytest.mark.parametrize("simd", [True, False], ids=["avx512", "portable"])
@pytest.mark.parametrize("shape, window", NATIVE_CASES)
def test_native_kernel_matches_the_xla_formulation_bit_for_bit(shape, window, simd):
    """Same max (NaN-propagating), same chosen element (ties, NaN, infinities), same gradient, both loops."""
    token = onednn.POOL_SIMD.set(simd)
    try:
        x = awkward_input(shape, seed=sum(shape))
        ho, wo = shape[1] // window[0], shape[2] // window[1]
        g = jnp.asarray(np.random.default_rng(5).standard_normal((shape[0], ho, wo, shape[3])).astype(np.float32))
        y_native, vjp_native = jax.vjp(lambda v: native_path(v, window), x)
        y_xla, vjp_xla = jax.vjp(lambda v: xla_path(v, window), x)
        np.testing.assert_array_equal(np.asarray(y_native), np.asarray(y_xla))
        np.testing.assert_array_equal(np.asarray(vjp_native(g)[0]), np.asarray(vjp_xla(g)[0]))
        finite = jnp.nan_to_num(x, nan=0.5, posinf=3.0, neginf=-3.0)
        dx = jax.grad(lambda v: jnp.sum(native_path(v, window) * g))(finite)
        np.testing.assert_array_equal(np.asarray(dx), numpy_max_pool_grad(finite, window, g))
    finally:
        onednn.POOL_SIMD.reset(token)


@needs_native
def test_native_kernel_is_what_a_cpu_step_runs_and_composes_with_jit_vmap_and_derivatives():
    rng = np.random.default_rng(6)
    xs = jnp.asarray(rng.standard_normal((3, 2, 8, 8, 6)).astype(np.float32))
    loss = lambda pool: (lambda v: jnp.sum(jnp.sin(pool(v, (2, 2))) ** 2))  # noqa: E731
    step = jax.jit(jax.vmap(jax.grad(loss(fast_pool.max_pool_tiled))))
    text = step.lower(xs).as_text()
    assert "jaxcnn_max_pool_fwd" in text and "jaxcnn_max_pool_bwd" in text
    np.testing.assert_allclose(step(xs), jax.vmap(jax.grad(loss(plain_max_pool)))(xs), rtol=1e-6, atol=1e-6)
    # Forward over reverse and reverse over reverse: the kernels' derivatives are XLA's gather and scatter.
    v = jnp.asarray(rng.standard_normal(xs.shape[1:]).astype(np.float32))
    hvp = lambda pool: jax.jvp(jax.grad(loss(pool)), (xs[0],), (v,))[1]  # noqa: E731
    np.testing.assert_allclose(hvp(fast_pool.max_pool_tiled), hvp(plain_max_pool), rtol=1e-5, atol=1e-5)
    rr = lambda pool: jax.grad(lambda u: jnp.sum(jax.grad(loss(pool))(u) * v))(xs[0])  # noqa: E731
    np.testing.assert_allclose(rr(fast_pool.max_pool_tiled), rr(plain_max_pool), rtol=1e-5, atol=1e-5)


@needs_native
def test_exported_for_gpu_without_the_native_kernel():
    x = jnp.ones((2, 8, 8, 6))
    step = jax.jit(jax.grad(lambda v: jnp.sum(fast_pool.max_pool_tiled(v, (2, 2)) ** 2)))
    assert "jaxcnn_max_pool" in step.lower(x).as_text()
    assert "jaxcnn_max_pool" not in jax.export.export(step, platforms=["cuda"])(x).mlir_module()


def test_xla_formulation_off_the_cpu_for_other_dtypes_or_when_switched_off(monkeypatch):
    x = awkward_input((2, 8, 8, 6), seed=7)
    grad = lambda v: jax.grad(lambda u: jnp.sum(fast_pool.max_pool_tiled(u, (2, 2))))(v)  # noqa: E731
    want = np.asarray(jax.grad(lambda u: jnp.sum(xla_path(u, (2, 2))))(x))
    for patch in (lambda: monkeypatch.setattr(onednn.jax, "default_backend", lambda: "gpu"),
                  lambda: monkeypatch.setenv("JAXCNN_ONEDNN", "0")):
        patch()
        assert "jaxcnn_max_pool" not in jax.jit(grad).lower(x).as_text()
        np.testing.assert_array_equal(np.asarray(jax.jit(grad)(x)), want)
        monkeypatch.undo()
    assert not onednn.pool_usable((2, 8, 8, 6), jnp.bfloat16, (2, 2))
    assert not onednn.pool_usable((2, 24, 24, 6), jnp.float32, (12, 12))  # 144 elements: an int32 choice
    assert not onednn.pool_usable((0, 8, 8, 6), jnp.float32, (2, 2))
