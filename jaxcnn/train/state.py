"""The train state: everything a step reads and writes, as one pytree."""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct


class TrainState(struct.PyTreeNode):
    """Parameters, BatchNorm statistics, optimizer state and EMA, plus the step counter.

    `first_nonfinite` is (step, what) of the first step whose loss (what=0) or gradient leaf (what=k+1, k-th leaf of
    `params` in tree_flatten order) was not finite, or (-1, -1). From then on the step leaves the state unchanged, so
    non-finite values never reach the parameters or a checkpoint; the loop raises at its next check.
    Randomness is not stored: each step's key is `fold_in(PRNGKey(seed), step)`.
    """

    step: jax.Array  # int32 []
    params: Any
    batch_stats: Any  # {} for models without BatchNorm
    opt_state: Any
    ema_params: Any  # None when no EMA is kept
    first_nonfinite: jax.Array  # int32 [2]
    apply_fn: Callable = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)


# XLA options for compiling `model.init`, which runs once: on CPU, LLVM's optimisation passes took most of the
# start-up time of a short run (ResNet-20: 5.6 s to compile the init at the default level, 1.8 s at level 0).
_INIT_COMPILER_OPTIONS = {"cpu": {"xla_backend_optimization_level": 0}}


def init_variables(model: Any, input_shape: tuple[int, ...], seed: int) -> dict[str, Any]:
    """Initialises a model's variables for inputs of `input_shape` = (N, H, W, C) (N may be 1).

    `model.init` runs as one compiled program (eagerly, flax compiles every initializer and layer separately:
    seconds of start-up for a ResNet); on CPU with XLA's cheapest code generation, since it runs once.
    """
    key = jax.random.PRNGKey(seed)
    params_key, dropout_key = jax.random.split(key)
    rngs = {"params": params_key, "dropout": dropout_key}
    x = jnp.zeros(input_shape, jnp.float32)
    init = jax.jit(functools.partial(model.init, train=False))
    if isinstance(params_key, jax.core.Tracer):  # called under jit / eval_shape: the caller's trace compiles it
        return init(rngs, x)
    lowered = init.lower(rngs, x)
    options = _INIT_COMPILER_OPTIONS.get(jax.default_backend())
    try:
        compiled = lowered.compile(compiler_options=options) if options else lowered.compile()
    except Exception:  # noqa: BLE001 - an XLA build without the option: compile with the defaults
        compiled = lowered.compile()
    return compiled(rngs, x)


def create_train_state(
    model: Any,
    tx: optax.GradientTransformation,
    variables: dict[str, Any],
    *,
    ema: bool = False,
) -> TrainState:
    """Builds the initial TrainState from initialised `variables` ({'params': ..., 'batch_stats': ...}).

    The optimizer state and the counters are made by one compiled call: run eagerly, every differently shaped
    zero array of the optimizer's state compiled on its own (0.37 s of the fast recipe's start-up).
    """
    params = variables["params"]

    def fresh(params: Any) -> tuple[Any, ...]:
        ema_params = jax.tree_util.tree_map(jnp.array, params) if ema else None
        return jnp.zeros((), jnp.int32), tx.init(params), ema_params, jnp.full((2,), -1, jnp.int32)

    step, opt_state, ema_params, first_nonfinite = jax.jit(fresh)(params)
    return TrainState(
        step=step,
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=opt_state,
        ema_params=ema_params,
        first_nonfinite=first_nonfinite,
        apply_fn=model.apply,
        tx=tx,
    )


def param_count(params: Any) -> int:
    """Number of scalars in a parameter tree."""
    return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))


def leaf_names(tree: Any) -> list[str]:
    """'Conv_0/kernel'-style names of a tree's leaves, in tree_flatten order."""
    paths = jax.tree_util.tree_flatten_with_path(tree)[0]
    return ["/".join(_key_name(k) for k in path) for path, _ in paths]


def _key_name(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)
