"""Float32 and bfloat16 convolutions that XLA's CPU backend hands to oneDNN, as one JAX primitive with exact
derivative rules.

XLA's CPU convolutions run 2-10x slower than oneDNN's on the layers of small CNNs (CIFAR ResNet-20 on 2 cores:
forward 8.7 ms against 3.1 ms, filter gradient 23 ms against 2.7 ms for the 16-channel 32x32 layer at batch 128;
benchmarks/README.md), and PyTorch's CPU convolutions are oneDNN's. So on the CPU, jaxcnn's float32 convolutions
run as XLA FFI custom calls into oneDNN (`csrc/onednn_conv.cc`), compiled on first use with the system C++
compiler against Debian's ``libdnnl-dev`` and cached (``$JAXCNN_CACHE_DIR``, default ``~/.cache/jaxcnn``). The
same calls run float32 3x3 stride-1 convolutions of up to 64 channels (multiples of 16) as jaxcnn's own Winograd
F(4x4, 3x3) kernel on AVX-512 CPUs (``csrc/winograd.cc``; ``JAXCNN_WINOGRAD=0`` for the direct kernels).

The three convolutions of a training step are one primitive, ``jaxcnn_onednn_conv``, with ``op`` one of
``forward`` (x, w) -> y, ``backward_data`` (dy, w) -> dx and ``backward_weights`` (x, dy) -> dw. Each is bilinear,
and the transpose of each is another of the three, so `jax.grad`, `jax.jvp`, `jax.vjp`, Hessians and any nesting of
them work with no custom_vjp. `jax.vmap` runs XLA's convolution. On other platforms (GPU, TPU) the primitive
lowers to ``lax.conv_general_dilated`` and its autodiff transposes, i.e. exactly what JAX would run without it.

`usable` decides at trace time: float32 operands, or bfloat16 operands on a CPU with bfloat16 arithmetic (AMX or
AVX512-BF16, `cpu_has_fast_bfloat16`: oneDNN then accumulates in float32, as PyTorch's autocast does), the library
built, and oneDNN has a JIT kernel (not its slow reference code) for all three convolutions of the geometry.
Otherwise `jaxcnn.backends.cpu.conv` keeps XLA's convolutions (and warns once, `warn_slow_bfloat16`, for bfloat16).
``JAXCNN_ONEDNN=0`` turns this module off (to compare against XLA's kernels), and so does the `xla_convolutions()`
context for what is traced inside it (XLA's cost analysis does not see into custom calls, and `jax.export` refuses
them). Functions already traced keep their path. When the library cannot be built, one warning says why and what
to install (``apt-get install g++ libdnnl-dev``).

Shapes: ``x [N, H, W, Cin]``, ``w [KH, KW, Cin / groups, Cout]`` (HWIO), ``y [N, Ho, Wo, Cout]``.

Threads: a convolution given every core (one device) splits an evenly divisible batch over XLA's own intra-op
thread pool, one one-thread primitive per slice; otherwise oneDNN runs on an OpenMP team of `threads_per_device`
threads, and calls that use every core hold one lock, so that XLA never runs two such teams at once
(csrc/onednn_common.h).

The same library holds jaxcnn's own training-mode batch normalisation (`csrc/batch_norm.cc`: `norm_forward`,
`norm_backward`, float32 or bfloat16 activations, optionally fused with the ReLU after it; loops on XLA's thread
pool, no oneDNN), which `jaxcnn.backends.cpu.norm` wraps in derivative rules;
oneDNN's sgemm for dense layers (`csrc/onednn_matmul.cc`: the `matmul_p` primitive, bilinear like the convolutions,
row blocks on XLA's thread pool), which `jaxcnn.backends.cpu.dense` uses; and jaxcnn's own max pooling over
non-overlapping windows (`csrc/max_pool.cc`: `max_pool_forward`, `max_pool_backward`; AVX-512 loops on XLA's
thread pool, no oneDNN), which `jaxcnn.backends.cpu.pool` wraps. The same switches (``JAXCNN_ONEDNN=0``,
`xla_convolutions()`) turn all of them off.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import dataclasses
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

FORWARD, BACKWARD_DATA, BACKWARD_WEIGHTS = "forward", "backward_data", "backward_weights"
_OP_INDEX = {FORWARD: 0, BACKWARD_DATA: 1, BACKWARD_WEIGHTS: 2}
_TARGETS = {FORWARD: ("jaxcnn_onednn_conv_fwd", "JaxcnnConvFwd"),
            BACKWARD_DATA: ("jaxcnn_onednn_conv_bwd_data", "JaxcnnConvBwdData"),
            BACKWARD_WEIGHTS: ("jaxcnn_onednn_conv_bwd_weights", "JaxcnnConvBwdWeights")}
_NORM_TARGETS = {"forward": ("jaxcnn_batch_norm_fwd", "JaxcnnNormFwd"),
                 "backward": ("jaxcnn_batch_norm_bwd", "JaxcnnNormBwd"),
                 "forward_add": ("jaxcnn_batch_norm_add_fwd", "JaxcnnNormAddFwd"),
                 "backward_add": ("jaxcnn_batch_norm_add_bwd", "JaxcnnNormAddBwd"),
                 "pool_forward": ("jaxcnn_batch_norm_max_pool_fwd", "JaxcnnNormPoolFwd"),
                 "pool_backward": ("jaxcnn_batch_norm_max_pool_bwd", "JaxcnnNormPoolBwd")}
_POOL_TARGETS = {"forward": ("jaxcnn_max_pool_fwd", "JaxcnnMaxPoolFwd"),
                 "backward": ("jaxcnn_max_pool_bwd", "JaxcnnMaxPoolBwd")}
_MATMUL_TARGET = ("jaxcnn_onednn_matmul", "JaxcnnMatmul")
_SGD_TARGET = ("jaxcnn_sgd_update", "JaxcnnSgdUpdate")
_ADD_TARGET = ("jaxcnn_add", "JaxcnnAdd")
_SOURCES = tuple(Path(__file__).with_name("csrc") / name
                 for name in ("onednn_conv.cc", "winograd.cc", "batch_norm.cc", "onednn_matmul.cc", "max_pool.cc",
                              "sgd_update.cc", "add.cc"))
_HEADERS = tuple(Path(__file__).with_name("csrc") / name
                 for name in ("bfloat16.h", "bfloat16_avx512.h", "env_switch.h", "onednn_common.h", "parallel_for.h",
                              "winograd.h"))
_INSTALL_HINT = ("install a C++ compiler and oneDNN's headers (Debian/Ubuntu: `apt-get install g++ libdnnl-dev`), "
                 "or set JAXCNN_ONEDNN=0 to silence this")


@dataclasses.dataclass(frozen=True)
class Geometry:
    """A forward convolution's shapes and hyperparameters; all three ops of one layer share it (hashable)."""

    x_shape: tuple[int, int, int, int]       # [N, H, W, Cin]
    kernel_shape: tuple[int, int, int, int]  # [KH, KW, Cin / groups, Cout]
    y_shape: tuple[int, int, int, int]       # [N, Ho, Wo, Cout]
    strides: tuple[int, int]
    padding: tuple[tuple[int, int], tuple[int, int]]
    dilation: tuple[int, int]
    groups: int
    threads: int = 0  # OpenMP threads oneDNN may use; 0 = all cores (see `threads_per_device`)

    def params(self) -> np.ndarray:
        """The FFI attribute: [sh, sw, pad_t, pad_b, pad_l, pad_r, dil_h, dil_w, groups, threads] as int64."""
        (pt, pb), (pl, pr) = self.padding
        return np.array([*self.strides, pt, pb, pl, pr, *self.dilation, self.groups, self.threads], np.int64)

    def dims(self, dtype=np.float32) -> np.ndarray:
        """JaxcnnConvImpl's layout: [n, h, w, cin, kh, kw, cout, ho, wo, *params, bf16] for operands of `dtype`."""
        n, h, w, cin = self.x_shape
        kh, kw, _, cout = self.kernel_shape
        _, ho, wo, _ = self.y_shape
        bf16 = int(np.dtype(dtype) == jnp.bfloat16)
        return np.concatenate([np.array([n, h, w, cin, kh, kw, cout, ho, wo], np.int64), self.params(),
                               np.array([bf16], np.int64)])

    def out_shape(self, op: str) -> tuple[int, ...]:
        return {FORWARD: self.y_shape, BACKWARD_DATA: self.x_shape, BACKWARD_WEIGHTS: self.kernel_shape}[op]


_CONCURRENT_DEVICES: contextvars.ContextVar[int | None] = contextvars.ContextVar("jaxcnn_onednn_devices", default=None)


@contextlib.contextmanager
def concurrent_devices(n: int) -> Iterator[None]:
    """Convolutions traced inside run on `n` CPU devices of this process at once (a strategy's mesh).

    `jaxcnn.train.parallel.Strategy` traces its steps inside this context, so that a one-device step gives oneDNN
    every core even when the process has several CPU devices, and an n-device step gives each device its share.
    """
    if int(n) < 1:
        raise ValueError(f"concurrent_devices: n={n} must be at least 1")
    token = _CONCURRENT_DEVICES.set(int(n))
    try:
        yield
    finally:
        _CONCURRENT_DEVICES.reset(token)


def threads_per_device() -> int:
    """OpenMP threads for one convolution: 0 (all cores) on one device, else cores // devices (at least 1).

    The device count is the one `concurrent_devices` gives (a strategy's devices in this process), else every
    local CPU device. XLA runs the computations of all the devices of a mesh at once (pmap, shard_map and
    sharded jit over ``--xla_force_host_platform_device_count`` devices); one full OpenMP team per device would
    oversubscribe the cores and spin (a two-process, 4-device-each test ran 5x slower and timed out on 2 cores).
    """
    devices = _CONCURRENT_DEVICES.get()
    if devices is None:
        devices = jax.local_device_count("cpu")
    if devices <= 1:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // devices)


# --------------------------------------------------------------------------------------------- building the library

def _cache_dir() -> Path:
    root = os.environ.get("JAXCNN_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "jaxcnn")
    return Path(root)


def _compile(sources: tuple[Path, ...], include_dir: str, out: Path) -> None:
    """g++ -O3 -shared sources -ldnnl -> out, written atomically (parallel test workers may build at once)."""
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise RuntimeError("no C++ compiler found (looked for $CXX, g++, c++)")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [cxx, "-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-w", f"-I{include_dir}", *map(str, sources),
           "-o", tmp, "-ldnnl"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            tail = "\n".join(done.stderr.strip().splitlines()[-6:])
            raise RuntimeError(f"compiling {', '.join(s.name for s in sources)} failed ({' '.join(cmd)}):\n{tail}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _library_path() -> Path:
    """Where the compiled library for these sources and this jaxlib's FFI headers lives."""
    text = b"".join(path.read_bytes() for path in (*_SOURCES, *_HEADERS))
    digest = hashlib.sha256(text + jax.ffi.include_dir().encode() + jax.__version__.encode()).hexdigest()[:16]
    return _cache_dir() / f"libjaxcnn_onednn_{digest}.so"


_XLA_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("jaxcnn_onednn_xla_only", default=False)


def enabled() -> bool:
    """False inside `xla_convolutions()` or when the environment variable JAXCNN_ONEDNN is 0 / false / no / off
    (both read on every call, i.e. whenever a convolution is traced)."""
    if _XLA_ONLY.get():
        return False
    return os.environ.get("JAXCNN_ONEDNN", "1").strip().lower() not in ("0", "false", "no", "off")


@contextlib.contextmanager
def xla_convolutions() -> Iterator[None]:
    """Within this block, convolutions traced use XLA's kernels (e.g. to read XLA's cost analysis, which cannot see
    into custom calls, or to export a function with `jax.export`)."""
    token = _XLA_ONLY.set(True)
    try:
        yield
    finally:
        _XLA_ONLY.reset(token)


@functools.lru_cache(maxsize=None)
def _library() -> ctypes.CDLL | None:
    """Builds (once per source version), loads and registers the FFI targets; None when that is impossible."""
    try:
        path = _library_path()
        if not path.exists():
            _compile(_SOURCES, jax.ffi.include_dir(), path)
        lib = ctypes.CDLL(str(path))
        lib.JaxcnnConvImpl.restype = ctypes.c_char_p
        lib.JaxcnnConvImpl.argtypes = [ctypes.c_int64, ctypes.POINTER(ctypes.c_int64), ctypes.c_char_p,
                                       ctypes.c_int64]
        lib.JaxcnnAvx512Bf16Rounding.restype = ctypes.c_int64
        lib.JaxcnnAvx512Bf16Rounding.argtypes = []
        for target, symbol in (*_TARGETS.values(), *_NORM_TARGETS.values(), *_POOL_TARGETS.values(),
                               _MATMUL_TARGET, _SGD_TARGET, _ADD_TARGET):
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
        return lib
    except Exception as err:  # noqa: BLE001 - any failure means: keep XLA's convolutions, say why once
        if jax.default_backend() == "cpu":
            warnings.warn(f"jaxcnn: oneDNN convolutions unavailable, using XLA's CPU convolutions (2-10x slower "
                          f"here): {err}. To fix: {_INSTALL_HINT}.", RuntimeWarning, stacklevel=2)
        return None


def available() -> bool:
    """Whether the oneDNN library is built and registered (False with JAXCNN_ONEDNN=0)."""
    return enabled() and _library() is not None


@functools.lru_cache(maxsize=None)
def implementations(geometry: Geometry, dtype=np.float32) -> dict[str, str] | None:
    """oneDNN's implementation name for each of the three ops of `geometry` with operands of `dtype` (float32 or
    bfloat16; e.g. 'brgconv:avx512_core', 'brgconv:avx512_core_amx_bf16', or 'jaxcnn_winograd_f4x4_3x3' for
    jaxcnn's own Winograd kernel); None when the library is unavailable or
    oneDNN rejects the geometry (cached: it depends on its arguments only; `usable` checks `enabled()`)."""
    lib = _library()
    if lib is None:
        return None
    dims = geometry.dims(dtype)
    names = {}
    for op, index in _OP_INDEX.items():
        error = ctypes.create_string_buffer(512)
        impl = lib.JaxcnnConvImpl(index, dims.ctypes.data_as(ctypes.POINTER(ctypes.c_int64)), error, len(error))
        if impl is None:
            return None
        names[op] = impl.decode()
    return names


_CPU_FLAGS_FILE = "/proc/cpuinfo"


@functools.lru_cache(maxsize=None)
def cpu_has_fast_bfloat16(cpuinfo: str = _CPU_FLAGS_FILE) -> bool:
    """Whether this CPU multiplies bfloat16 in hardware: the ``amx_bf16`` (AMX tiles) or ``avx512_bf16`` flag in
    `cpuinfo` (Linux's /proc/cpuinfo; False where it cannot be read)."""
    try:
        with open(cpuinfo) as f:
            flags = {word for line in f if line.startswith("flags") for word in line.split(":", 1)[1].split()}
    except OSError:
        return False
    return bool(flags & {"amx_bf16", "avx512_bf16"})


def usable(geometry: Geometry, *dtypes) -> bool:
    """True when the convolution should run through oneDNN: float32 operands, or bfloat16 operands on a CPU with
    `cpu_has_fast_bfloat16`, and a JIT kernel for all three ops."""
    kinds = {np.dtype(d) for d in dtypes}
    if not enabled() or len(kinds) != 1:
        return False
    dtype = kinds.pop()
    if dtype != np.float32 and not (dtype == jnp.bfloat16 and cpu_has_fast_bfloat16()):
        return False
    if any(s <= 0 for s in (*geometry.x_shape, *geometry.kernel_shape, *geometry.y_shape)):
        return False
    impls = implementations(geometry, dtype)
    return impls is not None and not any(name.startswith("ref") for name in impls.values())


# What bfloat16 convolutions in XLA's CPU kernels cost, measured (benchmarks/README.md).
SLOW_BFLOAT16_COST = ("ResNet-20 training with bfloat16 compute in XLA's kernels ran at 6.2 images/s against 627 "
                      "in float32, 100x slower (2-core Xeon, jax 0.12, 2026-12-06)")


@functools.lru_cache(maxsize=None)
def warn_slow_bfloat16(reason: str) -> None:
    """Warns once per `reason` that bfloat16 compute runs in XLA's CPU kernels here, naming the measured cost."""
    warnings.warn(f"jaxcnn: bfloat16 compute on the CPU runs {reason} in XLA's kernels, which have no fast bfloat16 "
                  f"convolution: {SLOW_BFLOAT16_COST}. Train with float32 compute on this machine "
                  "(train.compute_dtype=float32), or on a CPU with AMX or AVX512-BF16 and the native kernels "
                  "built.", RuntimeWarning, stacklevel=3)


# ------------------------------------------------------------------------------------------------------ the primitive

conv_p = Primitive("jaxcnn_onednn_conv")


def _lax_conv(x, w, geometry: Geometry):
    return lax.conv_general_dilated(x, w, geometry.strides, geometry.padding, rhs_dilation=geometry.dilation,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=geometry.groups)


def _xla_impl(lhs, rhs, *, op: str, geometry: Geometry):
    """The same op with XLA's convolutions (what JAX's autodiff of lax.conv_general_dilated emits)."""
    if op == FORWARD:
        return _lax_conv(lhs, rhs, geometry)
    if op == BACKWARD_DATA:  # lhs = dy, rhs = w
        probe = jax.ShapeDtypeStruct(geometry.x_shape, lhs.dtype)
        return jax.linear_transpose(lambda v: _lax_conv(v, rhs, geometry), probe)(lhs)[0]
    probe = jax.ShapeDtypeStruct(geometry.kernel_shape, lhs.dtype)  # lhs = x, rhs = dy
    return jax.linear_transpose(lambda k: _lax_conv(lhs, k, geometry), probe)(rhs)[0]


def _abstract_eval(lhs, rhs, *, op: str, geometry: Geometry):
    return jax.core.ShapedArray(geometry.out_shape(op), lhs.dtype)


def _bind(lhs, rhs, op: str, geometry: Geometry):
    return conv_p.bind(lhs, rhs, op=op, geometry=geometry)


def _lhs_transpose(ct, lhs, rhs, *, op: str, geometry: Geometry):
    """Cotangent of the first operand (x for forward and backward_weights, dy for backward_data)."""
    if op == FORWARD:  # y = F(x, w): dx = D(dy, w)
        return _bind(ct, rhs, BACKWARD_DATA, geometry)
    if op == BACKWARD_DATA:  # dx = D(dy, w): d(dy) = F(ct, w)
        return _bind(ct, rhs, FORWARD, geometry)
    return _bind(rhs, ct, BACKWARD_DATA, geometry)  # dw = W(x, dy): d(x) = D(dy, ct)


def _rhs_transpose(ct, lhs, rhs, *, op: str, geometry: Geometry):
    """Cotangent of the second operand (w for forward and backward_data, dy for backward_weights)."""
    if op == FORWARD:  # y = F(x, w): dw = W(x, dy)
        return _bind(lhs, ct, BACKWARD_WEIGHTS, geometry)
    if op == BACKWARD_DATA:  # dx = D(dy, w): d(w) = W(ct, dy)
        return _bind(ct, lhs, BACKWARD_WEIGHTS, geometry)
    return _bind(lhs, ct, FORWARD, geometry)  # dw = W(x, dy): d(dy) = F(x, ct)


@functools.lru_cache(maxsize=None)
def jitted_bind(prim: Primitive, params: tuple):
    """Eager calls of `prim` run it compiled (its FFI call only exists inside XLA): its bind with `params` (sorted
    (name, value) pairs) under `jax.jit`, cached."""
    return jax.jit(lambda *args: prim.bind(*args, **dict(params)))


def _define_bilinear(prim: Primitive, *, abstract_eval, lhs_transpose, rhs_transpose, xla_impl, cpu_lowering) -> None:
    """The rules of a bilinear primitive: its two transposes (so JVP, VJP and every derivative order follow), vmap
    and other platforms through `xla_impl` (XLA's op), and `cpu_lowering` (the FFI call) on the CPU."""
    def batch(args, dims, **params):
        return jax.vmap(functools.partial(xla_impl, **params), in_axes=dims)(*args), 0

    prim.def_impl(lambda *args, **params: jitted_bind(prim, tuple(sorted(params.items())))(*args))
    prim.def_abstract_eval(abstract_eval)
    ad.defbilinear(prim, lhs_transpose, rhs_transpose)
    batching.primitive_batchers[prim] = batch
    mlir.register_lowering(prim, mlir.lower_fun(xla_impl, multiple_results=False))
    mlir.register_lowering(prim, cpu_lowering, platform="cpu")


def _cpu_lowering(ctx, lhs, rhs, *, op: str, geometry: Geometry):
    if _library() is None:  # registers the FFI targets on first use
        raise RuntimeError(f"jaxcnn_onednn_conv needs the oneDNN library, which is unavailable: {_INSTALL_HINT}")
    return jax.ffi.ffi_lowering(_TARGETS[op][0])(ctx, lhs, rhs, params=geometry.params())


_define_bilinear(conv_p, abstract_eval=_abstract_eval, lhs_transpose=_lhs_transpose, rhs_transpose=_rhs_transpose,
                 xla_impl=_xla_impl, cpu_lowering=_cpu_lowering)


def conv2d(x: jax.Array, kernel: jax.Array, geometry: Geometry) -> jax.Array:
    """oneDNN's forward convolution: x [N, H, W, Cin] * kernel [KH, KW, Cin / G, Cout] -> [N, Ho, Wo, Cout].

    Call only when `usable(geometry, x.dtype, kernel.dtype)`; differentiable to any order.
    """
    return _bind(x, kernel, FORWARD, geometry)


# ------------------------------------------------------------------------------------------- batch normalisation

@dataclasses.dataclass(frozen=True)
class NormGeometry:
    """A training-mode BatchNorm's shape: x ``[..., C]`` normalised over all axes but the last (hashable)."""

    x_shape: tuple[int, ...]
    relu: bool         # the ReLU after it fused
    epsilon: float
    threads: int = 0   # as `Geometry.threads`
    bf16: bool = False  # bfloat16 activations (x, y, dy, dx); statistics and parameters stay float32

    @property
    def dtype(self) -> np.dtype:
        """The activations' dtype: float32, or bfloat16 with `bf16`."""
        return np.dtype(jnp.bfloat16) if self.bf16 else np.dtype(np.float32)


def norm_usable(x_shape: tuple[int, ...], dtypes: tuple, *, relu: bool, epsilon: float,
                bfloat16_output: bool = False) -> NormGeometry | None:
    """The geometry to run a training-mode BatchNorm through the native kernel with, or None to keep XLA's: on the
    CPU backend with the native library built, ``[..., C]`` with rank >= 2 and no empty axis, and dtypes = (x,
    scale, bias) all
    float32, or a bfloat16 x with float32 scale and bias when the caller wants y in bfloat16 (`bfloat16_output`;
    the kernel computes in float32 and needs no bfloat16 instructions)."""
    x_dtype, *param_dtypes = (np.dtype(d) for d in dtypes)
    bf16 = x_dtype == jnp.bfloat16 and bfloat16_output
    if (not enabled() or jax.default_backend() != "cpu" or any(d != np.float32 for d in param_dtypes)
            or not (x_dtype == np.float32 or bf16)):
        return None
    if len(x_shape) < 2 or any(d <= 0 for d in x_shape) or _library() is None:
        return None
    return NormGeometry(tuple(int(d) for d in x_shape), bool(relu), float(epsilon), threads_per_device(), bf16)


def _norm_attrs(geometry: NormGeometry) -> dict:
    return dict(epsilon=np.float32(geometry.epsilon), relu=np.int64(geometry.relu),
                threads=np.int64(geometry.threads))


def norm_forward(x: jax.Array, scale: jax.Array, bias: jax.Array, geometry: NormGeometry,
                 residual: jax.Array | None = None):
    """The native training-mode BatchNorm (batch_norm.cc; the ReLU when ``geometry.relu``): x ``[..., C]``, scale,
    bias ``[C]`` -> ``(y [..., C], mean [C], var [C] (biased))``: y in ``geometry.dtype``, the statistics float32.
    With `residual` (x's shape and dtype) it is added to the normalised value before the ReLU.

    Not differentiable by itself: `jaxcnn.backends.cpu.norm` wraps it (and `norm_backward`) in derivative rules.
    """
    c = geometry.x_shape[-1]
    stat = jax.ShapeDtypeStruct((c,), np.float32)
    out = (jax.ShapeDtypeStruct(geometry.x_shape, geometry.dtype), stat, stat)
    if residual is None:
        return jax.ffi.ffi_call(_NORM_TARGETS["forward"][0], out, vmap_method="sequential")(
            x, scale, bias, **_norm_attrs(geometry))
    return jax.ffi.ffi_call(_NORM_TARGETS["forward_add"][0], out, vmap_method="sequential")(
        x, scale, bias, residual, **_norm_attrs(geometry))


def norm_backward(x: jax.Array, dy: jax.Array, mean: jax.Array, var: jax.Array, scale: jax.Array,
                  bias: jax.Array, geometry: NormGeometry, residual: jax.Array | None = None):
    """The gradient of `norm_forward`'s y (the ReLU's mask recomputed from x, and the residual when given):
    ``(dx [..., C], dscale [C], dbias [C])``, then ``dresidual`` with a residual, for the cotangent dy ``[..., C]``,
    with the forward's batch mean and variance (x, dy, dx and the residual in ``geometry.dtype``)."""
    c = geometry.x_shape[-1]
    stat = jax.ShapeDtypeStruct((c,), np.float32)
    activation = jax.ShapeDtypeStruct(geometry.x_shape, geometry.dtype)
    if residual is None:
        return jax.ffi.ffi_call(_NORM_TARGETS["backward"][0], (activation, stat, stat), vmap_method="sequential")(
            x, dy, mean, var, scale, bias, **_norm_attrs(geometry))
    return jax.ffi.ffi_call(_NORM_TARGETS["backward_add"][0], (activation, stat, stat, activation),
                            vmap_method="sequential")(x, dy, mean, var, scale, bias, residual, **_norm_attrs(geometry))


def norm_pool_forward(x: jax.Array, scale: jax.Array, bias: jax.Array, geometry: NormGeometry,
                      window: tuple[int, int]):
    """`norm_forward` (float32, no residual) followed by `max_pool_forward`'s pool over non-overlapping ``kh x kw``
    windows, in one call that never writes the full-size output: x ``[N, H, W, C]`` -> ``(y [N, H // kh, W // kw, C],
    choice int8 (the same shape, as `max_pool_forward`'s), mean [C], var [C])``. Not differentiable by itself
    (`jaxcnn.backends.cpu.norm` wraps it)."""
    n, h, w, c = geometry.x_shape
    pooled = (n, h // window[0], w // window[1], c)
    stat = jax.ShapeDtypeStruct((c,), np.float32)
    out = (jax.ShapeDtypeStruct(pooled, np.float32), jax.ShapeDtypeStruct(pooled, np.int8), stat, stat)
    return jax.ffi.ffi_call(_NORM_TARGETS["pool_forward"][0], out, vmap_method="sequential")(
        x, scale, bias, kh=np.int64(window[0]), kw=np.int64(window[1]), **_norm_attrs(geometry))


def norm_pool_backward(x: jax.Array, g: jax.Array, choice: jax.Array, mean: jax.Array, var: jax.Array,
                       scale: jax.Array, bias: jax.Array, geometry: NormGeometry, window: tuple[int, int]):
    """The gradient of `norm_pool_forward`'s y for the cotangent g ``[N, H // kh, W // kw, C]``: ``(dx [N, H, W, C],
    dscale [C], dbias [C])``, `norm_backward` of the cotangent `max_pool_backward` would scatter from g."""
    c = geometry.x_shape[-1]
    stat = jax.ShapeDtypeStruct((c,), np.float32)
    out = (jax.ShapeDtypeStruct(geometry.x_shape, np.float32), stat, stat)
    return jax.ffi.ffi_call(_NORM_TARGETS["pool_backward"][0], out, vmap_method="sequential")(
        x, g, choice, mean, var, scale, bias, kh=np.int64(window[0]), kw=np.int64(window[1]),
        **_norm_attrs(geometry))


# -------------------------------------------------------------------------------------------- matrix products

matmul_p = Primitive("jaxcnn_onednn_matmul")


def _xla_matmul(a, b, *, transpose_a: bool, transpose_b: bool):
    """op(a) @ op(b) with XLA's dot (op = transpose when the flag is set)."""
    return lax.dot_general(a, b, (((0 if transpose_a else 1,), (1 if transpose_b else 0,)), ((), ())),
                           precision=lax.Precision.HIGHEST)


def _matmul_abstract_eval(a, b, *, transpose_a: bool, transpose_b: bool):
    m = a.shape[1] if transpose_a else a.shape[0]
    n = b.shape[0] if transpose_b else b.shape[1]
    return jax.core.ShapedArray((m, n), a.dtype)


def _bind_matmul(a, b, transpose_a: bool, transpose_b: bool):
    return matmul_p.bind(a, b, transpose_a=bool(transpose_a), transpose_b=bool(transpose_b))


def _matmul_a_transpose(ct, a, b, *, transpose_a: bool, transpose_b: bool):
    """c = op(a) op(b): d op(a) = ct op(b)^T, so da = ct op(b)^T, or (a transposed) its transpose op(b) ct^T."""
    if not transpose_a:
        return _bind_matmul(ct, b, False, not transpose_b)
    return _bind_matmul(b, ct, transpose_b, True)


def _matmul_b_transpose(ct, a, b, *, transpose_a: bool, transpose_b: bool):
    """d op(b) = op(a)^T ct, so db = op(a)^T ct, or (b transposed) its transpose ct^T op(a)."""
    if not transpose_b:
        return _bind_matmul(a, ct, not transpose_a, False)
    return _bind_matmul(ct, a, True, transpose_a)


def _matmul_cpu_lowering(ctx, a, b, *, transpose_a: bool, transpose_b: bool):
    if _library() is None:  # registers the FFI targets on first use
        raise RuntimeError(f"jaxcnn_onednn_matmul needs the oneDNN library, which is unavailable: {_INSTALL_HINT}")
    return jax.ffi.ffi_lowering(_MATMUL_TARGET[0])(ctx, a, b, transpose_a=np.int64(transpose_a),
                                                    transpose_b=np.int64(transpose_b))


_define_bilinear(matmul_p, abstract_eval=_matmul_abstract_eval, lhs_transpose=_matmul_a_transpose,
                 rhs_transpose=_matmul_b_transpose, xla_impl=_xla_matmul, cpu_lowering=_matmul_cpu_lowering)


def matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    """a ``[M, K]`` @ b ``[K, N]``, float32: oneDNN's sgemm on the CPU (row blocks on XLA's thread pool), XLA's
    dot elsewhere. Its gradients are the same primitive with transposed operands: differentiable to any order."""
    return _bind_matmul(a, b, False, False)


# ---------------------------------------------------------------------------------------------------- max pooling

POOL_SIMD: contextvars.ContextVar[bool] = contextvars.ContextVar("jaxcnn_pool_simd", default=True)
"""False: the pool kernels traced run their portable loops instead of AVX-512 (the same bits; for tests)."""


def pool_usable(x_shape: tuple[int, ...], dtype, window: tuple[int, int]) -> bool:
    """True when `max_pool_forward` / `max_pool_backward` should run: float32 ``[..., H, W, C]`` on the CPU
    backend, a window of at most 127 elements (the choice is int8), no empty axis, and the library built."""
    kh, kw = window
    if jax.default_backend() != "cpu" or np.dtype(dtype) != np.float32:
        return False
    if len(x_shape) < 3 or not 1 <= kh * kw <= 127 or any(int(d) <= 0 for d in x_shape):
        return False
    return available()


def _pool_attrs(window: tuple[int, int]) -> dict:
    if _library() is None:  # builds and registers the targets on first use
        raise RuntimeError(f"jaxcnn's native max pool is unavailable; to fix: {_INSTALL_HINT}")
    return dict(kh=np.int64(window[0]), kw=np.int64(window[1]), simd=np.int64(POOL_SIMD.get()))


def max_pool_forward(x: jax.Array, window: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
    """Max over each non-overlapping ``kh x kw`` window of x ``[..., H, W, C]`` float32, with the element XLA's
    select-and-scatter would pick: ``(y [..., H // kh, W // kw, C], choice int8 (row-major index in the window))``.

    Not differentiable by itself: `jaxcnn.backends.cpu.pool` wraps it (and `max_pool_backward`) in derivative rules.
    """
    *lead, h, w, c = x.shape
    out_shape = (*lead, h // window[0], w // window[1], c)
    out = (jax.ShapeDtypeStruct(out_shape, np.float32), jax.ShapeDtypeStruct(out_shape, np.int8))
    call = jax.ffi.ffi_call(_POOL_TARGETS["forward"][0], out, vmap_method="broadcast_all")
    return call(x, **_pool_attrs(window))


def max_pool_backward(g: jax.Array, choice: jax.Array, x_shape: tuple[int, ...],
                      window: tuple[int, int]) -> jax.Array:
    """dx ``x_shape`` float32: each window's g ``[..., Ho, Wo, C]`` at the element `choice` names, 0 elsewhere
    (and on the rows and columns past the last whole window)."""
    out = jax.ShapeDtypeStruct(tuple(x_shape), np.float32)
    call = jax.ffi.ffi_call(_POOL_TARGETS["backward"][0], out, vmap_method="broadcast_all")
    return call(g, choice, **_pool_attrs(window))


# ------------------------------------------------------------------------------------------------- the SGD update

SGD_SIMD: contextvars.ContextVar[int] = contextvars.ContextVar("jaxcnn_sgd_simd", default=2)
"""The widest vector loop the SGD updates traced may run: 2 AVX-512, 1 AVX2 + FMA, 0 the portable loop (each the
same bits; below 2 for tests). The CPU's own support caps it."""


def sgd_update_usable(leaves: list) -> bool:
    """True when `sgd_update` should run for these arrays: float32, the CPU backend, and the library built."""
    if jax.default_backend() != "cpu" or not leaves:
        return False
    return all(np.dtype(x.dtype) == np.float32 for x in leaves) and available()


def sgd_update(step: jax.Array, params: list[jax.Array], momenta: list[jax.Array], grads: list[jax.Array], *,
               momentum: float, nesterov: bool, decays: list[float]) -> tuple[list[jax.Array], list[jax.Array]]:
    """(params', momenta') of SGD with momentum and L2 weight decay, one pass over all leaves (csrc/sgd_update.cc).

    step: float32 scalar, the signed step size (-learning rate); params, momenta, grads: float32 arrays, leaf i of
    each of one shape; decays: each leaf's weight decay (0 for none). Per element, in float32, in the order of
    optax's ``chain(add_decayed_weights, sgd(momentum, nesterov))`` and with each multiply-add fused (rounded
    once), as XLA's CPU backend compiles that chain: ``d = fma(p, decay, g)`` (g where decay is 0),
    ``m' = fma(m, momentum, d)``, ``u = fma(m', momentum, d)`` if nesterov else ``m'``, ``p' = fma(u, step, p)``.
    Differentiable (forward and reverse mode): its JVP is that formula's linearisation, in jax.numpy.
    """
    if not (len(params) == len(momenta) == len(grads) == len(decays)):
        raise ValueError(f"sgd_update: {len(params)} params, {len(momenta)} momenta, {len(grads)} gradients and "
                         f"{len(decays)} decays: give one of each per leaf")
    for i, (p, m, g) in enumerate(zip(params, momenta, grads)):
        if not p.shape == m.shape == g.shape:
            raise ValueError(f"sgd_update: leaf {i}: parameter {p.shape}, momentum {m.shape} and gradient {g.shape} "
                             "must have one shape")
        if not all(np.dtype(x.dtype) == np.float32 for x in (p, m, g)):
            raise ValueError(f"sgd_update: leaf {i}: parameter {p.dtype}, momentum {m.dtype} and gradient {g.dtype}: "
                             "the native update is float32 only (use optax's update for other dtypes)")
    if _library() is None:  # builds and registers the targets on first use
        raise RuntimeError(f"jaxcnn's native SGD update is unavailable; to fix: {_INSTALL_HINT}")
    new_p, new_m = _sgd_update(float(momentum), bool(nesterov), tuple(float(d) for d in decays), SGD_SIMD.get(),
                               jnp.asarray(step, np.float32).reshape(()), tuple(params), tuple(momenta),
                               tuple(grads))
    return list(new_p), list(new_m)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2, 3))
def _sgd_update(momentum: float, nesterov: bool, decays: tuple[float, ...], simd: int, step: jax.Array,
                params: tuple, momenta: tuple, grads: tuple) -> tuple[tuple, tuple]:
    out = []
    for p in params:
        out += [jax.ShapeDtypeStruct(p.shape, np.float32)] * 2
    operands = [x for leaf in zip(params, momenta, grads) for x in leaf]
    # p' and m' are written into p's and m's buffers (operands 1 + 3i and 2 + 3i, after the step): the kernel
    # reads each element before writing it, and XLA then updates a training loop's state in place.
    aliases = {1 + 3 * i + j: 2 * i + j for i in range(len(params)) for j in (0, 1)}
    call = jax.ffi.ffi_call(_SGD_TARGET[0], out, vmap_method="sequential", input_output_aliases=aliases)
    results = call(step, *operands, momentum=np.float32(momentum), nesterov=np.int64(nesterov),
                   decay=np.asarray(decays, np.float32), simd=np.int64(simd))
    return tuple(results[0::2]), tuple(results[1::2])


@_sgd_update.defjvp
def _sgd_update_jvp(momentum: float, nesterov: bool, decays: tuple[float, ...], simd: int, primals: tuple,
                    tangents: tuple) -> tuple:
    step, params, momenta, grads = primals
    dstep, dparams, dmomenta, dgrads = tangents
    new_p, new_m = _sgd_update(momentum, nesterov, decays, simd, step, params, momenta, grads)
    dp_out, dm_out = [], []
    for p, m, g, dp, dm, dg, decay in zip(params, momenta, grads, dparams, dmomenta, dgrads, decays):
        d, dd = (g + decay * p, dg + decay * dp) if decay else (g, dg)
        m2, dm2 = d + momentum * m, dd + momentum * dm
        u, du = (d + momentum * m2, dd + momentum * dm2) if nesterov else (m2, dm2)
        dp_out.append(dp + dstep * u + step * du)
        dm_out.append(dm2)
    return (new_p, new_m), (tuple(dp_out), tuple(dm_out))


# --------------------------------------------------------------------------------------- the sum of two activations

def bfloat16_rounding_instruction() -> bool:
    """Whether the native bfloat16 loops round with AVX512-BF16's ``vcvtneps2bf16`` (the CPU has it and
    ``JAXCNN_AVX512_BF16`` is not 0 / false / no / off when the library loads); False without the library."""
    lib = _library() if enabled() else None
    return bool(lib is not None and lib.JaxcnnAvx512Bf16Rounding())


def add_lowering(ctx, a, b, *, threads: int):
    """The CPU lowering of ``a + b`` (one shape, both float32 or both bfloat16) as the native kernel (csrc/add.cc):
    the bits XLA's add gives (bfloat16: summed in float32, rounded once to nearest even). `threads` as
    `threads_per_device()` (0: XLA's pool). `jaxcnn.backends.cpu.fan_out.add_p` lowers with it."""
    if _library() is None:  # builds and registers the targets on first use
        raise RuntimeError(f"jaxcnn_add needs the native kernel library, which is unavailable: {_INSTALL_HINT}")
    return jax.ffi.ffi_lowering(_ADD_TARGET[0])(ctx, a, b, threads=np.int64(threads))


__all__ = ["add_lowering", "available", "bfloat16_rounding_instruction", "concurrent_devices", "conv2d", "conv_p",
           "enabled", "Geometry", "implementations", "jitted_bind", "matmul", "matmul_p", "max_pool_backward",
           "max_pool_forward", "norm_backward", "norm_forward", "norm_usable", "NormGeometry", "POOL_SIMD",
           "pool_usable", "SGD_SIMD", "sgd_update", "sgd_update_usable", "threads_per_device", "usable",
           "xla_convolutions"]
