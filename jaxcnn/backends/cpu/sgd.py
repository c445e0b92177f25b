"""SGD with momentum and L2 weight decay whose update runs as one native pass on the CPU; the same mathematics.

    tx = fused_sgd(schedule, momentum=0.9, nesterov=True, weight_decay=5e-4, mask=decay_mask_fn)
    params, opt_state = apply_gradients(tx, grads, opt_state, params)    # what the train step calls

`fused_sgd` is optax's ``chain(add_decayed_weights(weight_decay, mask), sgd(lr, momentum, nesterov))``: its `init`
and `update` are that chain's, so its state, its checkpoints and anything that calls ``tx.update`` are unchanged. It
adds `apply`, the update and ``optax.apply_updates`` in one: on the CPU, with float32 parameters and the native
library built, one pass over every parameter, momentum and gradient (`jaxcnn.backends.cpu.kernels.sgd_update`,
csrc/sgd_update.cc), which gives the bits XLA gives for optax's formula (float32, each multiply-add fused as XLA's
CPU backend compiles it; tests/backends/test_sgd.py checks against optax under `jax.jit` and a NumPy reference).
Elsewhere `apply` is optax's update followed by `apply_updates`.

Why: XLA's CPU backend ran this update as three loop fusions per weight (the decayed gradient, the momentum, the
parameter: ten array passes where five do) plus the scheduling between them; for the MLP of
benchmarks/vs_pytorch.py that was about 100 us of a 1 ms step on 2 cores (benchmarks/README.md).

`apply_gradients(tx, ...)` works for every optax transformation: it calls ``tx.apply`` when `tx` has one (a
`FusedSGD`), else ``tx.update`` and ``optax.apply_updates``. Wrapping a `FusedSGD` in another optax
transformation (gradient clipping, `multi_transform` for frozen parameters) gives a plain optax transformation,
which takes optax's path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from jaxcnn.backends.cpu import kernels


class FusedSGD(NamedTuple):
    """An optax transformation (`init`, `update`: optax's SGD chain) with `apply(grads, state, params) ->
    (params, state)`, the update and `optax.apply_updates` in one native pass where it can."""

    init: Callable[[Any], Any]
    update: Callable[..., tuple[Any, Any]]
    apply: Callable[[Any, Any, Any], tuple[Any, Any]]


def fused_sgd(learning_rate: float | Callable[[Any], Any], *, momentum: float, nesterov: bool = False,
              weight_decay: float = 0.0, mask: Any = None) -> FusedSGD:
    """optax's ``chain(add_decayed_weights(weight_decay, mask), sgd(learning_rate, momentum, nesterov))`` (without
    the decay when weight_decay is 0), with an `apply` that runs it as one pass on the CPU.

    learning_rate: a float or a schedule (update count -> rate). momentum in (0, 1). mask: None (decay every
    leaf), a pytree of bools like the params or a prefix of it (one bool for a subtree), or a function params ->
    such a pytree (as optax's `mask`). `apply` is differentiable, as optax's update is.
    """
    if not 0.0 < momentum < 1.0:
        raise ValueError(f"fused_sgd: momentum={momentum} must be in (0, 1) (momentum 0 is plain optax.sgd)")
    if weight_decay < 0:
        raise ValueError(f"fused_sgd: weight_decay={weight_decay} must be >= 0")
    sgd = optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov)
    chain = optax.chain(optax.add_decayed_weights(weight_decay, mask), sgd) if weight_decay else sgd

    def optax_apply(grads: Any, state: Any, params: Any) -> tuple[Any, Any]:
        return _optax_apply(chain, grads, state, params)

    def apply(grads: Any, state: Any, params: Any) -> tuple[Any, Any]:
        sgd_state = state[1] if weight_decay else state
        trace, schedule = sgd_state
        if not isinstance(trace, optax.TraceState):
            return optax_apply(grads, state, params)
        p_leaves, treedef = jax.tree_util.tree_flatten(params)
        g_leaves, m_leaves = treedef.flatten_up_to(grads), treedef.flatten_up_to(trace.trace)
        if not kernels.sgd_update_usable(p_leaves + g_leaves + m_leaves):
            return optax_apply(grads, state, params)
        decays = [float(weight_decay)] * len(p_leaves)
        if weight_decay and mask is not None:
            chosen = _leaf_mask(mask(params) if callable(mask) else mask, params, treedef)
            if chosen is None:  # a mask of traced values: optax's masked update handles it
                return optax_apply(grads, state, params)
            decays = [float(weight_decay) if on else 0.0 for on in chosen]

        def native(grads: Any, state: Any, params: Any) -> tuple[Any, Any]:
            trace, schedule = state[1] if weight_decay else state
            if callable(learning_rate):  # optax's scale_by_learning_rate: -1 * lr(count), as float32
                step = jnp.asarray(-1 * learning_rate(schedule.count), jnp.float32)
                schedule = optax.ScaleByScheduleState(count=optax.safe_increment(schedule.count))
            else:
                step = jnp.asarray(-1 * learning_rate, jnp.float32)
            new_p, new_m = kernels.sgd_update(step, treedef.flatten_up_to(params), treedef.flatten_up_to(trace.trace),
                                              treedef.flatten_up_to(grads), momentum=momentum, nesterov=nesterov,
                                              decays=decays)
            sgd_state = (optax.TraceState(trace=treedef.unflatten(new_m)), schedule)
            return treedef.unflatten(new_p), ((state[0], sgd_state) if weight_decay else sgd_state)

        # The native pass on the CPU; a program lowered for another platform gets optax's update.
        return lax.platform_dependent(grads, state, params, cpu=native, default=optax_apply)

    return FusedSGD(chain.init, chain.update, apply)


def _leaf_mask(mask: Any, params: Any, treedef: Any) -> list[bool] | None:
    """One bool per leaf of `params` from an optax-style mask: a pytree like `params` or a prefix of it (a bool
    for a whole subtree), as `optax.masked` takes it. None when a mask value is not known at trace time."""
    try:
        full = jax.tree_util.tree_map(lambda on, sub: jax.tree_util.tree_map(lambda _: on, sub), mask, params)
    except ValueError as err:
        raise ValueError(f"fused_sgd: the weight-decay mask must be a pytree like the parameters or a prefix of "
                         f"them, with a bool per leaf or per subtree: {err}") from None
    try:
        return [bool(on) for on in treedef.flatten_up_to(full)]
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerBoolConversionError):
        return None


def apply_gradients(tx: optax.GradientTransformation | FusedSGD, grads: Any, opt_state: Any,
                    params: Any) -> tuple[Any, Any]:
    """(new params, new opt_state) of one optimizer step: ``tx.apply`` for a `FusedSGD`, else ``tx.update`` and
    ``optax.apply_updates``."""
    if isinstance(tx, FusedSGD):
        return tx.apply(grads, opt_state, params)
    return _optax_apply(tx, grads, opt_state, params)


def _optax_apply(tx: Any, grads: Any, opt_state: Any, params: Any) -> tuple[Any, Any]:
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


__all__ = ["FusedSGD", "apply_gradients", "fused_sgd"]
