"""Transfer learning: loading by name into a model with another head, freezing by pattern (BatchNorm statistics
included), the unfreeze schedule against a from-scratch NumPy optimizer, and a fine-tuning run through the loop."""

from __future__ import annotations

import gzip

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcnn.config import CheckpointConfig, Config, ConfigError, TransferConfig
from jaxcnn.models import create_model
from jaxcnn.train import transfer
from jaxcnn.train.checkpoint import RunCheckpointer
from jaxcnn.train.state import create_train_state, init_variables, leaf_names
from jaxcnn.train.step import StepOptions, make_train_step

MEAN, STD = (33.3,), (78.6,)


def named(tree) -> dict[str, np.ndarray]:
    return dict(zip(leaf_names(tree), (np.asarray(x) for x in jax.tree_util.tree_leaves(tree))))


def lenet(num_classes: int, seed: int, **knobs):
    model = create_model("lenet5", num_classes=num_classes, norm="batch", **knobs)
    return model, init_variables(model, (1, 28, 28, 1), seed)


def trained_like(variables, seed: int = 7):
    """The variables with every value replaced (as if trained), so loaded values are told apart from fresh ones."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda x: jnp.asarray(rng.standard_normal(x.shape).astype(x.dtype)), variables)


# ---------------------------------------------------------------------------------------------------------
# Loading by name
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def source(tmp_path):
    """A 'pretrained' 10-class LeNet-5 with BatchNorm, exported three ways: msgpack, run workdir, step folder."""
    model, variables = lenet(10, seed=0)
    variables = trained_like(variables)
    state = create_train_state(model, optax.sgd(0.1), variables)
    ck = RunCheckpointer(tmp_path / "run", Config(checkpoint=CheckpointConfig()))
    ck.save_now(state, 0)
    ck.close()
    path = transfer.export_params(state, tmp_path / "exported.msgpack")
    return variables, {"msgpack": path, "run": tmp_path / "run", "checkpoints": tmp_path / "run" / "checkpoints",
                       "step": tmp_path / "run" / "checkpoints" / "0"}


@pytest.mark.parametrize("kind", ["msgpack", "run", "checkpoints", "step"])
def test_load_by_name_into_a_model_with_another_head(source, kind):
    src_vars, paths = source
    _, fresh = lenet(5, seed=1)  # 5 classes: the logits layer differs in shape
    loaded, report = transfer.load_pretrained(fresh, str(paths[kind]))

    src, new, init = (named(src_vars["params"]), named(loaded["params"]), named(fresh["params"]))
    for name in new:
        if name.startswith("head/logits/"):
            assert np.array_equal(new[name], init[name]), name  # fresh initialisation kept
        else:
            assert np.array_equal(new[name], src[name]), name
    for name, x in named(loaded["batch_stats"]).items():
        assert np.array_equal(x, named(src_vars["batch_stats"])[name])
    assert sorted(n for n, _ in report.reinitialised) == ["params/head/logits/bias", "params/head/logits/kernel"]
    assert len(report.loaded) == 10 + 4 and not report.ignored
    text = report.describe()
    assert "loaded 14 arrays" in text
    assert "params/head/logits/kernel: shape (84, 5) here, (84, 10) in the source" in text


def test_leaves_missing_on_either_side_are_listed(source):
    src_vars, paths = source
    _, fresh = lenet(10, seed=1, head_hidden=(120,))  # no fc2: the source's fc2 is ignored, logits change shape
    loaded, report = transfer.load_pretrained(fresh, str(paths["msgpack"]))
    assert report.ignored == ["params/head/fc2/bias", "params/head/fc2/kernel"]
    assert ("params/head/logits/kernel", "shape (120, 10) here, (84, 10) in the source") in report.reinitialised
    assert np.array_equal(named(loaded["params"])["head/fc1/kernel"], named(src_vars["params"])["head/fc1/kernel"])


def test_a_source_that_matches_nothing_is_a_clear_error(source, tmp_path):
    _, paths = source
    other = nn.Dense(10)  # another family: its names (Dense_0-style at the top) match nothing
    with pytest.raises(ValueError, match="no variable of this model matches the source"):
        transfer.load_pretrained({"params": other.init(jax.random.PRNGKey(0), jnp.zeros((1, 4)))["params"]},
                                 str(paths["msgpack"]))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        transfer.load_pretrained({"params": {}}, str(tmp_path / "nowhere"))
    (tmp_path / "junk.msgpack").write_bytes(b"\x00not msgpack")
    with pytest.raises(ValueError, match="not a msgpack file"):
        transfer.load_pretrained({"params": {}}, str(tmp_path / "junk.msgpack"))


def test_export_from_a_run_matches_export_from_the_state(source, tmp_path):
    src_vars, paths = source
    from flax.serialization import msgpack_restore

    again = msgpack_restore(transfer.export_params(paths["run"], tmp_path / "again.msgpack").read_bytes())
    for coll in ("params", "batch_stats"):
        a, b = named(again[coll]), named(src_vars[coll])
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------------------
# Freezing
# ---------------------------------------------------------------------------------------------------------


def _mnist(mnist_dir, n):
    with gzip.open(mnist_dir / "train-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16)[: n * 784].reshape(n, 28, 28, 1)
    with gzip.open(mnist_dir / "train-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)[:n].astype(np.int32)
    return {"image": jnp.asarray(images), "label": jnp.asarray(labels)}


def run_steps(mnist_dir, cfg: TransferConfig, steps: int, steps_per_epoch: int = 100):
    """`steps` real train steps of LeNet-5 (BatchNorm) on 64 MNIST images with `cfg`'s freezing; the states."""
    model, variables = lenet(10, seed=0)
    tx = transfer.apply_freeze(optax.sgd(0.05, momentum=0.9), variables["params"], cfg, steps_per_epoch)
    state = create_train_state(model, tx, variables)
    opts = StepOptions(num_classes=10, mean=MEAN, std=STD,
                       freeze_stats=transfer.stats_freezer(variables, cfg, steps_per_epoch))
    step = jax.jit(make_train_step(opts))
    batch = _mnist(mnist_dir, 64)
    states = [state]
    for i in range(steps):
        state, _ = step(state, batch, jax.random.PRNGKey(i))
        states.append(state)
    return states


def test_frozen_params_and_their_batchnorm_statistics_stay_bit_identical(mnist_dir):
    states = run_steps(mnist_dir, TransferConfig(freeze=("^block1_",)), steps=4)
    first, last = states[0], states[-1]
    p0, p1 = named(first.params), named(last.params)
    for name in p0:
        if name.startswith("block1_"):
            assert np.array_equal(p0[name], p1[name]), name
        else:
            assert not np.array_equal(p0[name], p1[name]), name
    s0, s1 = named(first.batch_stats), named(last.batch_stats)
    assert np.array_equal(s0["block1_norm/mean"], s1["block1_norm/mean"])
    assert np.array_equal(s0["block1_norm/var"], s1["block1_norm/var"])
    assert not np.array_equal(s0["block2_norm/mean"], s1["block2_norm/mean"])


def test_unfreeze_schedule_starts_training_at_the_epoch(mnist_dir):
    # 4 steps per epoch, unfreeze at epoch 0.5: frozen for the updates of steps 0 and 1, trained from step 2.
    states = run_steps(mnist_dir, TransferConfig(freeze=("^block1_",), unfreeze_at_epoch=0.5), steps=4,
                       steps_per_epoch=4)
    kernels = [named(s.params)["block1_conv/kernel"] for s in states]
    means = [named(s.batch_stats)["block1_norm/mean"] for s in states]
    assert np.array_equal(kernels[0], kernels[1]) and np.array_equal(kernels[1], kernels[2])
    assert not np.array_equal(kernels[2], kernels[3]) and not np.array_equal(kernels[3], kernels[4])
    assert np.array_equal(means[0], means[2]) and not np.array_equal(means[2], means[3])


def test_unfreeze_matches_a_numpy_momentum_sgd():
    """Frozen leaf 'a' (unfrozen at step 2) and trainable 'b' under SGD with momentum, fed fixed gradients, against
    a from-scratch NumPy loop: 'a's momentum accumulates from step 0, its updates apply from step 2."""
    lr, mu, start = 0.1, 0.9, 2
    rng = np.random.default_rng(0)
    grads = [{"a": rng.standard_normal(3).astype(np.float32), "b": rng.standard_normal(2).astype(np.float32)}
             for _ in range(5)]
    params = {"a": np.ones(3, np.float32), "b": np.zeros(2, np.float32)}
    tx = transfer.apply_freeze(optax.sgd(lr, momentum=mu), params,
                               TransferConfig(freeze=("^a$",), unfreeze_at_epoch=0.5), steps_per_epoch=4)
    opt_state = tx.init(params)
    p = {k: jnp.asarray(v) for k, v in params.items()}
    ref = {k: v.copy() for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in params.items()}
    for t, g in enumerate(grads):
        updates, opt_state = tx.update({k: jnp.asarray(v) for k, v in g.items()}, opt_state, p)
        p = optax.apply_updates(p, updates)
        for k, gk in g.items():
            m[k] = mu * m[k] + gk
            if k == "b" or t >= start:
                ref[k] = ref[k] - lr * m[k]
        for k, expected in ref.items():
            np.testing.assert_allclose(np.asarray(p[k]), expected, rtol=1e-6, err_msg=f"{k} after step {t}")


def test_freeze_patterns_are_checked():
    params = {"Conv_0": {"kernel": jnp.zeros((3, 3, 1, 4))}, "Dense_0": {"kernel": jnp.zeros((4, 2))}}
    tx = optax.sgd(0.1)
    assert transfer.apply_freeze(tx, params, TransferConfig(), 10) is tx
    with pytest.raises(ConfigError, match="'Conv_9' matches no parameter; the parameters are: Conv_0/kernel, "
                                          "Dense_0/kernel"):
        transfer.apply_freeze(tx, params, TransferConfig(freeze=("Conv_9",)), 10)
    with pytest.raises(ConfigError, match="not a regular expression"):
        transfer.apply_freeze(tx, params, TransferConfig(freeze=("(",)), 10)
    with pytest.raises(ConfigError, match="nothing to unfreeze"):
        transfer.apply_freeze(tx, params, TransferConfig(unfreeze_at_epoch=1.0), 10)


def test_frozen_stats_mask_follows_the_layer_params():
    _, variables = lenet(10, seed=0)
    mask = named(transfer.frozen_stats_mask(variables, ("^block1_conv", "^block1_norm/scale")))
    assert not any(mask.values())  # block1_norm's bias is not frozen, so its statistics are not either
    mask = named(transfer.frozen_stats_mask(variables, ("^block1_norm/",)))
    assert mask == {"block1_norm/mean": True, "block1_norm/var": True, "block2_norm/mean": False,
                    "block2_norm/var": False}
    assert transfer.stats_freezer(variables, TransferConfig(freeze=("^head/",)), 10) is None


# ---------------------------------------------------------------------------------------------------------
# Through the loop
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_fine_tuning_run_loads_freezes_and_reports(tmp_path, mnist_dir, capsys):
    from jaxcnn.config import load_experiment
    from jaxcnn.train.checkpoint import read_step
    from jaxcnn.train.loop import train

    base = ["data.train_limit=256", "data.test_limit=100", "data.batch_size=32", "data.eval_batch_size=100",
            "model.norm=batch", "schedule.warmup_epochs=0", "train.progress=false", f"data.data_dir={mnist_dir}"]
    experiment = "experiments/mnist_lenet5.py"
    train(load_experiment(experiment, [*base, "train.steps=8"]), tmp_path / "pre")
    train(load_experiment(experiment, [*base, "train.steps=6", f"transfer.init_from={tmp_path / 'pre'}",
                                       "transfer.freeze=^block"]), tmp_path / "fine")
    err = capsys.readouterr().err
    assert "transfer: loaded 16 arrays from" in err  # 12 params + 4 BatchNorm statistics
    pre = named(read_step(tmp_path / "pre" / "checkpoints" / "8")[0])
    fine = named(read_step(tmp_path / "fine" / "checkpoints" / "6")[0])
    for name in pre:
        if name.startswith(("params/block", "batch_stats/block")):
            assert np.array_equal(pre[name], fine[name]), name
        elif name.startswith("params/head"):
            assert not np.array_equal(pre[name], fine[name]), name


def test_the_transfer_experiment_configs(tmp_path):
    from jaxcnn.config import load_experiment_module

    exp = load_experiment_module("experiments/transfer_mnist_to_fashion.py")
    pre = exp.get_config()
    assert (pre.data.name, pre.model["name"], pre.train.epochs) == ("mnist", "lenet5", 2)
    runs = {v: exp.finetune_config(v, tmp_path / "pre", seed=1, target_limit=100) for v in exp.VARIANTS}
    for cfg in runs.values():
        assert (cfg.data.name, cfg.data.train_limit, cfg.seed, cfg.train.steps) == ("fashion_mnist", 100, 1, 200)
    assert runs["scratch"].transfer == TransferConfig()
    assert runs["finetune"].transfer == TransferConfig(init_from=str(tmp_path / "pre"))
    assert runs["frozen"].transfer == TransferConfig(init_from=str(tmp_path / "pre"), freeze=("^block",))
    # 100 images in batches of 50: 2 steps per epoch; unfreezing after 100 of the 200 steps is epoch 50.
    assert runs["unfreeze"].transfer.unfreeze_at_epoch == 50
    assert transfer.unfreeze_step(runs["unfreeze"].transfer, 2) == 100


def test_the_transfer_table_compares_each_start_with_scratch():
    from jaxcnn.config import load_experiment_module

    exp = load_experiment_module("experiments/transfer_mnist_to_fashion.py")

    def summaries(accs):
        return [{"test_accuracy": a, "test_loss": 1.0, "wall_s": 5.0, "test_count": 10000} for a in accs]

    runs = {(100, "scratch"): summaries([0.60, 0.61, 0.62, 0.63, 0.64]),
            (100, "finetune"): summaries([0.61, 0.62, 0.63, 0.64, 0.65])}
    table = exp.results_table({"steps": 936, "batch_size": 128, "test_accuracy": 0.99, "wall_s": 20.0}, runs)
    # The same spread in both (s^2 = 2.5e-4, n = 5): se = 0.01, dof 8, t = 2.306004: +1.00 [-1.31, +3.31] points.
    assert "| 100 | scratch: random init | everything | 62.00 ± 1.58 | baseline |" in table
    assert "| 100 | finetune: MNIST weights | everything | 63.00 ± 1.58 | +1.00 [-1.31, +3.31] |" in table
