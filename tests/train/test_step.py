"""The pure train and eval steps: a few steps on real images lower the loss; eval counts every example once."""

import gzip

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcnn.models import create_model
from jaxcnn.train.state import create_train_state, init_variables
from jaxcnn.train.step import StepOptions, cross_entropy, make_eval_step, make_train_step

MEAN, STD = (33.3,), (78.6,)


def _mnist(mnist_dir, n):
    with gzip.open(mnist_dir / "train-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16)[: n * 784].reshape(n, 28, 28, 1)
    with gzip.open(mnist_dir / "train-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)[:n].astype(np.int32)
    return images, labels


def _state(model, lr=0.05):
    variables = init_variables(model, (1, 28, 28, 1), seed=0)
    return create_train_state(model, optax.sgd(lr, momentum=0.9), variables)


def test_cross_entropy_matches_numpy():
    logits = np.array([[2.0, 1.0, -1.0], [0.5, 0.5, 3.0]], np.float32)
    labels = np.array([0, 2])
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    expected = -np.log(p[[0, 1], labels])
    np.testing.assert_allclose(cross_entropy(jnp.array(logits), jnp.array(labels), 3), expected, rtol=1e-6)
    # label smoothing 0.1 over 3 classes: targets 0.9 + 0.1/3 on the label, 0.1/3 elsewhere
    t = np.full((2, 3), 0.1 / 3)
    t[[0, 1], labels] += 0.9
    np.testing.assert_allclose(cross_entropy(jnp.array(logits), jnp.array(labels), 3, 0.1),
                               -(t * np.log(p)).sum(1), rtol=1e-6)


@pytest.mark.parametrize("name", ["lenet5", "mlp"])
def test_a_few_steps_on_real_images_lower_the_loss(mnist_dir, name):
    images, labels = _mnist(mnist_dir, 256)
    model = create_model(name, num_classes=10)
    state = _state(model)
    opts = StepOptions(num_classes=10, mean=MEAN, std=STD)
    step = jax.jit(make_train_step(opts))
    batch = {"image": jnp.asarray(images), "label": jnp.asarray(labels)}
    losses = []
    for i in range(8):
        state, metrics = step(state, batch, jax.random.PRNGKey(i))
        losses.append(float(metrics["loss"]))
    assert int(state.step) == 8
    assert losses[-1] < 0.7 * losses[0], losses
    assert np.isfinite(losses).all() and int(state.first_nonfinite[0]) == -1


def test_eval_counts_every_example_once_with_padded_last_batch(mnist_dir):
    n, batch_size = 1001, 96  # 1001 = 10 full batches + 41
    images, labels = _mnist(mnist_dir, n)
    model = create_model("mlp", num_classes=10)
    state = _state(model)
    opts = StepOptions(num_classes=10, mean=MEAN, std=STD)
    eval_step = jax.jit(make_eval_step(opts))
    totals = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
    for start in range(0, n, batch_size):
        img = np.zeros((batch_size, 28, 28, 1), np.uint8)
        lab = np.zeros((batch_size,), np.int32)
        m = np.zeros((batch_size,), bool)
        k = min(batch_size, n - start)
        img[:k], lab[:k], m[:k] = images[start:start + k], labels[start:start + k], True
        out = eval_step(state, {"image": img, "label": lab, "mask": m})
        for key in totals:
            totals[key] += float(out[key])
    # Independent reference: the whole split in one unpadded forward pass.
    x = (images.astype(np.float32) / 255.0 - MEAN[0] / 255.0) / (STD[0] / 255.0)
    logits = np.asarray(model.apply({"params": state.params}, jnp.asarray(x), train=False))
    assert totals["count"] == n
    assert totals["correct"] == int((logits.argmax(-1) == labels).sum())
    ref_loss = float(cross_entropy(jnp.asarray(logits), jnp.asarray(labels), 10).sum())
    np.testing.assert_allclose(totals["loss_sum"], ref_loss, rtol=1e-4)


def test_nonfinite_step_keeps_the_last_finite_state(mnist_dir):
    images, labels = _mnist(mnist_dir, 64)
    model = create_model("mlp", num_classes=10)
    state = _state(model, lr=1e30)  # the first update overflows the parameters, the second step's loss is inf/NaN
    step = jax.jit(make_train_step(StepOptions(num_classes=10, mean=MEAN, std=STD)))
    batch = {"image": jnp.asarray(images), "label": jnp.asarray(labels)}
    for i in range(4):
        prev = state
        state, _ = step(state, batch, jax.random.PRNGKey(i))
    bad_step, what = (int(v) for v in state.first_nonfinite)
    assert bad_step >= 0
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(state.params))
    # Once recorded, the state no longer changes.
    assert int(state.step) == int(prev.step) == bad_step


@pytest.mark.parametrize(
    "loss, bad_leaf, value, accepted, what",
    [
        (1.0, None, None, True, None),  # all finite
        (1.0, None, 1e30, True, None),  # finite gradients whose squares overflow float32: still finite, accepted
        (1.0, 1, np.nan, False, 2),  # a NaN in the second leaf (flatten order) is recorded as quantity 2
        (1.0, 0, -np.inf, False, 1),
        (np.inf, None, None, False, 0),  # the loss itself
    ],
)
def test_nonfinite_guard_decides_from_the_values(loss, bad_leaf, value, accepted, what):
    from jaxcnn.train.step import _guard_nonfinite

    model = create_model("mlp", num_classes=10, hidden=(4,))
    state = _state(model)
    grads = jax.tree_util.tree_map(jnp.ones_like, state.params)
    leaves, treedef = jax.tree_util.tree_flatten(grads)
    if value is not None:
        targets = range(len(leaves)) if bad_leaf is None else [bad_leaf]
        for k in targets:
            leaves[k] = leaves[k].reshape(-1).at[0].set(value).reshape(leaves[k].shape)
    grads = jax.tree_util.tree_unflatten(treedef, leaves)
    grad_norm = optax.tree.norm(grads)
    if value == 1e30:
        assert not np.isfinite(float(grad_norm))  # the fast check alone would have refused it
    out = jax.jit(lambda s, g, n: _guard_nonfinite(s, lambda: s.replace(step=s.step + 1), jnp.float32(loss), g, n))(
        state, grads, grad_norm)
    assert int(out.step) == (1 if accepted else 0)
    assert tuple(int(v) for v in out.first_nonfinite) == ((-1, -1) if accepted else (0, what))
