"""The optimizer and learning-rate schedule, built from the config's `optim` and `schedule` sections.

    tx, schedule = make_optimizer(cfg.optim, cfg.schedule, steps_per_epoch=390, total_steps=390 * 30)
    lr_at(schedule, 1000)                      # the learning rate of the 1001st update, for logs

The optax chain, in order: (1) clip the gradient by its global norm (`optim.grad_clip_norm`), (2) the optimizer
with its weight decay, (3) with a `trainable_mask`, frozen parameters get a zero update (and no optimizer state).
The schedule is passed to the optimizer as its learning rate, so `schedule(count)` is the rate of update
`count` (0-based, the optimizer's own counter: one count per optimizer step, whatever `optim.accum_steps` is).

**Optimizers and their weight decay** (`optim.weight_decay` = wd; g the clipped gradient, p the parameters,
lr the scheduled rate; only leaves in the decay mask get wd):

| name  | update                                                                                       | decay form |
|-------|----------------------------------------------------------------------------------------------|------------|
| sgd   | g' = g + wd·p;  m = μ·m + g';  p -= lr·m  (nesterov: p -= lr·(g' + μ·m))                    | L2 |
| adam  | g' = g + wd·p;  Adam(b1, b2, eps) on g'                                                      | L2 |
| adamw | p -= lr·(Adam(g) + wd·p)                                                                     | decoupled |
| lamb  | u = Adam(g) + wd·p;  p -= lr·(‖p‖/‖u‖)·u  per leaf                                          | decoupled |
| lars  | g' = g + wd·p;  u = 0.001·(‖p‖/‖g'‖)·g' per leaf;  m = μ·m + lr·u;  p -= m                  | LARS |

- **sgd with momentum** is `jaxcnn.backends.sgd`: optax's ``chain(add_decayed_weights(wd, mask),
  sgd(lr, μ, nesterov))`` (the same state and checkpoints), whose update the train step runs as one native pass
  over all parameters on the CPU, with the bits optax gives under `jax.jit`; clipping or a `trainable_mask`
  wrap it in optax transformations and then take optax's update.
- **L2** (sgd, adam) adds wd·p to the gradient before momentum or the Adam moments: for SGD that is the
  classic form of PyTorch's `SGD(weight_decay=...)` and of He et al. (2016), identical to adding
  (wd/2)·‖p‖² to the loss. SGD's momentum is PyTorch's (no dampening; `m` starts at 0).
- **Decoupled** (adamw, lamb; Loshchilov & Hutter 2019) adds wd·p to the optimizer's direction, after the Adam
  moments, so the decay is not rescaled by the adaptive denominators; it is still multiplied by lr (as in
  PyTorch's AdamW and optax). For adaptive methods the two forms differ; use `adamw` for decoupled Adam.
- **LARS** (You et al. 2017, `optax.lars`) adds wd·p to the gradient, then scales each leaf by the trust
  ratio 0.001·‖p‖/‖g'‖ (a leaf with zero norm keeps ratio 1), then lr and momentum. The trust ratio is applied
  to the same leaves as the decay (with the 'kernels' mask: not to BatchNorm parameters and biases, as in
  SimCLR/You et al.); LARS wants large learning rates (lr ≈ 0.1·B/256 / 0.001 region is typical).
- `optim.weight_decay_mask='kernels'` decays only leaves named `kernel` (the conv and dense weights of every
  jaxcnn layer and of flax.linen): BatchNorm/GroupNorm/LayerNorm `scale` and `bias` and every layer's
  `bias` are left out. `'all'` decays every leaf.

**Schedules** (t the update count, T = total_steps, w = round(warmup_epochs·steps_per_epoch); after T the
value stays at its end value):

- `constant`: lr·min(1, t/w)  (w = 0: lr).
- `step`: lr·min(1, t/w)·decay_factor^k, k = how many boundaries round(e·steps_per_epoch), e in
  `decay_epochs`, are ≤ t.
- `cosine`: lr·t/w for t < w, then lr·(f + (1 − f)·½(1 + cos(π·(t − w)/(T − w)))), f = final_lr_fraction.
  The same as `optax.warmup_cosine_decay_schedule(0, lr, w, T, f·lr)`.
- `onecycle` (Smith & Topin 2019, PyTorch's OneCycleLR with cosine annealing): from i·lr up to lr at
  p = round(peak_fraction·T) along a half cosine, lr·(i + (1 − i)·½(1 − cos(π·t/p))), then down to f·lr:
  lr·(f + (1 − f)·½(1 + cos(π·(t − p)/(T − p)))). i = initial_lr_fraction (0.04 is PyTorch's div_factor 25).
- `triangular`: the same three points joined by straight lines: i·lr at 0, lr at p, f·lr at T.

`onecycle` and `triangular` have their own warm-up (the rise to the peak): `warmup_epochs` must be 0 for them.
Warm-up starts from 0 at t = 0, as optax and the Flax examples do (the first update has rate 0).

**What lives in the train step** (`jaxcnn.train.step`, options in `StepOptions`): label smoothing (in the loss),
the EMA of the parameters (`ema_params ← d·ema_params + (1 − d)·params` after each optimizer step), and
gradient accumulation (`accum_steps = k`).

**Gradient accumulation and BatchNorm.** With k micro-batches, the step runs k forward/backward passes on B/k
examples each and applies one optimizer update with the mean of the k gradients. For a model without
BatchNorm (and without dropout) that equals the gradient of the whole batch of B, to float rounding. With
BatchNorm it does not: each micro-batch is normalised with its own batch statistics (of B/k examples, as k
smaller steps would be), so the gradient is that of k separate smaller batches, and the running statistics
are updated k times per optimizer step, in order: mean ← m·mean + (1 − m)·mean_j for j = 1..k (flax
momentum m). The running averages thus move k times as fast per optimizer step as without accumulation. Under
pmap/shard_map each device splits its own part of the batch into k micro-batches, and the synced BatchNorm
statistics of micro-batch j are over the j-th slice of every device; under jit and on one device micro-batch j
is rows [j·B/k, (j+1)·B/k) of the global batch. Without BatchNorm the strategies agree; with it they group the
examples differently. tests/train/test_optim.py checks both cases against references.
"""

from __future__ import annotations

import functools

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxcnn.config import ConfigError, OptimConfig, ScheduleConfig
from jaxcnn import backends

Schedule = Callable[[Any], jax.Array]


# ---------------------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------------------


def _check_steps(schedule: ScheduleConfig, steps_per_epoch: int, total_steps: int) -> None:
    if steps_per_epoch < 1 or total_steps < 1:
        raise ConfigError(
            f"make_schedule: steps_per_epoch ({steps_per_epoch}) and total_steps ({total_steps}) must be >= 1"
        )
    if schedule.warmup_epochs < 0:
        raise ConfigError(f"schedule.warmup_epochs={schedule.warmup_epochs} must be >= 0")
    if schedule.name in ("onecycle", "triangular"):
        if schedule.warmup_epochs:
            raise ConfigError(
                f"schedule.name={schedule.name!r} rises to its peak by itself; set schedule.warmup_epochs=0 and "
                f"place the peak with schedule.peak_fraction (now {schedule.peak_fraction})"
            )
        if not 0.0 < schedule.peak_fraction < 1.0:
            raise ConfigError(
                f"schedule.peak_fraction={schedule.peak_fraction} must be strictly between 0 and 1 (where the "
                f"{schedule.name} schedule peaks, as a fraction of training)"
            )
    if not 0.0 <= schedule.final_lr_fraction <= 1.0 or not 0.0 <= schedule.initial_lr_fraction <= 1.0:
        raise ConfigError(
            f"schedule.initial_lr_fraction={schedule.initial_lr_fraction} and final_lr_fraction="
            f"{schedule.final_lr_fraction} must be between 0 and 1 (fractions of optim.lr)"
        )
    if schedule.decay_factor < 0:
        raise ConfigError(f"schedule.decay_factor={schedule.decay_factor} must be >= 0")
    if any(e < 0 for e in schedule.decay_epochs):
        raise ConfigError(f"schedule.decay_epochs={schedule.decay_epochs} must all be >= 0")


def make_schedule(lr: float, schedule: ScheduleConfig, *, steps_per_epoch: int, total_steps: int) -> Schedule:
    """The learning rate as a function of the update count t (int, or an int array) -> float32 array.

    The formulas are in this module's docstring. Raises ConfigError for inconsistent settings (warm-up longer
    than training, a warm-up with onecycle/triangular, fractions outside [0, 1]).
    """
    _check_steps(schedule, steps_per_epoch, total_steps)
    if lr < 0:
        raise ConfigError(f"optim.lr={lr} must be >= 0")
    T = int(total_steps)
    w = round(schedule.warmup_epochs * steps_per_epoch)
    if w > 0 and w >= T:
        raise ConfigError(
            f"schedule.warmup_epochs={schedule.warmup_epochs} is {w} steps, not shorter than the {T} steps of "
            f"training; lower schedule.warmup_epochs"
        )
    f = float(schedule.final_lr_fraction)
    i = float(schedule.initial_lr_fraction)

    def warm(t: jax.Array) -> jax.Array:
        return jnp.minimum(1.0, t / w) if w > 0 else jnp.ones_like(t)

    def cosine_from(t: jax.Array, start: int, end: int, lo: float, hi: float) -> jax.Array:
        """hi at `start` down to lo at `end` along a half cosine (clamped outside)."""
        frac = jnp.clip((t - start) / max(end - start, 1), 0.0, 1.0)
        return lo + (hi - lo) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))

    name = schedule.name
    if name == "constant":

        def fn(t: Any) -> jax.Array:
            t = jnp.asarray(t, jnp.float32)
            return lr * warm(t)

    elif name == "step":
        boundaries = jnp.asarray(sorted(round(e * steps_per_epoch) for e in schedule.decay_epochs), jnp.float32)
        factor = float(schedule.decay_factor)

        def fn(t: Any) -> jax.Array:
            t = jnp.asarray(t, jnp.float32)
            k = jnp.sum(t[..., None] >= boundaries, axis=-1).astype(jnp.float32)
            return lr * warm(t) * factor**k

    elif name == "cosine":

        def fn(t: Any) -> jax.Array:
            t = jnp.asarray(t, jnp.float32)
            return jnp.where(t < w, lr * warm(t), lr * cosine_from(t, w, T, f, 1.0))

    elif name == "onecycle":
        p = max(1, min(T - 1, round(schedule.peak_fraction * T))) if T > 1 else 1

        def fn(t: Any) -> jax.Array:
            t = jnp.asarray(t, jnp.float32)
            up = cosine_from(t, 0, p, 1.0, i)  # i at 0 rising to 1 at p
            return jnp.where(t < p, lr * up, lr * cosine_from(t, p, T, f, 1.0))

    elif name == "triangular":
        p = max(1, min(T - 1, round(schedule.peak_fraction * T))) if T > 1 else 1

        def fn(t: Any) -> jax.Array:
            t = jnp.asarray(t, jnp.float32)
            return lr * jnp.interp(t, jnp.array([0.0, p, max(T, p)]), jnp.array([i, 1.0, f]))

    else:
        raise ConfigError(
            f"schedule.name={name!r} is not known; choose one of: constant, step, cosine, onecycle, triangular"
        )
    return fn


@functools.lru_cache(maxsize=16)
def _compiled(schedule: Schedule) -> Schedule:
    return jax.jit(schedule)


def lr_at(schedule: Schedule, step: int | jax.Array) -> float:
    """The learning rate of update `step` (0-based) as a Python float, for logs.

    The schedule runs compiled, once per schedule: run eagerly, each of its operations compiles on its first call
    (0.35 s of a one-cycle schedule's first log line).
    """
    if not callable(schedule):
        return float(schedule)
    return float(_compiled(schedule)(step))


# ---------------------------------------------------------------------------------------------------------
# Weight-decay mask
# ---------------------------------------------------------------------------------------------------------


def _last_key(path: tuple[Any, ...]) -> str:
    if not path:
        return ""
    k = path[-1]
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def weight_decay_mask(params: Any, mode: str = "kernels") -> Any:
    """A pytree of bools like `params`: True where weight decay applies.

    mode 'kernels': only leaves named `kernel` (conv/dense weights); 'all': every leaf.
    """
    if mode == "all":
        return jax.tree_util.tree_map(lambda _: True, params)
    if mode == "kernels":
        return jax.tree_util.tree_map_with_path(lambda path, _: _last_key(path) == "kernel", params)
    raise ConfigError(f"optim.weight_decay_mask={mode!r} is not known; choose 'kernels' or 'all'")


# ---------------------------------------------------------------------------------------------------------
# Optimizers
# ---------------------------------------------------------------------------------------------------------


def _base_optimizer(optim: OptimConfig, lr: Schedule) -> optax.GradientTransformation:
    wd = float(optim.weight_decay)
    if wd < 0:
        raise ConfigError(f"optim.weight_decay={wd} must be >= 0")

    def mask(params: Any) -> Any:
        return weight_decay_mask(params, optim.weight_decay_mask)

    def l2(inner: optax.GradientTransformation) -> optax.GradientTransformation:
        return optax.chain(optax.add_decayed_weights(wd, mask), inner) if wd else inner

    name = optim.name
    if name == "sgd":
        if not 0.0 <= optim.momentum < 1.0:
            raise ConfigError(f"optim.momentum={optim.momentum} must be in [0, 1) for sgd")
        if optim.nesterov and not optim.momentum:
            raise ConfigError("optim.nesterov=True needs optim.momentum > 0")
        if optim.momentum:  # optax's chain, whose update the backend may run as one pass (jaxcnn.backends.sgd)
            return backends.sgd(lr, momentum=optim.momentum, nesterov=optim.nesterov, weight_decay=wd,
                                mask=mask if wd else None)
        return l2(optax.sgd(lr))
    if name == "adam":
        return l2(optax.adam(lr, b1=optim.b1, b2=optim.b2, eps=optim.eps))
    if name == "adamw":
        return optax.adamw(lr, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=wd, mask=mask)
    if name == "lamb":
        return optax.lamb(lr, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=wd, mask=mask)
    if name == "lars":
        return optax.lars(
            lr,
            weight_decay=wd,
            weight_decay_mask=mask,
            trust_ratio_mask=mask,
            momentum=optim.momentum,
            nesterov=optim.nesterov,
        )
    raise ConfigError(f"optim.name={name!r} is not known; choose one of: sgd, adam, adamw, lamb, lars")


def make_optimizer(
    optim: OptimConfig,
    schedule: ScheduleConfig,
    *,
    steps_per_epoch: int,
    total_steps: int,
    trainable_mask: Any = None,
) -> tuple[optax.GradientTransformation, Schedule]:
    """(tx, schedule): the optax transformation for `optim` and the learning-rate schedule it uses.

    steps_per_epoch, total_steps: optimizer updates per epoch and in the whole run (schedules are in updates).
    trainable_mask: None (train everything) or a pytree of bools like the params; False leaves get a zero
    update and keep no optimizer state (`optax.multi_transform` with `set_to_zero`), and are left out of the
    gradient-clipping norm. Changing the mask (unfreezing) changes the optimizer state's structure: build a new
    tx and `tx.init(params)` for it.
    """
    lr = make_schedule(optim.lr, schedule, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
    tx = _base_optimizer(optim, lr)
    if optim.grad_clip_norm is not None:
        if not optim.grad_clip_norm > 0 or not math.isfinite(optim.grad_clip_norm):
            raise ConfigError(f"optim.grad_clip_norm={optim.grad_clip_norm} must be a positive number (or None)")
        tx = optax.chain(optax.clip_by_global_norm(optim.grad_clip_norm), tx)
    if trainable_mask is not None:
        labels = jax.tree_util.tree_map(lambda t: "train" if t else "freeze", trainable_mask)
        tx = optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)
    return tx, lr
