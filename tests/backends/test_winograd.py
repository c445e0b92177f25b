"""Winograd F(4x4, 3x3) convolutions, oneDNN's (csrc/onednn_conv.cc) and jaxcnn's own for layers of up to 64
channels (csrc/winograd.cc): which geometries take which, and that the forward pass, input gradient and filter
gradient match float64 NumPy references about as closely as the direct kernels do."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcnn.backends.cpu import conv as fast_conv
from jaxcnn.backends.cpu import kernels as onednn
from reference_numpy import np_conv2d

PAD1 = ((1, 1), (1, 1))


def _has_avx512() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return "avx512f" in f.read()
    except OSError:
        return False


pytestmark = pytest.mark.skipif(not (onednn.available() and _has_avx512()),
                                reason="oneDNN's Winograd kernels need the native library and an AVX-512 CPU")


def geometry(n: int, hw: int, cin: int, cout: int, stride: int = 1) -> onednn.Geometry:
    ho = (hw + 2 - 3) // stride + 1
    return onednn.Geometry((n, hw, hw, cin), (3, 3, cin, cout), (n, ho, ho, cout), (stride, stride), PAD1, (1, 1), 1)


OWN = "jaxcnn_winograd_f4x4_3x3"


def kinds(g: onednn.Geometry) -> dict[str, str]:
    """'own', 'onednn' (oneDNN's Winograd) or 'direct', per op of `g`."""
    names = onednn.implementations(g)
    assert names is not None
    return {op: "own" if name == OWN else "onednn" if name.startswith("jit_wino") else "direct"
            for op, name in names.items()}


def is_winograd(g: onednn.Geometry) -> bool:
    """Whether all three ops of `g` run oneDNN's Winograd (and not if none does)."""
    found = set(kinds(g).values())
    assert found in ({"onednn"}, {"direct"}), found
    return found == {"onednn"}


ALL_OWN = {"forward": "own", "backward_data": "own", "backward_weights": "own"}


def test_own_winograd_takes_layers_of_up_to_64_channels_with_whole_tiles():
    assert kinds(geometry(128, 32, 16, 16)) == ALL_OWN  # ResNet-20's first stage
    assert kinds(geometry(128, 16, 32, 32)) == ALL_OWN  # its second
    assert kinds(geometry(1, 4, 16, 16)) == ALL_OWN     # one tile
    # Filter gradients of more than 32 channels: oneDNN's Winograd where it takes them, else direct.
    assert kinds(geometry(128, 8, 64, 64)) == {**ALL_OWN, "backward_weights": "onednn"}  # its third
    assert kinds(geometry(16, 56, 64, 64)) == {**ALL_OWN, "backward_weights": "onednn"}  # ResNet-18's first
    assert kinds(geometry(8, 32, 16, 48)) == {**ALL_OWN, "backward_weights": "direct"}   # in and out differ
    assert set(kinds(geometry(32, 7, 64, 64)).values()) == {"onednn"}  # 7x7: partial tiles
    assert set(kinds(geometry(16, 8, 128, 128)).values()) == {"onednn"}  # more than 64 channels
    assert set(kinds(geometry(16, 8, 24, 24)).values()) == {"direct"}  # not a multiple of 16
    assert set(kinds(geometry(128, 16, 32, 32, stride=2)).values()) == {"direct"}


def test_onednn_winograd_takes_wide_convolutions():
    assert is_winograd(geometry(32, 7, 64, 64))       # partial tiles pay from 64 channels: 7x7 -> 8x8
    assert is_winograd(geometry(16, 14, 256, 256))    # ResNet-18's third stage: 14x14 -> 16x16
    assert is_winograd(geometry(16, 8, 128, 128))
    assert not is_winograd(geometry(128, 7, 32, 64))   # 7x7 outputs with 32 channels: slower
    assert not is_winograd(geometry(64, 6, 64, 64))    # 6x6 -> 8x8: too much padding
    assert not is_winograd(geometry(128, 16, 32, 32, stride=2))
    assert not is_winograd(geometry(4, 8, 128, 128))  # 256 output pixels per call: too little work


def conv3x3(x: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Stride-1, padding-1 3x3 cross-correlation in float64, one einsum per kernel tap (np_conv2d's loops, which
    test_vectorised_reference_matches_the_loops checks it against, take a minute at these sizes)."""
    x, k = np.asarray(x, np.float64), np.asarray(k, np.float64)
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    h, w = x.shape[1:3]
    return sum(np.einsum("nijc,co->nijo", xp[:, a:a + h, b:b + w], k[a, b]) for a in range(3) for b in range(3))


def conv3x3_grads(x: np.ndarray, k: np.ndarray, ct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Input and filter gradients of `conv3x3`, in float64: the input gradient is the cotangent correlated with
    the kernel flipped in space and transposed in channels; the filter gradient sums input windows x cotangent."""
    x, k, ct = (np.asarray(a, np.float64) for a in (x, k, ct))
    dx = conv3x3(ct, np.transpose(k[::-1, ::-1], (0, 1, 3, 2)))
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    h, w = x.shape[1:3]
    dk = np.stack([np.stack([np.einsum("nijc,nijo->co", xp[:, a:a + h, b:b + w], ct) for b in range(3)])
                   for a in range(3)])
    return dx, dk


def test_vectorised_reference_matches_the_loops():
    rng = np.random.default_rng(0)
    x, k = rng.standard_normal((2, 5, 4, 3)), rng.standard_normal((3, 3, 3, 2))
    np.testing.assert_allclose(conv3x3(x, k), np_conv2d(x, k, 1, PAD1), rtol=1e-12, atol=1e-12)


def check_against_float64(n: int, hw: int, cin: int, cout: int) -> None:
    """Forward, input and filter gradients of one jitted convolution against `conv3x3` and `conv3x3_grads`: the
    largest error within 1e-5 of the largest value, and a second run equal bit for bit."""
    rng = np.random.default_rng(n * 1000 + hw)
    x = rng.standard_normal((n, hw, hw, cin)).astype(np.float32)
    k = (rng.standard_normal((3, 3, cin, cout)) / np.sqrt(9 * cin)).astype(np.float32)
    ct = rng.standard_normal((n, hw, hw, cout)).astype(np.float32)

    @jax.jit
    def run(x, k, ct):
        y, vjp = jax.vjp(lambda x, k: fast_conv.conv2d(x, k, strides=(1, 1), padding=PAD1, dilation=(1, 1),
                                                       groups=1), x, k)
        return (y, *vjp(ct))

    got = run(x, k, ct)
    want_dx, want_dk = conv3x3_grads(x, k, ct)
    for g, want in zip(got, (conv3x3(x, k), want_dx, want_dk)):
        err = np.max(np.abs(np.asarray(g, np.float64) - want)) / np.max(np.abs(want))
        assert err < 1e-5, err  # measured 0.7-7e-6 (the direct kernels: 0.3-1e-6)
    for a, b in zip(run(x, k, ct), got):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("n,hw,c", [(160, 8, 128), (16, 16, 96), (32, 7, 64)],
                         ids=["chunked-8x8", "one-chunk-16x16", "partial-tiles-7x7"])
def test_winograd_matches_float64_references(n, hw, c):
    assert is_winograd(geometry(n, hw, c, c))
    check_against_float64(n, hw, c, c)


@pytest.mark.parametrize("n,hw,cin,cout", [(6, 32, 16, 16), (3, 16, 32, 16), (5, 8, 64, 64), (1, 4, 16, 48),
                                           (2, 12, 48, 32)],
                         ids=["resnet20-stage1", "odd-batch-32-to-16", "resnet20-stage3", "one-tile-16-to-48",
                              "3x3-tiles-48-to-32"])
def test_own_winograd_matches_float64_references(n, hw, cin, cout):
    """Batches split unevenly over the threads (3 images: 1 + 2), one image, and every channel count the kernels
    take (16, 32, 48, 64), in and out different (each case's filter gradient runs whichever kernel `kinds` says)."""
    assert kinds(geometry(n, hw, cin, cout))["forward"] == "own"
    check_against_float64(n, hw, cin, cout)


@pytest.mark.parametrize("value", ["0", " Off "])
def test_environment_turns_winograd_off(value):
    code = ("from jaxcnn.backends.cpu import kernels as k; "
            "g = k.Geometry((128, 8, 8, 64), (3, 3, 64, 64), (128, 8, 8, 64), (1, 1), ((1, 1), (1, 1)), (1, 1), 1); "
            "print(sorted(k.implementations(g).values()))")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "JAXCNN_WINOGRAD": value},
                         capture_output=True, text=True, check=True).stdout
    assert "wino" not in out and "avx512" in out, out


@pytest.mark.parametrize("c", [32, 128], ids=["own", "onednn"])
def test_devices_running_winograd_at_once_get_their_own_results(c):
    """pmap over the CPU devices runs one Winograd call per device in parallel threads, each with its thread's own
    scratchpad and blocked buffers: every device's gradients match the float64 reference and repeat bit for bit."""
    n_dev = jax.local_device_count()
    if n_dev < 2:
        pytest.skip("needs several CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    g = geometry(16, 8, c, c)
    g_dev = onednn.Geometry(g.x_shape, g.kernel_shape, g.y_shape, g.strides, g.padding, g.dilation, g.groups,
                            threads=1)
    assert kinds(g_dev) == ALL_OWN if c == 32 else is_winograd(g_dev)
    rng = np.random.default_rng(3)
    xs = rng.standard_normal((n_dev, 16, 8, 8, c)).astype(np.float32)
    k = (rng.standard_normal((3, 3, c, c)) / np.sqrt(9 * c)).astype(np.float32)
    cts = rng.standard_normal((n_dev, 16, 8, 8, c)).astype(np.float32)

    def grads(x, k, ct):
        _, vjp = jax.vjp(lambda x, k: fast_conv.conv2d(x, k, strides=(1, 1), padding=PAD1, dilation=(1, 1),
                                                       groups=1), x, k)
        return vjp(ct)

    runs = [jax.pmap(grads, in_axes=(0, None, 0))(xs, k, cts) for _ in range(2)]
    for d in range(n_dev):
        want_dx, want_dk = conv3x3_grads(xs[d], k, cts[d])
        for got, want in ((runs[0][0][d], want_dx), (runs[0][1][d], want_dk)):
            assert np.max(np.abs(np.asarray(got, np.float64) - want)) / np.max(np.abs(want)) < 1e-5
    for a, b in zip(runs[1], runs[0]):
        np.testing.assert_array_equal(a, b)
