"""jaxcnn.backends.cpu.sgd: the native SGD update gives the bits of a NumPy float32 reference and of optax's chain,
keeps optax's state structure, and falls back to optax where the native pass cannot run.

References: a NumPy float32 loop of optax's formula (independent of XLA and of the kernel), and optax's own
``chain(add_decayed_weights, sgd)`` under `jax.jit`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

from jaxcnn.config import OptimConfig, ScheduleConfig
from jaxcnn.backends.cpu import kernels as onednn
from jaxcnn.backends.cpu.sgd import FusedSGD, apply_gradients, fused_sgd
from jaxcnn.train.optim import make_optimizer, weight_decay_mask

needs_native = pytest.mark.skipif(not onednn.available(), reason="native library unavailable (g++ / libdnnl-dev)")

# leaf sizes around the 16-lane vector tail and above the 16k-element chunk (several threads)
SHAPES = {"a": (1,), "b": (15,), "c": (17,), "d": (3, 3, 2, 4), "e": (200, 201)}


def tree(seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}


def fma(a, b, c) -> np.ndarray:
    """a * b + c of float32 values, rounded to float32 once (the product of two float32 is exact in float64)."""
    a, b, c = (np.asarray(x, np.float32).astype(np.float64) for x in (a, b, c))
    return (a * b + c).astype(np.float32)


def numpy_sgd(p, m, g, step, momentum, nesterov, decay):
    """optax's chain(add_decayed_weights(decay), sgd(momentum, nesterov)) then apply_updates, in float32 with each
    multiply-add rounded once, as XLA's CPU backend compiles it."""
    d = fma(p, decay, g) if decay else np.asarray(g, np.float32)
    m2 = fma(m, momentum, d)
    u = fma(m2, momentum, d) if nesterov else m2
    return fma(u, step, p), m2


def uses_native(fn, *args) -> bool:
    return "jaxcnn_sgd_update" in jax.jit(fn).lower(*args).as_text()


@needs_native
@pytest.mark.parametrize("simd", [2, 1, 0])  # AVX-512, AVX2 + FMA, portable (as far as this CPU goes)
@pytest.mark.parametrize("nesterov", [True, False])
def test_kernel_gives_numpy_float32_bits(simd: int, nesterov: bool) -> None:
    params, momenta, grads = tree(0), tree(1), tree(2, 0.1)
    decays = {"a": 0.5, "b": 0.0, "c": 5e-4, "d": 0.0, "e": 1e-4}
    keys = list(SHAPES)
    token = onednn.SGD_SIMD.set(simd)
    try:
        fn = jax.jit(lambda s, p, m, g: onednn.sgd_update(s, p, m, g, momentum=0.9, nesterov=nesterov,
                                                          decays=[decays[k] for k in keys]))
        new_p, new_m = fn(np.float32(-0.05), [params[k] for k in keys], [momenta[k] for k in keys],
                          [grads[k] for k in keys])
    finally:
        onednn.SGD_SIMD.reset(token)
    for k, p2, m2 in zip(keys, new_p, new_m):
        want_p, want_m = numpy_sgd(params[k], momenta[k], grads[k], -0.05, 0.9, nesterov, decays[k])
        np.testing.assert_array_equal(np.asarray(m2), want_m, err_msg=f"momentum {k}")
        np.testing.assert_array_equal(np.asarray(p2), want_p, err_msg=f"param {k}")


@needs_native
def test_undecayed_leaf_takes_the_gradient_itself() -> None:
    """optax's mask leaves an undecayed leaf's gradient alone: an infinite parameter stays inf, not NaN."""
    p = [np.array([np.inf, -np.inf, 1.0], np.float32)]
    m = [np.zeros(3, np.float32)]
    g = [np.array([1.0, 1.0, 1.0], np.float32)]
    new_p, new_m = onednn.sgd_update(np.float32(-0.1), p, m, g, momentum=0.9, nesterov=True, decays=[0.0])
    np.testing.assert_array_equal(np.asarray(new_m[0]), [1.0, 1.0, 1.0])
    np.testing.assert_array_equal(np.asarray(new_p[0]), numpy_sgd(p[0], m[0], g[0], -0.1, 0.9, True, 0.0)[0])


def run(tx: Any, params: Any, grads: list[Any], fused: bool) -> tuple[Any, Any]:
    """`len(grads)` jitted steps: through `apply_gradients` (fused) or optax's update + apply_updates."""

    def step(p, s, g):
        if fused:
            return apply_gradients(tx, g, s, p)
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s

    step = jax.jit(step)
    state = tx.init(params)
    for g in grads:
        params, state = step(params, state, g)
    return params, state


@needs_native
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("weight_decay", [0.0, 5e-3])
def test_equals_optax_over_steps_with_a_schedule_and_mask(nesterov: bool, weight_decay: float) -> None:
    schedule = optax.cosine_decay_schedule(0.1, decay_steps=4)
    mask = lambda p: {k: k in ("c", "e") for k in p}  # noqa: E731
    tx = fused_sgd(schedule, momentum=0.9, nesterov=nesterov, weight_decay=weight_decay,
                   mask=mask if weight_decay else None)
    grads = [tree(s, 0.1) for s in (1, 2, 3, 4)]
    assert uses_native(lambda p, s, g: apply_gradients(tx, g, s, p), tree(0), tx.init(tree(0)), grads[0])
    got_p, got_s = run(tx, tree(0), grads, fused=True)
    want_p, want_s = run(tx, tree(0), grads, fused=False)
    assert jax.tree_util.tree_structure(got_s) == jax.tree_util.tree_structure(want_s)
    for a, b in zip(jax.tree_util.tree_leaves((got_p, got_s)), jax.tree_util.tree_leaves((want_p, want_s))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # and optax built independently of fused_sgd, with the hand-made mask: the same parameters
    plain = optax.sgd(schedule, momentum=0.9, nesterov=nesterov)
    if weight_decay:
        plain = optax.chain(optax.add_decayed_weights(weight_decay, mask), plain)
    ref_p, ref_s = run(plain, tree(0), grads, fused=False)
    assert jax.tree_util.tree_structure(got_s) == jax.tree_util.tree_structure(ref_s)
    for k in SHAPES:
        np.testing.assert_array_equal(np.asarray(got_p[k]), np.asarray(ref_p[k]), err_msg=k)


@needs_native
def test_constant_learning_rate_and_state_is_optax_checkpoint_compatible() -> None:
    tx = fused_sgd(0.05, momentum=0.8, weight_decay=1e-3)
    plain = optax.chain(optax.add_decayed_weights(1e-3), optax.sgd(0.05, momentum=0.8))
    grads = [tree(s, 0.1) for s in (5, 6)]
    got_p, got_s = run(tx, tree(0), grads, fused=True)
    want_p, want_s = run(plain, tree(0), grads, fused=False)
    assert jax.tree_util.tree_structure(got_s) == jax.tree_util.tree_structure(plain.init(tree(0)))
    for a, b in zip(jax.tree_util.tree_leaves((got_p, got_s)), jax.tree_util.tree_leaves((want_p, want_s))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # a state written by plain optax continues under fused_sgd (and the other way round)
    p, s = run(tx, tree(0), grads[:1], fused=True)
    p_plain, s_plain = run(plain, tree(0), grads[:1], fused=False)
    cont = jax.jit(lambda p, s, g: apply_gradients(tx, g, s, p))(p_plain, s_plain, grads[1])
    for a, b in zip(jax.tree_util.tree_leaves(cont), jax.tree_util.tree_leaves((want_p, want_s))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_falls_back_to_optax_where_the_native_pass_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    tx = fused_sgd(0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    grads = [tree(s, 0.1) for s in (1, 2)]
    want_p, _ = run(tx, tree(0), grads, fused=False)
    # bfloat16 parameters: optax's arithmetic (the kernel is float32 only)
    bf = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.bfloat16), tree(0))
    assert not uses_native(lambda p, s, g: apply_gradients(tx, g, s, p), bf, tx.init(bf), bf)
    # the library switched off: optax's path, the same numbers
    monkeypatch.setenv("JAXCNN_ONEDNN", "0")
    assert not uses_native(lambda p, s, g: apply_gradients(tx, g, s, p), tree(0), tx.init(tree(0)), grads[0])
    got_p, _ = run(tx, tree(0), grads, fused=True)
    for k in SHAPES:
        np.testing.assert_array_equal(np.asarray(got_p[k]), np.asarray(want_p[k]), err_msg=k)


@needs_native
def test_make_optimizer_uses_it_by_default_and_wrappers_take_optax_path() -> None:
    params = {"conv": {"kernel": tree(0)["d"], "bias": tree(0)["b"]}}
    grads = {"conv": {"kernel": tree(1)["d"], "bias": tree(1)["b"]}}
    sgd = OptimConfig(name="sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    tx, _ = make_optimizer(sgd, ScheduleConfig(name="cosine"), steps_per_epoch=1, total_steps=3)
    assert isinstance(tx, FusedSGD)
    assert uses_native(lambda p, s, g: apply_gradients(tx, g, s, p), params, tx.init(params), grads)
    # weight decay on kernels only: the bias moves by the momentum rule alone
    new, _ = jax.jit(lambda p, s, g: apply_gradients(tx, g, s, p))(params, tx.init(params), grads)
    assert weight_decay_mask(params, "kernels") == {"conv": {"kernel": True, "bias": False}}
    want_b = numpy_sgd(params["conv"]["bias"], 0 * params["conv"]["bias"], grads["conv"]["bias"], -0.1, 0.9, True, 0)
    np.testing.assert_array_equal(np.asarray(new["conv"]["bias"]), want_b[0])
    want_k = numpy_sgd(params["conv"]["kernel"], 0 * params["conv"]["kernel"], grads["conv"]["kernel"], -0.1, 0.9,
                       True, 5e-4)
    np.testing.assert_array_equal(np.asarray(new["conv"]["kernel"]), want_k[0])
    # gradient clipping and frozen parameters wrap it in optax transformations: optax's path, still correct
    clipped = OptimConfig(name="sgd", lr=0.1, momentum=0.9, grad_clip_norm=1.0)
    tx2, _ = make_optimizer(clipped, ScheduleConfig(name="constant"), steps_per_epoch=1, total_steps=3)
    assert not isinstance(tx2, FusedSGD)
    p2, _ = jax.jit(lambda p, s, g: apply_gradients(tx2, g, s, p))(params, tx2.init(params), grads)
    flat = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(grads)])
    clip = min(1.0, 1.0 / float(np.linalg.norm(flat)))
    np.testing.assert_allclose(np.asarray(p2["conv"]["bias"]),
                               params["conv"]["bias"] - 0.1 * clip * grads["conv"]["bias"], rtol=1e-5, atol=1e-6)
    # momentum 0 is plain optax.sgd
    plain, _ = make_optimizer(OptimConfig(name="sgd", lr=0.1, momentum=0.0), ScheduleConfig(name="constant"),
                              steps_per_epoch=1, total_steps=1)
    assert not isinstance(plain, FusedSGD)


def test_errors_say_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="momentum=0.0 must be in"):
        fused_sgd(0.1, momentum=0.0)
    with pytest.raises(ValueError, match="weight_decay=-1"):
        fused_sgd(0.1, momentum=0.9, weight_decay=-1)
    p, m, g = [np.zeros(3, np.float32)], [np.zeros(3, np.float32)], [np.zeros(4, np.float32)]
    with pytest.raises(ValueError, match=r"leaf 0: parameter \(3,\), momentum \(3,\) and gradient \(4,\)"):
        onednn.sgd_update(np.float32(-0.1), p, m, g, momentum=0.9, nesterov=False, decays=[0.0])
    with pytest.raises(ValueError, match="give one of each per leaf"):
        onednn.sgd_update(np.float32(-0.1), p, m, [], momentum=0.9, nesterov=False, decays=[0.0])


@needs_native
def test_prefix_mask_zero_size_leaves_and_inputs_left_alone() -> None:
    """A mask that is a prefix of the params (as optax.masked takes it), empty leaves, and eager calls that leave
    their inputs as they were (the results are aliased to the inputs only inside a compiled computation)."""
    params = {"conv": {"kernel": tree(0)["d"], "bias": tree(0)["b"]}, "empty": np.zeros((0, 3), np.float32),
              "fc": tree(0)["e"]}
    grads = jax.tree_util.tree_map(lambda x: np.float32(0.1) * x + np.float32(0.01), params)
    mask = {"conv": True, "empty": True, "fc": False}
    tx = fused_sgd(0.1, momentum=0.9, weight_decay=1e-2, mask=mask)
    plain = optax.chain(optax.add_decayed_weights(1e-2, mask), optax.sgd(0.1, momentum=0.9))
    before = jax.tree_util.tree_map(np.copy, params)
    got_p, got_s = run(tx, params, [grads, grads], fused=True)
    want_p, want_s = run(plain, params, [grads, grads], fused=False)
    for a, b in zip(jax.tree_util.tree_leaves((got_p, got_s)), jax.tree_util.tree_leaves((want_p, want_s))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    state = tx.init(params)
    new_p, _ = apply_gradients(tx, grads, state, params)  # eager
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(before)):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(np.asarray(new_p["fc"]), params["fc"])
    with pytest.raises(ValueError, match="a pytree like the parameters or a prefix"):
        fused_sgd(0.1, momentum=0.9, weight_decay=1e-2, mask={"other": True}).apply(grads, state, params)


@needs_native
def test_inside_cond_and_vmap_and_differentiable() -> None:
    tx = fused_sgd(0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)
    plain = optax.chain(optax.add_decayed_weights(1e-3), optax.sgd(0.05, momentum=0.9, nesterov=True))
    params, grads = tree(0), tree(1, 0.1)

    def fused_step(p, g, keep):  # the train step's guard: the update in one branch, the old state in the other
        return lax.cond(keep, lambda: apply_gradients(tx, g, tx.init(p), p)[0], lambda: p)

    def optax_step(p, g):
        updates, _ = plain.update(g, plain.init(p), p)
        return optax.apply_updates(p, updates)

    kept = jax.jit(fused_step)(params, grads, True)
    skipped = jax.jit(fused_step)(params, grads, False)
    want = jax.jit(optax_step)(params, grads)
    for k in SHAPES:
        np.testing.assert_array_equal(np.asarray(kept[k]), np.asarray(want[k]))
        np.testing.assert_array_equal(np.asarray(skipped[k]), params[k])
    # vmap over a batch of two gradient trees
    both = jax.tree_util.tree_map(lambda a, b: np.stack([a, b]), grads, tree(2, 0.1))
    batched = jax.jit(jax.vmap(lambda g: fused_step(params, g, True)))(both)
    for i, g in enumerate((grads, tree(2, 0.1))):
        want_i = jax.jit(optax_step)(params, g)
        for k in SHAPES:
            np.testing.assert_array_equal(np.asarray(batched[k][i]), np.asarray(want_i[k]))

    # derivatives through the update (e.g. a hypergradient): the same as through optax's, to float tolerance
    def loss(step_fn):
        return lambda p, g: sum(jnp.sum(jnp.sin(x)) for x in jax.tree_util.tree_leaves(step_fn(p, g)))

    got = jax.jit(jax.grad(loss(lambda p, g: fused_step(p, g, True)), argnums=(0, 1)))(params, grads)
    ref = jax.jit(jax.grad(loss(optax_step), argnums=(0, 1)))(params, grads)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


@needs_native
def test_sgd_update_rejects_other_dtypes_with_a_clear_message() -> None:
    p = [jnp.zeros(3, jnp.bfloat16)]
    with pytest.raises(ValueError, match="float32 only"):
        onednn.sgd_update(np.float32(-0.1), p, p, p, momentum=0.9, nesterov=False, decays=[0.0])
