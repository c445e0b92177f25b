"""Dense layers' matrix products on the CPU through oneDNN's sgemm; the same mathematics.

`jaxcnn.nn.Dense` (flax's ``nn.Dense`` with `jaxcnn.backends.dot_general`, which is this module's) is what every
jaxcnn model's dense layers are. Inside a training step on 2 cores XLA ran the small products of a dense layer (the
MLP's 128x300 @ 300x100 and its gradients: 70-104 us each) at 40-100 GFLOP/s; oneDNN's sgemm, called on one OpenMP
thread per block of rows with the blocks on XLA's own thread pool (csrc/onednn_matmul.cc), runs them at 200-270
GFLOP/s and adds no OpenMP team (letting oneDNN start one from XLA's threads made the MLP's step slower, not
faster). The MLP's loop went from 110.6k to 134.2k images/s, LeNet-5's from 35.9k to 38.6k (in-process A/B); VGG-11
unchanged. The products and their gradients are `kernels.matmul_p`, a bilinear primitive whose transposes are
itself, so every derivative order, forward mode and vmap work; off the CPU it lowers to XLA's dot.

Shapes: lhs ``[..., K]`` (the leading axes are flattened into the rows), rhs ``[K, N]`` -> ``[..., N]``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxcnn.backends.cpu import kernels


def _native(lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any, preferred_element_type: Any) -> bool:
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    if lhs_batch or rhs_batch or rhs.ndim != 2 or lhs.ndim < 1:
        return False
    if tuple(lhs_contract) != (lhs.ndim - 1,) or tuple(rhs_contract) != (0,):
        return False
    if lhs.dtype != rhs.dtype or lhs.dtype not in (jnp.float32, jnp.bfloat16):
        return False
    if preferred_element_type is not None and jnp.dtype(preferred_element_type) != lhs.dtype:
        return False
    if 0 in (int(np.prod(lhs.shape[:-1])), lhs.shape[-1], rhs.shape[1]):
        return False
    return jax.default_backend() == "cpu" and kernels.available()


def dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any, precision: Any = None,
                preferred_element_type: Any = None, **kwargs: Any) -> jax.Array:
    """`lax.dot_general` with the same signature; a dense layer's product (lhs ``[..., K]`` x rhs ``[K, N]``) of
    float32 operands on the CPU runs in oneDNN.

    bfloat16 operands are widened to float32 (exactly), multiplied by oneDNN's sgemm and the product rounded to
    bfloat16: what a bfloat16 product with float32 accumulation gives, where XLA's CPU bfloat16 dot ran 18x slower
    than its float32 one (128x784 @ 784x300: 18.8 ms against 1.05 ms, 2026-12-06).
    """
    if not kwargs and _native(lhs, rhs, dimension_numbers, preferred_element_type):
        dtype = lhs.dtype
        out = kernels.matmul(lhs.reshape(-1, lhs.shape[-1]).astype(jnp.float32), rhs.astype(jnp.float32))
        return out.reshape(*lhs.shape[:-1], rhs.shape[1]).astype(dtype)
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type, **kwargs)


__all__ = ["dot_general"]
