"""`fan_out(x)`: x for two paths, with the two paths' gradients summed in jaxcnn's native add on the CPU.

An activation that two paths read (a residual block's input: its branch and its shortcut) gets, in reverse-mode
differentiation, the sum of the paths' gradients. JAX adds them with XLA's add, which XLA's CPU backend runs 8
values at a time through the stack, for bfloat16 also rounding with integer operations: 0.62 ms for a
128x32x32x16 sum, against 0.32 ms in jaxcnn's (`add`) (float32: 0.67 against 0.55 ms; 2026-12-07, jax 0.10.2, the
2-core Xeon of benchmarks/README.md).

Two linear primitives, each the other's transpose: `fan_out_p` (x -> (x, x)) and `add_p` (a, b -> a + b, the
native kernel on the CPU, XLA's add on other platforms). Reverse mode through `fan_out` therefore sums the two
cotangents with `add_p`: the bits of XLA's add (NaN payloads aside). Forward mode, vmap and derivatives of any
order follow from the two rules. Only two paths: XLA fuses the sum of three or more gradients into one pass, which
pairwise calls would not beat.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from jaxcnn.backends.cpu import kernels

MIN_VALUES = 1 << 14  # smaller sums stay XLA's: the call costs more than it saves

fan_out_p = Primitive("jaxcnn_fan_out")
fan_out_p.multiple_results = True
add_p = Primitive("jaxcnn_add")


def usable(x: jax.Array) -> bool:
    """Whether the gradients of x's copies are summed natively: float32 or bfloat16 with at least `MIN_VALUES`
    values, on the CPU backend with the native library built and enabled."""
    return (np.dtype(x.dtype) in (np.float32, jnp.bfloat16) and x.size >= MIN_VALUES
            and jax.default_backend() == "cpu" and kernels.available())


# ---------------------------------------------------------------------------------------- fan_out_p: x -> (x, x)

fan_out_p.def_impl(lambda x: (x, x))
fan_out_p.def_abstract_eval(lambda x: (x, x))
mlir.register_lowering(fan_out_p, lambda ctx, x: [x, x])


def _fan_out_transpose(cotangents, x):
    """The sum of the two paths' cotangents (either may be a symbolic zero)."""
    a, b = cotangents
    if type(a) is ad.Zero and type(b) is ad.Zero:
        return [ad.Zero(x.aval)]
    if type(a) is ad.Zero:
        return [b]
    if type(b) is ad.Zero:
        return [a]
    return [add(a, b)]


ad.deflinear2(fan_out_p, _fan_out_transpose)
batching.primitive_batchers[fan_out_p] = lambda args, dims: (fan_out_p.bind(*args), [dims[0], dims[0]])


# ------------------------------------------------------------------------------------------ add_p: a, b -> a + b

def _add_transpose(ct, a, b, *, threads: int):
    """Both operands get the cotangent of the sum."""
    return [ct if ad.is_undefined_primal(a) else None, ct if ad.is_undefined_primal(b) else None]


def _add_batch(args, dims, *, threads: int):
    """Elementwise: both operands with the batch axis first (broadcast where one has none), then the same sum."""
    size = next(x.shape[d] for x, d in zip(args, dims) if d is not None)
    a, b = (jnp.broadcast_to(x, (size, *x.shape)) if d is None else jnp.moveaxis(x, d, 0)
            for x, d in zip(args, dims))
    return add_p.bind(a, b, threads=threads), 0


add_p.def_impl(lambda a, b, *, threads: kernels.jitted_bind(add_p, (("threads", threads),))(a, b))
add_p.def_abstract_eval(lambda a, b, *, threads: a)
ad.deflinear2(add_p, _add_transpose)
batching.primitive_batchers[add_p] = _add_batch
mlir.register_lowering(add_p, mlir.lower_fun(lambda a, b, *, threads: lax.add(a, b), multiple_results=False))
mlir.register_lowering(add_p, kernels.add_lowering, platform="cpu")


def add(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a + b`` for two arrays of one shape, both float32 or both bfloat16: the native kernel on the CPU, XLA's add
    on other platforms (the same bits, NaN payloads aside)."""
    if a.shape != b.shape or a.dtype != b.dtype or np.dtype(a.dtype) not in (np.float32, jnp.bfloat16):
        raise ValueError(f"add: operands {a.dtype}{list(a.shape)} and {b.dtype}{list(b.shape)} must have one shape "
                         "and be both float32 or both bfloat16")
    return add_p.bind(a, b, threads=kernels.threads_per_device())


def fan_out(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(x, x)`` for two paths; the gradient of x is the sum of theirs, added natively where `usable`."""
    if not usable(x):
        return x, x
    a, b = fan_out_p.bind(x)
    return a, b


__all__ = ["MIN_VALUES", "add", "add_p", "fan_out", "fan_out_p", "usable"]
