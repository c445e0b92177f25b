"""Pure train and eval steps.

`make_train_step(...)` returns `train_step(state, batch, rng) -> (state, metrics)` and `make_eval_step(...)` returns
`eval_step(state, batch) -> metric sums`. They are plain functions of arrays: jit them, pmap them or shard_map them
from outside (jaxcnn.train.parallel). The only thing they know about devices is an optional `axis_name` over which
the pmap / shard_map strategies average gradients and metrics.

batch: {'image': uint8 [B, H, W, C], 'label': int32 [B]} (+ 'mask': bool [B] for eval, + 'index': int32 [B] when
the loader provides dataset indices, used by the alternating flip).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from jax import lax

from jaxcnn.data import augment
from jaxcnn.train.state import TrainState
from jaxcnn.backends import apply_gradients

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


@dataclass(frozen=True)
class StepOptions:
    """What the steps need to know beyond the state: input preprocessing and the loss."""

    num_classes: int
    mean: Sequence[float]  # per channel, 0..255 scale
    std: Sequence[float]
    normalize: bool = True
    crop_padding: int = 0
    flip: str = "none"
    cutout: int = 0
    tta: str = "none"
    label_smoothing: float = 0.0
    accum_steps: int = 1
    ema_decay: float | None = None
    eval_ema: bool = False
    compute_dtype: Any = jnp.float32
    steps_per_epoch: int = 1  # for the alternating flip's epoch parity
    flip_seed: int = 0  # which half of the examples the alternating flip mirrors first (the run's seed)
    check_finite: bool = True
    # Transfer learning: fn(old_stats, new_stats, step) -> stats, putting back frozen layers' BatchNorm statistics
    # (jaxcnn.train.transfer.stats_freezer); None = all statistics update.
    freeze_stats: Callable[[Any, Any, jax.Array], Any] | None = None


def cross_entropy(logits: jax.Array, labels: jax.Array, num_classes: int, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example softmax cross-entropy in float32. logits: [B, K], labels: int [B] -> [B]."""
    targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def _inputs(batch: Batch, rng: jax.Array | None, opts: StepOptions, epoch: jax.Array | None) -> jax.Array:
    images = batch["image"]
    if rng is not None:
        images = augment.augment_batch(
            images,
            rng,
            crop_padding=opts.crop_padding,
            flip=opts.flip,
            cutout=opts.cutout,
            epoch=epoch,
            indices=batch.get("index"),
            flip_seed=opts.flip_seed,
        )
    return augment.preprocess(images, mean=opts.mean, std=opts.std, normalize=opts.normalize, dtype=opts.compute_dtype)


def _pmean(tree: Any, axis_name: str | None) -> Any:
    return tree if axis_name is None else lax.pmean(tree, axis_name)


def make_train_step(opts: StepOptions, axis_name: str | None = None) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, Metrics]]:
    """Returns the pure `train_step(state, batch, rng) -> (state, metrics)`.

    metrics: {'loss', 'accuracy', 'grad_norm'} averaged over the (global) batch.
    With accum_steps = k > 1 the batch is split into k micro-batches of B/k; gradients are averaged over them and the
    optimizer steps once. BatchNorm statistics are computed per micro-batch, and the running averages are updated
    k times (once per micro-batch, in order), exactly as k smaller forward passes would.
    """

    def loss_fn(params: Any, batch_stats: Any, x: jax.Array, labels: jax.Array, dropout_rng: jax.Array, apply_fn: Callable):
        variables = {"params": params}
        if batch_stats:
            variables["batch_stats"] = batch_stats
            logits, updates = apply_fn(variables, x, train=True, rngs={"dropout": dropout_rng}, mutable=["batch_stats"])
            new_stats = updates["batch_stats"]
        else:
            logits = apply_fn(variables, x, train=True, rngs={"dropout": dropout_rng})
            new_stats = batch_stats
        logits = logits.astype(jnp.float32)
        loss = cross_entropy(logits, labels, opts.num_classes, opts.label_smoothing).mean()
        correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32).mean()
        return loss, (new_stats, correct)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, batch: Batch, rng: jax.Array) -> tuple[TrainState, Metrics]:
        aug_rng, dropout_rng = jax.random.split(rng)
        epoch = state.step // max(opts.steps_per_epoch, 1)
        x = _inputs(batch, aug_rng, opts, epoch)
        labels = batch["label"]
        k = opts.accum_steps
        if k == 1:
            (loss, (batch_stats, acc)), grads = grad_fn(state.params, state.batch_stats, x, labels, dropout_rng, state.apply_fn)
        else:
            xs = x.reshape((k, x.shape[0] // k) + x.shape[1:])
            ys = labels.reshape((k, -1))
            keys = jax.random.split(dropout_rng, k)

            def micro(carry, inp):
                stats, gsum, lsum, asum = carry
                xm, ym, km = inp
                (l, (stats, a)), g = grad_fn(state.params, stats, xm, ym, km, state.apply_fn)
                gsum = jax.tree_util.tree_map(jnp.add, gsum, g)
                return (stats, gsum, lsum + l, asum + a), None

            zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
            init = (state.batch_stats, zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
            (batch_stats, gsum, lsum, asum), _ = lax.scan(micro, init, (xs, ys, keys))
            grads = jax.tree_util.tree_map(lambda g: g / k, gsum)
            loss, acc = lsum / k, asum / k

        grads = _pmean(grads, axis_name)
        loss, acc = _pmean((loss, acc), axis_name)
        grad_norm = optax.tree.norm(grads)

        def updated() -> TrainState:
            params, opt_state = apply_gradients(state.tx, grads, state.opt_state, state.params)
            ema_params = state.ema_params
            if opts.ema_decay is not None and ema_params is not None:
                d = opts.ema_decay
                ema_params = jax.tree_util.tree_map(lambda e, p: d * e + (1.0 - d) * p, ema_params, params)
            new_stats = batch_stats
            if opts.freeze_stats is not None:
                new_stats = opts.freeze_stats(state.batch_stats, batch_stats, state.step)
            return state.replace(step=state.step + 1, params=params, batch_stats=new_stats, opt_state=opt_state,
                                 ema_params=ema_params)

        if opts.check_finite:
            new_state = _guard_nonfinite(state, updated, loss, grads, grad_norm)
        else:
            new_state = updated()
        metrics = {"loss": loss, "accuracy": acc, "grad_norm": grad_norm}
        return new_state, metrics

    return train_step


def make_multi_step(train_step: Callable[[TrainState, Batch, jax.Array], tuple[TrainState, Metrics]]) -> Callable:
    """Returns `train_steps(state, batches, first, count, rng, step0) -> (state, metric_sums)`: `count` train steps
    in one call (a `lax.fori_loop`, so one compilation serves every count).

    batches: stacked {'image': [S, B, ...], 'label': [S, B], ...} (an epoch's batches on the devices); first, count,
    step0: int32 scalars with 0 <= first and first + count <= S (the caller checks); rng: the run's base key.
    Step i (0 <= i < count) trains on batches[first + i] with the key ``fold_in(rng, step0 + i)``: the same
    batches, keys and updates as `count` calls ``train_step(state, batches[first + i], fold_in(rng, step0 + i))``,
    without `count` round trips through Python. That dispatch is what a small network's step is made of on a
    2-core CPU (the MLP's step: 2.4 ms per call, 1.5 ms inside the loop; benchmarks/README.md).

    metric_sums: each of train_step's metrics summed over the `count` steps (divide by count for the mean).
    """

    def train_steps(state: TrainState, batches: Batch, first: jax.Array, count: jax.Array, rng: jax.Array,
                    step0: jax.Array) -> tuple[TrainState, Metrics]:
        first, count, step0 = (jnp.asarray(v, jnp.int32) for v in (first, count, step0))

        def batch_at(i: jax.Array) -> Batch:
            return {k: lax.dynamic_index_in_dim(v, first + i, axis=0, keepdims=False) for k, v in batches.items()}

        def key_at(i: jax.Array) -> jax.Array:
            return jax.random.fold_in(rng, step0 + i)

        shapes = jax.eval_shape(train_step, state, batch_at(jnp.int32(0)), key_at(jnp.int32(0)))[1]
        zeros = jax.tree_util.tree_map(lambda m: jnp.zeros(m.shape, m.dtype), shapes)

        def body(i: jax.Array, carry: tuple[TrainState, Metrics]) -> tuple[TrainState, Metrics]:
            st, sums = carry
            st, metrics = train_step(st, batch_at(i), key_at(i))
            return st, jax.tree_util.tree_map(jnp.add, sums, metrics)

        return lax.fori_loop(0, count, body, (state, zeros))

    return train_steps


def _guard_nonfinite(old: TrainState, updated: Callable[[], TrainState], loss: jax.Array, grads: Any,
                     grad_norm: jax.Array) -> TrainState:
    """`updated()` when the loss and every gradient are finite, else `old` (recording the step and the first bad
    quantity in `first_nonfinite`; once recorded, the state stays `old`).

    grad_norm: the global norm of `grads`. When it and the loss are finite, every gradient is (a NaN or inf element
    makes the sum of squares NaN or inf), so the per-leaf checks run only when one of them is not: after a
    non-finite value, or when a finite gradient's squares overflow float32 (the exact check then says finite).
    """
    leaves = jax.tree_util.tree_leaves(grads)

    def exact_check() -> tuple[jax.Array, jax.Array]:
        leaf_ok = jnp.stack([jnp.all(jnp.isfinite(g)) for g in leaves])
        loss_ok = jnp.isfinite(loss)
        what = jnp.where(loss_ok, jnp.argmin(leaf_ok) + 1, 0).astype(jnp.int32)
        return loss_ok & jnp.all(leaf_ok), what

    surely_ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    ok, what = lax.cond(surely_ok, lambda: (jnp.bool_(True), jnp.int32(0)), exact_check)
    already_bad = old.first_nonfinite[0] >= 0
    record = jnp.where(ok | already_bad, old.first_nonfinite, jnp.stack([old.step, what]).astype(jnp.int32))
    keep_new = ok & ~already_bad
    # One conditional over the whole state, not a select per leaf: per-leaf selects that wait on every leaf's
    # finiteness check made XLA's compilation of a ResNet-56 step 3.5x slower on CPU (29 s against 9 s). The
    # optimizer update runs inside the true branch, so it writes the new state straight into the conditional's
    # results. Selecting between two states computed outside it cost two copies of the parameters and momenta
    # per step: the guard took 15.6% of the MLP step on 2 CPU cores that way, 8.7% this way (benchmarks/README.md).
    chosen = lax.cond(keep_new, updated, lambda: old)
    return chosen.replace(first_nonfinite=record)


def make_eval_step(opts: StepOptions, axis_name: str | None = None) -> Callable[[TrainState, Batch], Metrics]:
    """Returns `eval_step(state, batch) -> {'loss_sum', 'correct', 'count'}`: sums over examples whose mask is True.

    Sums (not means) so that padded last batches and many devices add up to exact totals.
    """

    def eval_step(state: TrainState, batch: Batch) -> Metrics:
        params = state.ema_params if (opts.eval_ema and state.ema_params is not None) else state.params
        variables = {"params": params}
        if state.batch_stats:
            variables["batch_stats"] = state.batch_stats
        x = _inputs(batch, None, opts, None)
        apply = lambda images: state.apply_fn(variables, images, train=False)  # noqa: E731
        logits = augment.tta_logits(apply, x, mode=opts.tta).astype(jnp.float32)
        labels = batch["label"]
        mask = batch.get("mask", jnp.ones(labels.shape, bool)).astype(jnp.float32)
        losses = cross_entropy(logits, labels, opts.num_classes)
        sums = {
            "loss_sum": jnp.sum(losses * mask),
            "correct": jnp.sum((jnp.argmax(logits, -1) == labels) * mask),
            "count": jnp.sum(mask),
        }
        if axis_name is not None:
            sums = lax.psum(sums, axis_name)
        return sums

    return eval_step
