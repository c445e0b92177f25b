"""Every registered model builds, has the published parameter count, and calls as the contract says.

Shapes and parameter counts come from `jax.eval_shape` (tracing only), so even VGG and WRN-28-10 cost no
memory or compute; a few small models are run for real.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcnn.models import ModelConfigError, create_model, list_models

KEY = jax.random.PRNGKey(0)
# Compiling threefry for every parameter initializer dominates a small model's init; this key type compiles ~5x
# faster. Used where initial values are computed, not just traced.
FAST_KEY = jax.random.key(0, impl="unsafe_rbg")

# Published parameter counts: LeCun et al. 1998 (mlp, lenet5), He et al. 2015 Table 6 (CIFAR ResNets, exact
# counts as in the reference implementations), torchvision's documentation (ImageNet models at 1000 classes),
# Zagoruyko & Komodakis 2016 (WRN-28-10 on CIFAR-10).
PUBLISHED = {
    "mlp": 266_610,
    "lenet5": 61_706,
    "alexnet": 61_100_840,
    "vgg11": 132_863_336,
    "vgg13": 133_047_848,
    "vgg16": 138_357_544,
    "vgg19": 143_667_240,
    "vgg11_bn": 132_868_840,
    "vgg13_bn": 133_053_736,
    "vgg16_bn": 138_365_992,
    "vgg19_bn": 143_678_248,
    "googlenet": 6_624_904,  # torchvision, aux_logits=False
    "resnet20": 269_722,
    "resnet32": 464_154,
    "resnet56": 853_018,
    "resnet110": 1_727_962,
    "wrn28_10": 36_479_194,
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "resnext50_32x4d": 25_028_904,
    "wide_resnet50_2": 68_883_240,
}
# Papers that give millions only: WRN-16-4 2.7M, preact ResNet-164 1.7M (He et al. 2016), ResNeXt-29 8x64d 34.4M.
PUBLISHED_MILLIONS = {"wrn16_4": 2.7, "preact_resnet164": 1.7, "resnext29_8x64d": 34.4}

# The deep models share their code with a shallower registered sibling; their eval-mode pass is not traced again.
DEEP = {"resnet110", "plain110", "preact_resnet110", "preact_resnet164", "resnet101", "resnet152", "resnet1202"}


def input_shape(model) -> tuple[int, ...]:
    """Small inputs: 28x28x1 for the MNIST models, 64x64x3 for ImageNet models, 32x32x3 for the rest."""
    if type(model).__name__ in ("MLP", "LeNet5"):
        return (2, 28, 28, 1)
    return (2, 64, 64, 3) if model.num_classes == 1000 else (2, 32, 32, 3)


def n_params(tree) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree))


def abstract_train_pass(model, shape):
    """(features, variables) of one train-mode pass with features, as shapes only."""
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    return jax.eval_shape(
        lambda x: model.init_with_output({"params": KEY, "dropout": KEY}, x, train=True, return_features=True), x
    )


def expected_feature_names(name: str) -> list[str]:
    if name in ("mlp",):
        return ["block1", "block2"]
    if name == "lenet5":
        return ["block1", "block2"]
    if name.startswith("alexnet"):
        return [f"block{i}" for i in range(1, 6)]
    if name.startswith("vgg"):
        return [f"stage{i}" for i in range(1, 6)]
    if name == "googlenet":
        return ["stem", "stage3", "stage4", "stage5"]
    if name == "nin":
        return ["block1", "block2", "block3", "class_maps"]
    imagenet = name.startswith(("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50", "wide_"))
    return ["stem"] + [f"stage{i}" for i in range(1, 5 if imagenet or name == "preact_resnet18" else 4)]


@pytest.mark.parametrize("name", [n for n in list_models() if n != "resnet1202"])
def test_every_model_shapes_features_and_parameter_count(name):
    model = create_model(name)
    shape = input_shape(model)
    features, variables = abstract_train_pass(model, shape)
    assert list(features) == expected_feature_names(name) + ["pre_logits", "logits"]
    assert features["logits"].shape == (shape[0], model.num_classes)
    assert features["logits"].dtype == jnp.float32
    assert features["pre_logits"].shape[0] == shape[0] and features["pre_logits"].ndim == 2
    count = n_params(variables["params"])
    if name in PUBLISHED:
        assert count == PUBLISHED[name]
    if name in PUBLISHED_MILLIONS:
        assert round(count / 1e6, 1) == PUBLISHED_MILLIONS[name]
    # BatchNorm statistics exist exactly when the model normalises with BatchNorm.
    assert ("batch_stats" in variables) == (model.norm == "batch")
    if name not in DEEP:
        x = jax.ShapeDtypeStruct(shape, jnp.float32)
        logits = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
        assert logits.shape == (shape[0], model.num_classes)


@pytest.mark.slow
def test_resnet1202_shape_and_size():
    model = create_model("resnet1202")
    features, variables = abstract_train_pass(model, (2, 32, 32, 3))
    assert features["logits"].shape == (2, 10)
    # He et al. (2015), Table 6: 19.4M parameters; the count is also exactly linear in the blocks per stage.
    assert round(n_params(variables["params"]) / 1e6, 1) == 19.4
    assert n_params(variables["params"]) == cifar_resnet_count(200)


def test_imagenet_models_count_the_same_at_224():
    """The ImageNet heads do not depend on the input size (GAP, or the adaptive pool of VGG/AlexNet)."""
    for name in ("resnet18", "vgg11", "alexnet"):
        _, variables = abstract_train_pass(create_model(name), (1, 224, 224, 3))
        assert n_params(variables["params"]) == PUBLISHED[name]


# ---------------------------------------------------------------------------------------------------------
# Counts from the architecture descriptions, written out by hand
# ---------------------------------------------------------------------------------------------------------


def cifar_resnet_count(n: int, widths=(16, 32, 64), stem: int = 16, classes: int = 10, norm: bool = True) -> int:
    """He et al. (2015) CIFAR ResNet with option-A shortcuts: 3x3 stem, 3 stages of n basic blocks, GAP, fc."""
    extra = 2 if norm else 1  # per channel: BN scale + shift, or a conv bias
    total = 27 * stem + extra * stem
    cin = stem
    for w in widths:
        for _ in range(n):
            total += 9 * cin * w + extra * w + 9 * w * w + extra * w
            cin = w
    return total + cin * classes + classes


def test_cifar_resnet_counts_follow_the_architecture():
    for depth, published in ((20, 269_722), (32, 464_154), (56, 853_018), (110, 1_727_962)):
        assert cifar_resnet_count((depth - 2) // 6) == published


def test_nin_alexnet_cifar_googlenet_paper_counts():
    def conv(k, cin, cout, bias=True):
        return k * k * cin * cout + (cout if bias else 0)

    nin = (conv(5, 3, 192) + conv(1, 192, 160) + conv(1, 160, 96) + conv(5, 96, 192) + 2 * conv(1, 192, 192)
           + conv(3, 192, 192) + conv(1, 192, 192) + conv(1, 192, 10))
    alexnet_cifar = (conv(5, 3, 64) + conv(5, 64, 192) + conv(3, 192, 384) + conv(3, 384, 256) + conv(3, 256, 256)
                     + (3 * 3 * 256 * 1024 + 1024) + (1024 * 1024 + 1024) + (1024 * 10 + 10))
    # The paper's 5x5 third branch instead of torchvision's 3x3: (25 - 9) * ch5x5red * ch5x5 more per module.
    reds = [(16, 32), (32, 96), (16, 48), (24, 64), (24, 64), (32, 64), (32, 128), (32, 128), (48, 128)]
    googlenet5 = PUBLISHED["googlenet"] + 16 * sum(r * c for r, c in reds)
    for name, knobs, shape, expected in (
        ("nin", {}, (1, 32, 32, 3), nin),
        ("alexnet_cifar", {}, (1, 32, 32, 3), alexnet_cifar),
        ("googlenet", {"kernel5": 5}, (1, 64, 64, 3), googlenet5),
    ):
        _, variables = abstract_train_pass(create_model(name, **knobs), shape)
        assert n_params(variables["params"]) == expected, name


def test_preact_resnet18_is_kuangliu_plus_the_final_norm():
    # kuangliu/pytorch-cifar PreActResNet18: 11,171,146 parameters; He et al.'s final BN-ReLU adds 2 x 512.
    _, variables = abstract_train_pass(create_model("preact_resnet18"), (1, 32, 32, 3))
    assert n_params(variables["params"]) == 11_171_146 + 2 * 512


# ---------------------------------------------------------------------------------------------------------
# Knobs
# ---------------------------------------------------------------------------------------------------------


def test_knob_changes_change_what_they_should():
    shape = (2, 32, 32, 3)

    def count(name, **knobs):
        return n_params(abstract_train_pass(create_model(name, **knobs), shape)[1]["params"])

    assert count("resnet20", width=2) == cifar_resnet_count(3, widths=(32, 64, 128))
    assert count("resnet20", norm="none") == cifar_resnet_count(3, norm=False)
    assert count("resnet20", residual=False) == count("resnet20")  # option A shortcuts have no parameters
    assert count("resnet20", num_classes=100) == cifar_resnet_count(3, classes=100)
    # Option B: a projection (1x1 conv + BN) where the shape changes, in stages 2 and 3.
    assert count("resnet20", shortcut="B") == cifar_resnet_count(3) + (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)
    assert count("wrn16_4", residual=False) == count("wrn16_4") - (16 * 64 + 64 * 128 + 128 * 256)
    # Pooling and activation have no parameters; 3 input channels instead of 1 add 5 x 5 x 2 x 6 to conv1.
    assert count("lenet5", pool="l2", act="gelu") == PUBLISHED["lenet5"] + 5 * 5 * 2 * 6
    assert "batch_stats" in abstract_train_pass(create_model("lenet5", norm="batch"), shape)[1]
    features, _ = abstract_train_pass(create_model("resnet20", downsample="pool", pool="avg"), shape)
    assert [features[f"stage{i}"].shape[1] for i in (1, 2, 3)] == [32, 16, 8]


@pytest.fixture(scope="module")
def images():
    return jax.random.normal(jax.random.PRNGKey(1), (4, 28, 28, 1))


def test_lenet5_pool_and_act_knobs_change_the_function(images):
    outputs = {}
    variables = jax.jit(create_model("lenet5").init)(FAST_KEY, images)  # pool and act add no parameters
    for knobs in ({}, {"pool": "avg"}, {"pool": "l2"}, {"act": "gelu"}, {"act": "tanh"}):
        model = create_model("lenet5", **knobs)
        outputs[tuple(knobs.items())] = np.asarray(jax.jit(model.apply)(variables, images))
    values = list(outputs.values())
    assert all(np.isfinite(v).all() for v in values)
    for i in range(len(values)):
        for j in range(i):
            assert not np.allclose(values[i], values[j])


def test_small_models_run_in_train_and_eval_mode(images):
    for name, knobs, x in (
        ("mlp", {"dropout": 0.5, "norm": "batch"}, images),
        ("lenet5", {"norm": "batch"}, images),
        ("resnet20", {}, jnp.tile(images[:, :16, :16], (1, 1, 1, 3))),
    ):
        model = create_model(name, **knobs)
        variables = jax.jit(model.init)(FAST_KEY, x)
        train = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))
        logits, updates = train(variables, x, rngs={"dropout": FAST_KEY})
        evaluated = jax.jit(functools.partial(model.apply, train=False))(variables, x)
        assert logits.shape == evaluated.shape == (x.shape[0], 10)
        assert np.isfinite(np.asarray(logits)).all() and np.isfinite(np.asarray(evaluated)).all()
        # Train mode normalises with the batch and moves the running statistics; eval mode uses them.
        assert not np.allclose(logits, evaluated)
        before, after = variables["batch_stats"], updates["batch_stats"]
        assert any(not np.allclose(a, b) for a, b in zip(jax.tree_util.tree_leaves(before),
                                                          jax.tree_util.tree_leaves(after)))


def test_features_logits_equal_the_plain_output(images):
    model = create_model("nin", dropout=0.0)
    x = jnp.tile(images, (1, 1, 1, 3))
    variables = jax.jit(model.init)(FAST_KEY, x)
    features = jax.jit(lambda v, x: model.apply(v, x, return_features=True))(variables, x)
    np.testing.assert_allclose(features["logits"], jax.jit(model.apply)(variables, x), rtol=1e-6)
    # NiN's class maps averaged are the logits; 1x1 conv and averaging commute, so the pre-logits through the
    # head's kernel give them too.
    np.testing.assert_allclose(features["class_maps"].mean(axis=(1, 2)), features["logits"], rtol=1e-5, atol=1e-6)
    head = variables["params"]["head"]["logits"]
    via_pre = features["pre_logits"] @ head["kernel"][0, 0] + head["bias"]
    np.testing.assert_allclose(via_pre, features["logits"], rtol=1e-4, atol=1e-5)


def test_bfloat16_compute_keeps_float32_parameters_and_logits():
    model = create_model("resnet20", dtype=jnp.bfloat16)  # a jnp dtype is accepted and stored by name
    assert model.dtype == "bfloat16"
    features, variables = abstract_train_pass(model, (2, 16, 16, 3))
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(variables["params"])} == {jnp.dtype("float32")}
    assert features["stage3"].dtype == jnp.bfloat16
    assert features["logits"].dtype == jnp.float32


def test_bn_axis_name_syncs_batchnorm_across_shards(images):
    """With bn_axis_name, BatchNorm over two shards of a batch equals BatchNorm over the whole batch."""
    x = images[:4]
    whole = create_model("lenet5", norm="batch")
    sharded = create_model("lenet5", norm="batch", bn_axis_name="batch")
    variables = jax.jit(whole.init)(FAST_KEY, x)
    expected, _ = jax.jit(lambda v, x: whole.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
    per_shard = jax.jit(jax.vmap(
        lambda xs: sharded.apply(variables, xs, train=True, mutable=["batch_stats"])[0], axis_name="batch"
    ))(x.reshape(2, 2, *x.shape[1:]))
    np.testing.assert_allclose(per_shard.reshape(4, -1), expected, rtol=1e-4, atol=1e-5)


def test_ghost_batchnorm_knob(images):
    model = create_model("lenet5", norm="batch", bn_virtual_batch_size=2)
    variables = jax.jit(model.init)(FAST_KEY, images[:4])
    logits, _ = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, images[:4])
    assert logits.shape == (4, 10)
    with pytest.raises(ValueError, match="virtual_batch_size=2"):
        jax.eval_shape(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]), variables, images[:3])


# ---------------------------------------------------------------------------------------------------------
# Bad configurations fail early, saying what to do
# ---------------------------------------------------------------------------------------------------------


def test_groups_that_do_not_divide_the_channels_fail_at_construction():
    with pytest.raises(ModelConfigError, match=r"groups=3 .*stem_width has 16"):
        create_model("resnet20", groups=3)
    create_model("resnet20", groups=2)  # 16, 32, 64 are even: fine


def test_feature_map_shrinking_below_1x1_names_the_layer_and_shape():
    model = create_model("resnet18")  # ImageNet layout: stride 32 in all
    x = jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32)
    with pytest.raises(ValueError, match=r"ResNet stage3 .*1x1 feature map \(shape \(1, 1, 1, 128\)\)"):
        jax.eval_shape(lambda x: model.init(KEY, x), x)
    jax.eval_shape(lambda x: model.init(KEY, x), jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
    lenet = create_model("lenet5", pad_to=None)
    with pytest.raises(ValueError, match=r"block1_conv.*\(1, 4, 4, 1\)"):
        jax.eval_shape(lambda x: lenet.init(KEY, x), jax.ShapeDtypeStruct((1, 4, 4, 1), jnp.float32))


def test_inconsistent_knobs_fail_at_construction():
    with pytest.raises(ModelConfigError, match="pre-activation"):
        create_model("preact_resnet18", zero_init_residual=True)
    with pytest.raises(ModelConfigError, match="same length"):
        create_model("resnet20", stage_sizes=(3, 3))
    with pytest.raises(ModelConfigError, match=r"dropout=1.5"):
        create_model("vgg11", dropout=1.5)
    with pytest.raises(ModelConfigError, match=r"head_hidden=\(120, 0\)"):
        create_model("lenet5", head_hidden=(120, 0))


def test_images_without_a_batch_or_channel_axis_are_refused():
    model = create_model("resnet20")
    with pytest.raises(ValueError, match=r"\[N, H, W, C\], got \(32, 32, 3\)"):
        jax.eval_shape(lambda x: model.init(KEY, x), jax.ShapeDtypeStruct((32, 32, 3), jnp.float32))
