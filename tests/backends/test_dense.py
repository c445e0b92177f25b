"""jaxcnn.backends.cpu.dense and onednn.matmul_p: dense products through oneDNN's sgemm equal float64 NumPy products,
with exact derivative rules (every transpose combination the gradients use), vmap, and XLA's dot off the CPU."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcnn.backends.cpu import dense as fast_dense
from jaxcnn.backends.cpu import kernels as onednn
from jaxcnn.nn import layers

needs_onednn = pytest.mark.skipif(not onednn.available(), reason="oneDNN library unavailable")


def operands(shape_a, shape_b, seed):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.standard_normal(shape_a).astype(np.float32)),
            jnp.asarray(rng.standard_normal(shape_b).astype(np.float32)))


@needs_onednn
@pytest.mark.parametrize("transpose_a", [False, True])
@pytest.mark.parametrize("transpose_b", [False, True])
@pytest.mark.parametrize("m, k, n", [(1, 1, 1), (5, 7, 3), (128, 300, 100), (33, 17, 65), (200, 3, 2)])
def test_products_match_float64_numpy(m, k, n, transpose_a, transpose_b):
    """Every transpose flag (the gradients use all four), sizes split into row blocks over the thread pool."""
    a, b = operands((k, m) if transpose_a else (m, k), (n, k) if transpose_b else (k, n), seed=m + k + n)
    got = jax.jit(lambda a, b: onednn._bind_matmul(a, b, transpose_a, transpose_b))(a, b)
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    want = (a64.T if transpose_a else a64) @ (b64.T if transpose_b else b64)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5 * np.sqrt(k))


@needs_onednn
def test_gradients_hessian_and_forward_mode_match_xla():
    a, b = operands((16, 12), (12, 9), seed=1)
    loss = lambda dot: (lambda a, b: jnp.sum(jnp.tanh(dot(a, b)) ** 2))  # noqa: E731
    xla = lambda a, b: jnp.dot(a, b, precision="highest")  # noqa: E731
    ours = jax.jit(jax.grad(loss(onednn.matmul), (0, 1)))
    assert "jaxcnn_onednn_matmul" in ours.lower(a, b).as_text()
    for got, want in zip(ours(a, b), jax.grad(loss(xla), (0, 1))(a, b)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jax.hessian(loss(onednn.matmul))(a, b), jax.hessian(loss(xla))(a, b),
                               rtol=1e-4, atol=1e-5)
    ta, tb = operands((16, 12), (12, 9), seed=2)
    np.testing.assert_allclose(jax.jvp(onednn.matmul, (a, b), (ta, tb))[1], jax.jvp(xla, (a, b), (ta, tb))[1],
                               rtol=1e-5, atol=1e-5)
    batched_a, _ = operands((3, 16, 12), (1,), seed=3)
    np.testing.assert_allclose(jax.vmap(onednn.matmul, (0, None))(batched_a, b),
                               jnp.einsum("bmk,kn->bmn", batched_a, b), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_dense_layer_runs_it_and_matches_flax():
    """layers.Dense: leading axes flattened into rows, same values and gradients as nn.Dense; bfloat16 runs it too
    (widened to float32, tests/backends/test_bfloat16.py), float16 and other dot_generals keep XLA's dot."""
    x, _ = operands((4, 3, 10), (1,), seed=4)
    variables = nn.Dense(7).init(jax.random.PRNGKey(0), x)
    loss = lambda layer: (lambda v: jnp.sum(jnp.sin(layer.apply(v, x))))  # noqa: E731
    ours = jax.jit(jax.grad(loss(layers.Dense(7))))
    assert "jaxcnn_onednn_matmul" in ours.lower(variables).as_text()
    for got, want in zip(jax.tree_util.tree_leaves(ours(variables)),
                         jax.tree_util.tree_leaves(jax.grad(loss(nn.Dense(7)))(variables))):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    low = jax.jit(lambda v: layers.Dense(7, dtype=jnp.bfloat16).apply(v, x))
    assert "jaxcnn_onednn_matmul" in low.lower(variables).as_text()
    half = jax.jit(lambda v: layers.Dense(7, dtype=jnp.float16).apply(v, x))
    assert "jaxcnn_onednn_matmul" not in half.lower(variables).as_text()
    batched = jnp.ones((2, 5, 3))
    dims = (((1,), (1,)), ((0,), (0,)))  # a batched contraction: not a dense layer's product
    np.testing.assert_allclose(fast_dense.dot_general(batched, batched, dims),
                               jax.lax.dot_general(batched, batched, dims))


@needs_onednn
def test_exported_for_gpu_and_switched_off_use_xla_dot(monkeypatch):
    a, b = operands((8, 6), (6, 4), seed=5)
    step = jax.jit(jax.grad(lambda a, b: jnp.sum(fast_dense.dot_general(a, b, (((1,), (0,)), ((), ()))) ** 2)))
    assert "jaxcnn_onednn_matmul" in step.lower(a, b).as_text()
    assert "jaxcnn_onednn_matmul" not in jax.export.export(step, platforms=["cuda"])(a, b).mlir_module()
    want = jax.grad(lambda a, b: jnp.sum(jnp.dot(a, b, precision="highest") ** 2))(a, b)
    for patch in (lambda: monkeypatch.setattr(fast_dense.jax, "default_backend", lambda: "gpu"),
                  lambda: monkeypatch.setenv("JAXCNN_ONEDNN", "0")):
        patch()
        fn = jax.jit(jax.grad(lambda a, b: jnp.sum(fast_dense.dot_general(a, b, (((1,), (0,)), ((), ()))) ** 2)))
        assert "jaxcnn_onednn_matmul" not in fn.lower(a, b).as_text()
        np.testing.assert_allclose(fn(a, b), want, rtol=1e-5, atol=1e-5)
        monkeypatch.undo()
    with onednn.xla_convolutions():
        assert "jaxcnn_onednn_matmul" not in jax.jit(fast_dense.dot_general, static_argnums=2).lower(
            a, b, (((1,), (0,)), ((), ()))).as_text()
