"""`materialized(x, witness)`: make XLA keep x in memory instead of recomputing it inside its consumers."""

from __future__ import annotations

import jax
from jax import lax


def materialized(x: jax.Array, witness: jax.Array) -> jax.Array:
    """x itself, returned through a conditional whose predicate XLA cannot evaluate at compile time.

    A conditional is a boundary XLA's fusion passes do not cross (unlike `lax.optimization_barrier`, which the CPU
    pipeline removes before fusion), so the consumers of the result read the materialised x instead of
    recomputing x's elementwise producers. `witness` is any scalar computed at run time (the predicate
    ``w == w or w != w`` is always true, also for NaN); both branches return x unchanged.
    """
    always = (witness == witness) | (witness != witness)
    return lax.cond(always, lambda v: v, lambda v: v.copy(), x)


__all__ = ["materialized"]
