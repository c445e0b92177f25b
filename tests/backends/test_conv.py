"""jaxcnn.backends.cpu.conv: the same outputs and gradients as the plain XLA convolution and as NumPy loops.

Each test runs twice (the `backend` fixture): with float32 convolutions run by oneDNN (jaxcnn.backends.cpu.kernels,
the CPU default) and with XLA's convolutions behind the hand-written VJP (JAXCNN_ONEDNN=0). The fast path must agree
with `lax.conv_general_dilated` and its automatic derivatives to float32 tolerance for every stride, padding,
dilation and group count, under jit, vmap and second derivatives; a few cases are also checked against from-scratch
NumPy loops (tests/reference_numpy.py).
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxcnn.backends.cpu import conv as fast_conv
from jaxcnn.backends.cpu import kernels as onednn
from jaxcnn.nn import functional
from reference_numpy import np_conv2d, pad

DN = ("NHWC", "HWIO", "NHWC")

@pytest.fixture(autouse=True, params=["onednn", "xla"])
def backend(request, monkeypatch):
    """Every test runs twice: float32 convolutions through oneDNN (the CPU default), and through XLA's kernels
    with the hand-written VJP (JAXCNN_ONEDNN=0; also what runs for other dtypes and on GPU)."""
    if request.param == "onednn":
        if not onednn.available():
            pytest.skip("oneDNN library unavailable (tests/backends/test_kernels.py says why)")
        monkeypatch.setenv("JAXCNN_ONEDNN", "1")
    else:
        monkeypatch.setenv("JAXCNN_ONEDNN", "0")
    return request.param

def plain_conv(x, k, strides, padding, dilation, groups):
    return lax.conv_general_dilated(x, k, strides, padding, rhs_dilation=dilation, dimension_numbers=DN,
                                    feature_group_count=groups)

def fast(x, k, strides, padding, dilation, groups):
    return fast_conv.conv2d(x, k, strides=strides, padding=padding, dilation=dilation, groups=groups)

def loss_and_grads(conv, x, k, weights, strides, padding, dilation, groups):
    """A scalar loss with a non-uniform output cotangent, its value and d/dx, d/dk."""

    def loss(x, k):
        return jnp.sum(conv(x, k, strides, padding, dilation, groups) * weights)

    value, (dx, dk) = jax.value_and_grad(loss, (0, 1))(x, k)
    return value, dx, dk

def random_case(seed, n, h, w, cin, cout, kh, kw, groups, strides, padding, dilation):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((n, h, w, cin)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((kh, kw, cin // groups, cout)) * 0.3, jnp.float32)
    out_shape = jax.eval_shape(lambda: plain_conv(x, k, strides, padding, dilation, groups)).shape
    weights = jnp.asarray(rng.standard_normal(out_shape), jnp.float32)
    return x, k, weights

# (cin, cout, groups): dense, two groups, depthwise, depthwise with channel multiplier 2, four groups.
GROUPINGS = [(4, 6, 1), (4, 6, 2), (4, 4, 4), (3, 6, 3), (8, 8, 4)]
PADDINGS = [((0, 0), (0, 0)), ((1, 1), (1, 1)), ((0, 2), (2, 1))]
GEOMETRY = [((1, 1), (1, 1)), ((2, 2), (1, 1)), ((1, 1), (2, 2)), ((2, 1), (1, 2))]

@pytest.mark.parametrize("grouping", GROUPINGS, ids=lambda g: f"cin{g[0]}-cout{g[1]}-g{g[2]}")
@pytest.mark.parametrize("geometry", GEOMETRY, ids=lambda g: f"s{g[0][0]}{g[0][1]}-d{g[1][0]}{g[1][1]}")
def test_outputs_and_gradients_match_xla(grouping, geometry):
    cin, cout, groups = grouping
    strides, dilation = geometry
    for i, padding in enumerate(PADDINGS):
        x, k, weights = random_case(i, 2, 9, 8, cin, cout, 3, 3, groups, strides, padding, dilation)
        np.testing.assert_allclose(fast(x, k, strides, padding, dilation, groups),
                                   plain_conv(x, k, strides, padding, dilation, groups), rtol=1e-5, atol=1e-5)
        want = loss_and_grads(plain_conv, x, k, weights, strides, padding, dilation, groups)
        got = loss_and_grads(fast, x, k, weights, strides, padding, dilation, groups)
        for name, g, w in zip(("loss", "d/dx", "d/dkernel"), got, want):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4, err_msg=f"{name}, padding {padding}")

# Inputs smaller than the (dilated) kernel take the explicit-patches path (fast_conv._conv_patches): 2x2 and 1x1
# maps under a 3x3 kernel, a 4x3 map under a dilated 3x3 kernel (5x5 reach), strides, asymmetric and zero padding,
# and taps that only ever read padding (which the patches path leaves out).
SMALL_CASES = [
    ((2, 2), ((1, 1), (1, 1)), (1, 1), (1, 1)),
    ((1, 1), ((1, 1), (1, 1)), (1, 1), (1, 1)),
    ((2, 3), ((2, 0), (1, 2)), (2, 1), (1, 1)),
    ((4, 3), ((2, 2), (2, 2)), (1, 1), (2, 2)),
    ((2, 2), ((3, 3), (0, 3)), (2, 2), (1, 1)),
]

@pytest.mark.parametrize("size, padding, strides, dilation", SMALL_CASES, ids=lambda c: str(c).replace(" ", ""))
def test_inputs_smaller_than_the_kernel(size, padding, strides, dilation):
    assert fast_conv._smaller_than_kernel((1, *size, 1), (3, 3, 1, 1), dilation)
    x, k, weights = random_case(3, 3, *size, 5, 6, 3, 3, 1, strides, padding, dilation)
    y = fast(x, k, strides, padding, dilation, 1)
    np.testing.assert_allclose(y, plain_conv(x, k, strides, padding, dilation, 1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y, np_conv2d(x, k, strides, padding, dilation, 1), rtol=1e-5, atol=1e-5)
    want = loss_and_grads(plain_conv, x, k, weights, strides, padding, dilation, 1)
    got = loss_and_grads(fast, x, k, weights, strides, padding, dilation, 1)
    for name, g, w in zip(("loss", "d/dx", "d/dkernel"), got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4, err_msg=name)
    want_dx, want_dk = numpy_grads(x, k, weights, strides, padding, dilation, 1)
    np.testing.assert_allclose(got[1], want_dx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[2], want_dk, rtol=1e-5, atol=1e-5)

@pytest.mark.parametrize("strides, padding, dilation, kernel", [
    ((1, 1), ((2, 2), (2, 2)), (1, 1), (5, 5)),
    ((1, 1), ((0, 0), (0, 0)), (1, 1), (5, 5)),
    ((2, 1), ((1, 0), (2, 1)), (1, 2), (3, 3)),
    ((1, 2), ((1, 1), (1, 1)), (2, 1), (3, 2)),
])
def test_one_channel_inputs(strides, padding, dilation, kernel):
    """The first layer of MNIST-sized nets (one input channel) takes the fused multiply-add forward pass."""
    x, k, weights = random_case(11, 3, 12, 11, 1, 7, *kernel, 1, strides, padding, dilation)
    y = fast(x, k, strides, padding, dilation, 1)
    np.testing.assert_allclose(y, np_conv2d(x, k, strides, padding, dilation, 1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y, plain_conv(x, k, strides, padding, dilation, 1), rtol=1e-5, atol=1e-5)
    _, dx, dk = loss_and_grads(fast, x, k, weights, strides, padding, dilation, 1)
    want_dx, want_dk = numpy_grads(x, k, weights, strides, padding, dilation, 1)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dk, want_dk, rtol=1e-5, atol=1e-5)

def test_windows_reading_only_padding_give_zeros_and_zero_gradients():
    x = jnp.ones((2, 1, 1, 3))
    k = jnp.ones((3, 3, 3, 4))
    pads = ((0, 4), (0, 4))  # windows at offset (2, 2) and beyond see only padding for the first output
    y = fast(x, k, (3, 3), pads, (1, 1), 1)
    np.testing.assert_allclose(y, plain_conv(x, k, (3, 3), pads, (1, 1), 1))
    dk = jax.grad(lambda k: jnp.sum(fast(x, k, (3, 3), pads, (1, 1), 1)))(k)
    np.testing.assert_allclose(dk, jax.grad(lambda k: jnp.sum(plain_conv(x, k, (3, 3), pads, (1, 1), 1)))(k))

def numpy_grads(x, k, weights, strides, padding, dilation, groups):
    """d/dx and d/dk of sum(conv(x, k) * weights) with loops over the output (float64)."""
    x, k, g = (np.asarray(a, np.float64) for a in (x, k, weights))
    (sh, sw), (dh, dw) = strides, dilation
    kh, kw, cin_g, cout = k.shape
    cout_g = cout // groups
    xp = pad(x, padding)
    dxp = np.zeros_like(xp)
    dk = np.zeros_like(k)
    n, ho, wo, _ = g.shape
    for b, i, j, o in itertools.product(range(n), range(ho), range(wo), range(cout)):
        c0 = (o // cout_g) * cin_g
        for a, q in itertools.product(range(kh), range(kw)):
            r, s = i * sh + a * dh, j * sw + q * dw
            dk[a, q, :, o] += xp[b, r, s, c0 : c0 + cin_g] * g[b, i, j, o]
            dxp[b, r, s, c0 : c0 + cin_g] += k[a, q, :, o] * g[b, i, j, o]
    (t, _), (l, _) = padding
    return dxp[:, t : t + x.shape[1], l : l + x.shape[2], :], dk

@pytest.mark.parametrize(
    "grouping, strides, padding, dilation",
    [((3, 4, 1), (1, 1), ((1, 1), (1, 1)), (1, 1)), ((4, 4, 4), (2, 2), ((1, 0), (0, 1)), (1, 1)),
     ((4, 6, 2), (1, 2), ((2, 2), (0, 0)), (2, 1))],
)
def test_against_numpy_loops(grouping, strides, padding, dilation):
    cin, cout, groups = grouping
    x, k, weights = random_case(7, 2, 7, 6, cin, cout, 3, 2, groups, strides, padding, dilation)
    y = fast(x, k, strides, padding, dilation, groups)
    np.testing.assert_allclose(y, np_conv2d(x, k, strides, padding, dilation, groups), rtol=1e-5, atol=1e-5)
    _, dx, dk = loss_and_grads(fast, x, k, weights, strides, padding, dilation, groups)
    want_dx, want_dk = numpy_grads(x, k, weights, strides, padding, dilation, groups)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dk, want_dk, rtol=1e-5, atol=1e-5)

def test_functional_conv2d_takes_the_fast_path(backend):
    x = jnp.ones((1, 5, 5, 2))
    k = jnp.ones((3, 3, 2, 3))
    jaxpr = str(jax.make_jaxpr(lambda x, k: functional.conv2d(x, k, padding="same"))(x, k))
    if backend == "onednn":
        assert "jaxcnn_onednn_conv" in jaxpr and "custom_vjp_call" not in jaxpr
    else:
        assert "custom_vjp_call" in jaxpr and "jaxcnn_onednn_conv" not in jaxpr

def test_jit_and_vmap():
    strides, padding, dilation = (2, 1), ((1, 1), (0, 2)), (1, 1)
    x, k, weights = random_case(3, 2, 8, 7, 4, 4, 3, 3, 2, strides, padding, dilation)
    xs, ks = jnp.stack([x, 2 * x]), jnp.stack([k, -k])
    ws = jnp.stack([weights, weights])

    def grads(conv):
        return jax.jit(jax.vmap(lambda x, k, w: loss_and_grads(conv, x, k, w, strides, padding, dilation, 2)))

    for got, want in zip(grads(fast)(xs, ks, ws), grads(plain_conv)(xs, ks, ws)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)

@pytest.mark.parametrize("groups, cout", [(1, 5), (4, 4)], ids=["dense", "depthwise"])
def test_second_derivatives(groups, cout):
    strides, padding, dilation = (1, 1), ((1, 1), (1, 1)), (1, 1)
    x, k, weights = random_case(5, 2, 6, 6, 4, cout, 3, 3, groups, strides, padding, dilation)

    def hvp(conv):
        def loss(x, k):
            y = conv(x, k, strides, padding, dilation, groups)
            return jnp.sum(jnp.tanh(y) * weights)

        grad = jax.grad(loss, (0, 1))
        return jax.jvp(grad, (x, k), (jnp.ones_like(x), 0.5 * jnp.ones_like(k)))[1]

    for got, want in zip(hvp(fast), hvp(plain_conv)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)

def test_bfloat16_keeps_dtypes():
    strides, padding, dilation = (1, 1), ((1, 1), (1, 1)), (1, 1)
    x, k, weights = random_case(9, 2, 6, 6, 4, 4, 3, 3, 4, strides, padding, dilation)
    x, k = x.astype(jnp.bfloat16), k.astype(jnp.bfloat16)
    _, dx, dk = loss_and_grads(fast, x, k, weights.astype(jnp.bfloat16), strides, padding, dilation, 4)
    _, want_dx, want_dk = loss_and_grads(plain_conv, x, k, weights.astype(jnp.bfloat16), strides, padding, dilation, 4)
    assert dx.dtype == dk.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(dk, np.float32), np.asarray(want_dk, np.float32), rtol=0.05, atol=0.05)
    np.testing.assert_allclose(np.asarray(dx, np.float32), np.asarray(want_dx, np.float32), rtol=0.05, atol=0.05)

def test_one_channel_bfloat16_sums_in_float32():
    """bfloat16 in and out; the 25 products of a 5x5 one-channel window are summed in float32 (one rounding)."""
    strides, padding, dilation = (1, 1), ((2, 2), (2, 2)), (1, 1)
    x, k, _ = random_case(5, 2, 10, 10, 1, 6, 5, 5, 1, strides, padding, dilation)
    xb, kb = x.astype(jnp.bfloat16), k.astype(jnp.bfloat16)
    y = fast(xb, kb, strides, padding, dilation, 1)
    assert y.dtype == jnp.bfloat16
    want = np_conv2d(np.asarray(xb, np.float32), np.asarray(kb, np.float32), strides, padding, dilation, 1)
    # One bfloat16 rounding of the exact sum: relative error <= 2^-8.
    np.testing.assert_allclose(np.asarray(y, np.float32), want, rtol=2 ** -8, atol=1e-6)

def test_nan_inputs_propagate():
    x = jnp.ones((1, 4, 4, 2)).at[0, 1, 1, 0].set(jnp.nan)
    k = jnp.ones((3, 3, 2, 2))
    y = fast(x, k, (1, 1), ((1, 1), (1, 1)), (1, 1), 1)
    assert bool(jnp.isnan(y).any()) and not bool(jnp.isnan(y[0, 3, 3]).any())
    dk = jax.grad(lambda k: jnp.sum(fast(x, k, (1, 1), ((1, 1), (1, 1)), (1, 1), 1)))(k)
    assert bool(jnp.isnan(dk[:, :, 0]).all()) and bool(jnp.isfinite(dk[:, :, 1]).all())  # only input channel 0 saw the NaN
