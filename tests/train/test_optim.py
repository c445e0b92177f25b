"""Optimizers, schedules, weight-decay masks and clipping (jaxcnn.train.optim) against hand-written NumPy
references, and the step-level toolkit (gradient accumulation with and without BatchNorm, EMA, label smoothing,
mixed precision) against references that do not go through the code under test."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcnn.config import ConfigError, OptimConfig, ScheduleConfig
from jaxcnn.models import create_model
from jaxcnn.backends import apply_gradients
from jaxcnn.train.optim import lr_at, make_optimizer, make_schedule, weight_decay_mask
from jaxcnn.train.state import create_train_state
from jaxcnn.train.step import StepOptions, cross_entropy, make_train_step

sys.path.insert(0, str(Path(__file__).parent))
from parallel_helpers import numpy_variables

# ---------------------------------------------------------------------------------------------------------
# A parameter tree shaped like a conv net's, and NumPy reference optimizers
# ---------------------------------------------------------------------------------------------------------

KERNELS = {("conv", "kernel"), ("dense", "kernel")}


def param_tree(seed: int) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {
        "conv": {"kernel": rng.normal(size=(3, 3, 2, 4)), "bias": rng.normal(size=4)},
        "bn": {"scale": 1.0 + 0.1 * rng.normal(size=4), "bias": rng.normal(size=4)},
        "dense": {"kernel": rng.normal(size=(4, 3)), "bias": rng.normal(size=3)},
    }


def as_f32(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), tree)


def run_optax(tx: optax.GradientTransformation, params: Any, grads: list[Any]) -> Any:
    """The train step's update (`apply_gradients`: the native SGD pass where make_optimizer chose it), per step."""
    state = tx.init(params)
    for g in grads:
        params, state = apply_gradients(tx, g, state, params)
    return params


def numpy_optimizer(name: str, p: np.ndarray, gs: list[np.ndarray], lrs: list[float], decay: bool, hp: dict) -> np.ndarray:
    """One leaf through the update rules in jaxcnn.train.optim's docstring (float64)."""
    p = p.astype(np.float64).copy()
    wd = hp["wd"] if decay else 0.0
    mom, b1, b2, eps = hp["momentum"], hp["b1"], hp["b2"], hp["eps"]
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t, (g, lr) in enumerate(zip(gs, lrs), start=1):
        g = g.astype(np.float64)
        if name == "sgd":  # PyTorch SGD: L2 into the gradient, then momentum
            g = g + wd * p
            m = mom * m + g
            p = p - lr * ((g + mom * m) if hp["nesterov"] else m)
        elif name in ("adam", "adamw", "lamb"):
            if name == "adam":
                g = g + wd * p
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            u = (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
            if name in ("adamw", "lamb"):
                u = u + wd * p
            if name == "lamb":
                u = u * np.linalg.norm(p) / np.linalg.norm(u)
            p = p - lr * u
        elif name == "lars":
            g = g + wd * p
            if decay:  # the trust ratio goes with the decay mask
                g = 0.001 * np.linalg.norm(p) / np.linalg.norm(g) * g
            m = mom * m + lr * g  # lr is applied before the momentum trace
            p = p - ((lr * g + mom * m) if hp["nesterov"] else m)
    return p


@pytest.mark.parametrize(
    "name, nesterov",
    [("sgd", False), ("sgd", True), ("adam", False), ("adamw", False), ("lamb", False), ("lars", False), ("lars", True)],
)
def test_optimizers_follow_their_update_rules(name: str, nesterov: bool) -> None:
    hp = {"wd": 0.05, "momentum": 0.9, "b1": 0.8, "b2": 0.95, "eps": 1e-6, "nesterov": nesterov}
    cfg = OptimConfig(
        name=name, lr=0.1 if name != "lars" else 3.0, momentum=hp["momentum"], nesterov=nesterov, b1=hp["b1"],
        b2=hp["b2"], eps=hp["eps"], weight_decay=hp["wd"], weight_decay_mask="kernels",
    )
    # cosine over 3 steps, no warm-up: lr·1, lr·0.75, lr·0.25 (hand-computed ½(1 + cos(π t / 3)))
    tx, schedule = make_optimizer(cfg, ScheduleConfig(name="cosine"), steps_per_epoch=1, total_steps=3)
    lrs = [cfg.lr * f for f in (1.0, 0.75, 0.25)]
    np.testing.assert_allclose([lr_at(schedule, t) for t in range(3)], lrs, rtol=1e-6)
    params = param_tree(0)
    grads = [param_tree(s) for s in (1, 2, 3)]
    got = run_optax(tx, as_f32(params), [as_f32(g) for g in grads])
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    for path, p in flat:
        keys = tuple(k.key for k in path)
        leaf_grads = [g[keys[0]][keys[1]] for g in grads]
        want = numpy_optimizer(name, p, leaf_grads, lrs, keys in KERNELS, hp)
        np.testing.assert_allclose(got[keys[0]][keys[1]], want, rtol=2e-5, atol=2e-6, err_msg=f"{name} {keys}")


def test_weight_decay_mask_leaves_batchnorm_and_biases_out() -> None:
    params = param_tree(0)
    mask = weight_decay_mask(params, "kernels")
    assert mask == {
        "conv": {"kernel": True, "bias": False},
        "bn": {"scale": False, "bias": False},
        "dense": {"kernel": True, "bias": False},
    }
    assert all(jax.tree_util.tree_leaves(weight_decay_mask(params, "all")))
    # with zero gradients only the decay moves anything: exactly the kernels, by lr·wd·p
    zero = jax.tree_util.tree_map(np.zeros_like, as_f32(params))
    for name in ("sgd", "adamw"):
        cfg = OptimConfig(name=name, lr=0.1, momentum=0.0 if name == "sgd" else 0.9, weight_decay=0.5)
        tx, _ = make_optimizer(cfg, ScheduleConfig(name="constant"), steps_per_epoch=1, total_steps=1)
        new = run_optax(tx, as_f32(params), [zero])
        for group, leaves in params.items():
            for leaf, p in leaves.items():
                want = p * (1 - 0.1 * 0.5) if (group, leaf) in KERNELS else p
                np.testing.assert_allclose(new[group][leaf], want, rtol=1e-6, err_msg=f"{name} {group}/{leaf}")
    # a real model's tree: BatchNorm scale/bias and the dense bias are out, every conv/dense kernel is in
    model = create_model("resnet20", num_classes=3, stage_sizes=(1,), stage_widths=(4,), stem_width=4)
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)), train=False))
    flat = jax.tree_util.tree_flatten_with_path(weight_decay_mask(variables["params"], "kernels"))[0]
    for path, decayed in flat:
        assert decayed == (path[-1].key == "kernel"), path
    assert sum(decayed for _, decayed in flat) == 4  # stem conv, two block convs, the head's dense


def test_gradient_clipping_bounds_the_global_norm() -> None:
    params = as_f32(param_tree(0))
    grads = as_f32(param_tree(1))
    norm = math.sqrt(sum(float(np.sum(np.asarray(g, np.float64) ** 2)) for g in jax.tree_util.tree_leaves(grads)))
    for clip in (0.5 * norm, 2.0 * norm):
        cfg = OptimConfig(name="sgd", lr=1.0, momentum=0.0, grad_clip_norm=clip)
        tx, _ = make_optimizer(cfg, ScheduleConfig(name="constant"), steps_per_epoch=1, total_steps=1)
        updates, _ = tx.update(grads, tx.init(params), params)
        scale = min(1.0, clip / norm)
        for u, g in zip(jax.tree_util.tree_leaves(updates), jax.tree_util.tree_leaves(grads)):
            np.testing.assert_allclose(u, -scale * np.asarray(g), rtol=1e-5, atol=1e-7)
        update_norm = math.sqrt(sum(float(np.sum(np.asarray(u, np.float64) ** 2)) for u in jax.tree_util.tree_leaves(updates)))
        assert update_norm <= min(clip, norm) * (1 + 1e-5)


def test_trainable_mask_freezes_leaves_and_keeps_no_state_for_them() -> None:
    params = as_f32(param_tree(0))
    trainable = {"conv": {"kernel": False, "bias": False}, "bn": {"scale": True, "bias": True},
                 "dense": {"kernel": True, "bias": True}}
    cfg = OptimConfig(name="sgd", lr=0.1, momentum=0.9, weight_decay=0.1, weight_decay_mask="all", grad_clip_norm=1.0)
    tx, _ = make_optimizer(cfg, ScheduleConfig(name="constant"), steps_per_epoch=1, total_steps=3,
                           trainable_mask=trainable)
    grads = as_f32(param_tree(1))
    grads["conv"]["kernel"] = grads["conv"]["kernel"] * 1e6  # a huge frozen gradient must not clip the others
    small = jax.tree_util.tree_map(lambda g: g * 1e-3, grads)
    small["conv"]["kernel"] = grads["conv"]["kernel"]
    new = run_optax(tx, params, [small])
    np.testing.assert_array_equal(new["conv"]["kernel"], params["conv"]["kernel"])
    np.testing.assert_array_equal(new["conv"]["bias"], params["conv"]["bias"])
    # the trainable leaves: plain SGD with L2 (their norm is far below the clip)
    for group in ("bn", "dense"):
        for leaf in ("scale", "bias", "kernel"):
            if leaf in params[group]:
                p, g = params[group][leaf], small[group][leaf]
                np.testing.assert_allclose(new[group][leaf], p - 0.1 * (g + 0.1 * p), rtol=1e-5)
    trace_leaves = [x for x in jax.tree_util.tree_leaves(tx.init(params)) if np.ndim(x) > 0]
    assert sum(x.size for x in trace_leaves) == sum(
        params[g][k].size for g in ("bn", "dense") for k in params[g]
    )  # momentum only for the trainable leaves


# ---------------------------------------------------------------------------------------------------------
# Schedules: values at chosen steps, computed by hand
# ---------------------------------------------------------------------------------------------------------


def values(schedule: ScheduleConfig, steps: list[int], lr: float = 1.0, spe: int = 10, total: int = 100) -> list[float]:
    fn = make_schedule(lr, schedule, steps_per_epoch=spe, total_steps=total)
    return [lr_at(fn, t) for t in steps]


def test_schedule_values_by_hand() -> None:
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    close(values(ScheduleConfig(name="constant"), [0, 50, 99]), [1.0, 1.0, 1.0])
    # warm-up over 1 epoch = 10 steps from 0: t/10
    close(values(ScheduleConfig(name="constant", warmup_epochs=1), [0, 3, 10, 70]), [0.0, 0.3, 1.0, 1.0])
    # step: ×0.1 at epochs 3 and 6 (steps 30 and 60)
    close(values(ScheduleConfig(name="step", decay_epochs=(3, 6), decay_factor=0.1), [0, 29, 30, 59, 60, 99]),
          [1.0, 1.0, 0.1, 0.1, 0.01, 0.01])
    close(values(ScheduleConfig(name="step", decay_epochs=(0.5,), decay_factor=0.5, warmup_epochs=1), [2, 5, 10]),
          [0.2, 0.25, 0.5])
    # cosine with 10 warm-up steps over 100: at 10 the peak, at 55 half-way (½), at 100 the floor f = 0.1
    cos = ScheduleConfig(name="cosine", warmup_epochs=1, final_lr_fraction=0.1)
    close(values(cos, [5, 10, 55, 100, 200], lr=2.0),
          [1.0, 2.0, 2.0 * (0.1 + 0.9 * 0.5), 0.2, 0.2])
    # no warm-up, a quarter of the way: ½(1 + cos(π/4))
    close(values(ScheduleConfig(name="cosine"), [25], total=100), [0.5 * (1 + math.cos(math.pi / 4))])
    # onecycle: 0.04·lr at 0, lr at the peak (t = 25), 0 at 100; half cosines in between
    one = ScheduleConfig(name="onecycle", peak_fraction=0.25, initial_lr_fraction=0.04, final_lr_fraction=0.0)
    close(values(one, [0, 25, 100], lr=0.5), [0.02, 0.5, 0.0])
    close(values(one, [10], lr=1.0), [0.04 + 0.96 * 0.5 * (1 - math.cos(math.pi * 10 / 25))])
    close(values(one, [25 + 75 // 3], lr=1.0), [0.5 * (1 + math.cos(math.pi / 3))])  # t = 50: cos(π·25/75)
    # triangular: straight lines 0.04 -> 1 at 25 -> 0.1 at 100
    tri = ScheduleConfig(name="triangular", peak_fraction=0.25, initial_lr_fraction=0.04, final_lr_fraction=0.1)
    close(values(tri, [0, 5, 25, 40, 100, 120]), [0.04, 0.04 + 0.96 * 0.2, 1.0, 1.0 - 0.9 * 0.2, 0.1, 0.1])


def test_schedule_errors_say_what_to_change() -> None:
    with pytest.raises(ConfigError, match="warmup_epochs=0"):
        make_schedule(1.0, ScheduleConfig(name="onecycle", warmup_epochs=1), steps_per_epoch=10, total_steps=100)
    with pytest.raises(ConfigError, match="not shorter than the 50 steps"):
        make_schedule(1.0, ScheduleConfig(name="cosine", warmup_epochs=5), steps_per_epoch=10, total_steps=50)
    with pytest.raises(ConfigError, match="peak_fraction"):
        make_schedule(1.0, ScheduleConfig(name="triangular", peak_fraction=1.0), steps_per_epoch=10, total_steps=50)
    with pytest.raises(ConfigError, match="choose one of: constant"):
        make_schedule(1.0, ScheduleConfig(name="linear"), steps_per_epoch=1, total_steps=5)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="choose one of: sgd"):
        make_optimizer(OptimConfig(name="rmsprop"), ScheduleConfig(), steps_per_epoch=1, total_steps=5)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="grad_clip_norm"):
        make_optimizer(OptimConfig(grad_clip_norm=0.0), ScheduleConfig(), steps_per_epoch=1, total_steps=5)
    with pytest.raises(ConfigError, match="'kernels' or 'all'"):
        weight_decay_mask({"a": 1}, "biases")


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "lamb", "lars"])
def test_every_optimizer_builds_with_every_schedule_and_keeps_shapes(name: str) -> None:
    params = as_f32(param_tree(0))
    grads = as_f32(param_tree(1))
    for sched in ("constant", "step", "cosine", "onecycle", "triangular"):
        cfg = ScheduleConfig(name=sched, decay_epochs=(1,), warmup_epochs=0.5 if sched in ("constant", "cosine") else 0)
        tx, schedule = make_optimizer(OptimConfig(name=name, weight_decay=1e-4), cfg, steps_per_epoch=4, total_steps=12)
        new = run_optax(tx, params, [grads, grads])
        assert jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(params)
        for a, b in zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(params)):
            assert a.shape == b.shape and a.dtype == np.float32 and np.all(np.isfinite(a))
        assert np.asarray(schedule(jnp.arange(12))).shape == (12,)


# ---------------------------------------------------------------------------------------------------------
# In the train step: accumulation, BatchNorm, EMA, label smoothing, mixed precision
# ---------------------------------------------------------------------------------------------------------

OPTS = {"num_classes": 2, "mean": (0.0,), "std": (255.0,)}  # preprocess: x = (image / 255 - 0) / (255 / 255)


class NoBN(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = nn.relu(nn.Conv(4, (3, 3))(x))
        return nn.Dense(2)(x.mean(axis=(1, 2)))


class BNFirst(nn.Module):
    """BatchNorm straight on the input, so its statistics are those of the (known) preprocessed images."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = nn.BatchNorm(use_running_average=not train, momentum=0.8)(x)
        x = nn.relu(nn.Conv(4, (3, 3))(x))
        return nn.Dense(2)(x.mean(axis=(1, 2)))


def toy_batch(n: int, seed: int = 0, channels: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"image": rng.integers(0, 256, (n, 6, 6, channels)).astype(np.uint8),
            "label": rng.integers(0, 2, n).astype(np.int32)}


def toy_state(model: nn.Module, tx: optax.GradientTransformation, *, ema: bool = False) -> Any:
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 6, 6, 1)), train=False)
    return create_train_state(model, tx, variables, ema=ema)


@pytest.mark.slow
def test_accumulation_without_batchnorm_equals_one_big_batch() -> None:
    tx = optax.sgd(0.5, momentum=0.9)
    batch = toy_batch(16)
    out = {}
    for k in (1, 4):
        step = jax.jit(make_train_step(StepOptions(**OPTS, accum_steps=k)))
        state = toy_state(NoBN(), tx)
        for i in range(2):
            state, metrics = step(state, batch, jax.random.PRNGKey(i))
        out[k] = (jax.device_get(state.params), float(metrics["loss"]))
    for a, b in zip(jax.tree_util.tree_leaves(out[1][0]), jax.tree_util.tree_leaves(out[4][0])):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)
    assert out[1][1] == pytest.approx(out[4][1], rel=1e-5)


@pytest.mark.slow
def test_accumulation_with_batchnorm_uses_micro_batch_statistics() -> None:
    k, n, lr, m = 2, 8, 0.1, 0.8
    batch = toy_batch(n, seed=1)
    state = toy_state(BNFirst(), optax.sgd(lr))
    new, _ = jax.jit(make_train_step(StepOptions(**OPTS, accum_steps=k)))(state, batch, jax.random.PRNGKey(0))
    # running statistics: k momentum updates with each micro-batch's mean and biased variance, in order
    x = batch["image"].astype(np.float64) / 255.0  # what preprocess gives with mean 0, std 255
    mean, var = np.zeros(1), np.ones(1)
    for j in range(k):
        part = x[j * n // k:(j + 1) * n // k]
        mean = m * mean + (1 - m) * part.mean(axis=(0, 1, 2))
        var = m * var + (1 - m) * part.var(axis=(0, 1, 2))
    np.testing.assert_allclose(new.batch_stats["BatchNorm_0"]["mean"], mean, rtol=1e-5)
    np.testing.assert_allclose(new.batch_stats["BatchNorm_0"]["var"], var, rtol=1e-4)

    # the gradient: the mean over micro-batches, each normalised with its own statistics
    def loss(params: Any, xb: jax.Array, yb: jax.Array) -> jax.Array:
        logits, _ = state.apply_fn({"params": params, "batch_stats": state.batch_stats}, xb, train=True,
                                   mutable=["batch_stats"])
        return cross_entropy(logits, yb, 2).mean()

    xj = jnp.asarray(x, jnp.float32)
    grad = jax.jit(jax.grad(loss))
    micro = [grad(state.params, xj[j * n // k:(j + 1) * n // k], batch["label"][j * n // k:(j + 1) * n // k])
             for j in range(k)]
    whole = grad(state.params, xj, batch["label"])
    want = jax.tree_util.tree_map(lambda p, *g: p - lr * sum(g) / k, state.params, *micro)
    for a, b in zip(jax.tree_util.tree_leaves(new.params), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)
    differs = [not np.allclose(sum(g) / k, w, atol=1e-6) for w, *g in
               zip(jax.tree_util.tree_leaves(whole), *map(jax.tree_util.tree_leaves, micro))]
    assert any(differs)  # with BatchNorm it is not the big batch's gradient


def test_ema_equals_a_hand_computed_ema() -> None:
    d = 0.8
    state = toy_state(NoBN(), optax.sgd(0.3, momentum=0.5), ema=True)
    step = jax.jit(make_train_step(StepOptions(**OPTS, ema_decay=d)))
    ema = jax.tree_util.tree_map(lambda p: np.asarray(p, np.float64), jax.device_get(state.params))
    for i in range(4):
        state, _ = step(state, toy_batch(8, seed=i), jax.random.PRNGKey(i))
        params = jax.device_get(state.params)
        ema = jax.tree_util.tree_map(lambda e, p: d * e + (1 - d) * np.asarray(p, np.float64), ema, params)
    for a, b in zip(jax.tree_util.tree_leaves(jax.device_get(state.ema_params)), jax.tree_util.tree_leaves(ema)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert not np.allclose(jax.tree_util.tree_leaves(state.ema_params)[0], jax.tree_util.tree_leaves(state.params)[0])


def test_label_smoothing_loss_by_hand() -> None:
    logits = np.array([[2.0, -1.0, 0.5], [0.1, 0.2, 0.3]], np.float32)
    labels = np.array([0, 2], np.int32)
    a, k = 0.1, 3
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    targets = np.full((2, k), a / k)
    targets[np.arange(2), labels] += 1 - a
    np.testing.assert_allclose(cross_entropy(jnp.asarray(logits), jnp.asarray(labels), k, a),
                               -(targets * logp).sum(1), rtol=1e-6)


@pytest.mark.slow
def test_mixed_precision_still_learns_and_keeps_float32_state() -> None:
    # a separable problem: class 1 has a bright left half, class 0 a bright right half, plus noise
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 64).astype(np.int32)
    images = rng.integers(0, 100, (64, 8, 8, 3))
    images[labels == 1, :, :4] += 120
    images[labels == 0, :, 4:] += 120
    images = images.astype(np.uint8)
    model = create_model("resnet20", num_classes=2, stage_sizes=(1, 1), stage_widths=(8, 16), stem_width=8,
                         dtype="bfloat16")
    variables = numpy_variables(model, (8, 8, 3))
    tx, _ = make_optimizer(OptimConfig(name="sgd", lr=0.05, momentum=0.9), ScheduleConfig(name="constant"),
                           steps_per_epoch=4, total_steps=40)
    state = create_train_state(model, tx, variables)
    opts = StepOptions(num_classes=2, mean=(110.0,) * 3, std=(70.0,) * 3, compute_dtype=jnp.bfloat16)
    step = jax.jit(make_train_step(opts))
    features = model.apply(variables, jnp.zeros((1, 8, 8, 3), jnp.bfloat16), train=False, return_features=True)
    assert features["stem"].dtype == jnp.bfloat16  # the convolutions really run in bfloat16
    losses = []
    for i in range(40):
        j = (i % 4) * 16
        state, metrics = step(state, {"image": images[j:j + 16], "label": labels[j:j + 16]}, jax.random.PRNGKey(i))
        losses.append(metrics["loss"])
    losses = np.asarray(jax.device_get(losses))
    assert metrics["loss"].dtype == jnp.float32
    assert np.mean(losses[-4:]) < 0.5 * np.mean(losses[:4]), losses
    for tree in (state.params, state.batch_stats, state.opt_state):
        for leaf in jax.tree_util.tree_leaves(tree):
            if jnp.issubdtype(leaf.dtype, jnp.floating):
                assert leaf.dtype == jnp.float32
