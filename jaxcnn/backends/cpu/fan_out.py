"""`fan_out(x)`: x for two paths, with the two paths' gradients summed in jaxcnn's native add on the CPU.

An activation that two paths read (a residual block's input: its branch and its shortcut) gets, in reverse-mode
differentiation, the sum of the paths' gradients. JAX adds them with XLA's add, which XLA's CPU backend runs 8
values at a time through the stack, for bfloat16 also rounding with integer operations: 0.62 ms for a
128x32x32x16 sum, against 0.32 ms in `kernels.add` (float32: 0.67 against 0.55 ms; 2026-12-07, jax 0.10.2, the
2-core Xeon of benchmarks/README.md). `fan_out` returns x twice; its derivative rule adds the two cotangents with
`kernels.add` on the CPU (XLA's add elsewhere, `lax.platform_dependent`): the bits of XLA's add (NaN payloads
aside). Its second derivative is JAX's (the native sum's JVP is the sum of the tangents). Only two paths: XLA fuses
the sum of three or more gradients into one pass, which pairwise calls would not beat.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxcnn.backends.cpu import kernels

MIN_VALUES = 1 << 14  # smaller sums stay XLA's: the call costs more than it saves


def usable(x: jax.Array) -> bool:
    """Whether the gradients of x's copies are summed natively: float32 or bfloat16 with at least `MIN_VALUES`
    values, on the CPU backend with the native library built and enabled."""
    return (np.dtype(x.dtype) in (np.float32, jnp.bfloat16) and x.size >= MIN_VALUES
            and jax.default_backend() == "cpu" and kernels.available())


@jax.custom_jvp
def _native_add(a: jax.Array, b: jax.Array) -> jax.Array:
    return kernels.add(a, b)


@_native_add.defjvp
def _native_add_jvp(primals, tangents):
    return _native_add(*primals), tangents[0] + tangents[1]


def _add(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a + b``: the native kernel on the CPU, XLA's add on other platforms."""
    return lax.platform_dependent(a, b, cpu=_native_add, default=lambda a, b: a + b)


@jax.custom_vjp
def _fan_out(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return x, x


def _fan_out_fwd(x):
    return (x, x), None


def _fan_out_bwd(_, cotangents):
    return (_add(*cotangents),)


_fan_out.defvjp(_fan_out_fwd, _fan_out_bwd)


def fan_out(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(x, x)`` for two paths; the gradient of x is the sum of theirs, added natively where `usable`."""
    return _fan_out(x) if usable(x) else (x, x)


__all__ = ["MIN_VALUES", "fan_out", "usable"]
