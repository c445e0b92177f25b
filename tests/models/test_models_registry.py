"""The registry: names, knobs and their types, and the errors that list what is valid."""

from __future__ import annotations

import ast
import functools
import typing
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcnn.config import ConfigError, parse_value, validate_model_section
from jaxcnn.models import (
    ModelConfigError,
    create_model,
    list_models,
    model_defaults,
    model_description,
    model_knobs,
    register_model,
)
from jaxcnn.models.registry import _REGISTRY

SIMPLE = (int, float, bool, str, type(None))


def test_list_models_and_patterns():
    names = list_models()
    assert names == sorted(names) and len(names) == len(set(names))
    for required in ("mlp", "lenet5", "alexnet", "alexnet_cifar", "vgg16", "vgg16_bn", "googlenet", "nin",
                     "resnet20", "resnet1202", "plain56", "preact_resnet164", "wrn28_10", "resnext29_8x64d",
                     "resnet152", "resnext50_32x4d", "wide_resnet50_2"):
        assert required in names
    assert list_models("vgg*_bn") == ["vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn"]
    assert list_models("nothing*") == []


def test_every_registered_name_is_written_literally_in_a_model_file():
    """`grep '"resnet50"' jaxcnn/models` finds every model: each name is a string literal in its register call,
    outside any loop (no names built from a table or an f-string)."""
    found, problems = set(), []
    for path in sorted((Path(__file__).parents[2] / "jaxcnn" / "models").glob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        loops = [node for node in ast.walk(tree) if isinstance(node, (ast.For, ast.While, ast.comprehension))]
        in_loop = {id(n) for loop in loops for n in ast.walk(loop)}
        for node in ast.walk(tree):
            func = getattr(node, "func", None)
            if not (isinstance(node, ast.Call) and getattr(func, "id", getattr(func, "attr", None)) in
                    ("register", "register_model")) or path.name == "registry.py":
                continue
            first = node.args[0] if node.args else None
            if not (isinstance(first, ast.Constant) and isinstance(first.value, str)) or id(node) in in_loop:
                problems.append(f"{path.name}:{node.lineno}: {ast.unparse(node)[:80]}")
            else:
                found.add(first.value)
    assert not problems, "register calls without a literal name, or inside a loop:\n" + "\n".join(problems)
    assert found == {n for n in list_models() if _REGISTRY[n].module.__module__.startswith("jaxcnn.models.")}


def test_unknown_model_lists_close_matches_first():
    with pytest.raises(ModelConfigError) as info:
        create_model("resnet21")
    message = str(info.value)
    assert "unknown model 'resnet21'" in message
    close = message.split("did you mean ")[1].split("?")[0].split(", ")
    assert "resnet20" in close
    listed = message.split("valid models: ")[1].split(", ")
    assert listed[: len(close)] == close and set(listed) == set(list_models())


def test_unknown_knob_suggests_and_lists_the_valid_ones():
    with pytest.raises(ModelConfigError, match=r"no knob 'pol' \(did you mean pool\?\); valid knobs: .*pad_to"):
        create_model("lenet5", pol="avg")


@pytest.mark.parametrize(
    "knobs, pattern",
    [
        ({"pool": "median"}, r"pool='median' is not valid; expected one of 'max', 'avg', 'l2'"),
        ({"norm": "instance"}, r"norm='instance' .*'batch', 'group', 'layer', 'none'"),
        ({"act": "relu7"}, r"act='relu7' .*'gelu'"),
        ({"pad_to": "32"}, r"pad_to='32' .*int or None"),
        ({"width": "2"}, r"width='2' .*float"),
        ({"head_hidden": 120}, r"head_hidden=120 .*tuple of int"),
        ({"residual": 1}, r"no knob 'residual'"),  # lenet5 has no residual knob
        ({"dtype": "float16"}, r"dtype='float16' .*'float32', 'bfloat16'"),
        ({"conv_init": "xavier"}, r"conv_init='xavier' .*'he_normal', 'he_uniform', 'lecun_normal', 'torch'"),
    ],
)
def test_wrong_values_name_the_knob_and_the_choices(knobs, pattern):
    with pytest.raises(ModelConfigError, match=pattern):
        create_model("lenet5", **knobs)


def test_values_are_normalised():
    model = create_model("lenet5", head_hidden=[100, 50], width=2, dtype=jnp.bfloat16, num_classes=5)
    assert model.head_hidden == (100, 50) and isinstance(model.width, float) and model.width == 2.0
    assert model.dtype == "bfloat16" and model.num_classes == 5
    with pytest.raises(ModelConfigError, match="residual=1"):
        create_model("resnet20", residual=1)  # bools are not ints, nor ints bools


def test_knobs_are_annotated_with_simple_types_and_round_trip_through_the_config_parser():
    for name in list_models():
        knobs, defaults = model_knobs(name), model_defaults(name)
        assert set(knobs) == set(defaults) and "parent" not in knobs and "name" not in knobs
        assert {"num_classes", "norm", "act", "dtype", "param_dtype", "bn_axis_name",
                "bn_virtual_batch_size", "bn_momentum", "bn_epsilon", "dropout"} <= set(knobs)
        for knob, tp in knobs.items():
            _check_simple(tp, f"{name}.{knob}")
            value = defaults[knob]
            assert parse_value(value, tp, knob) == value
            text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
            assert parse_value(text, tp, knob) == value, (name, knob, text)
        assert model_description(name)


def _check_simple(tp, where):
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        assert all(isinstance(a, SIMPLE) for a in typing.get_args(tp)), where
    elif origin in (typing.Union, __import__("types").UnionType):
        for a in typing.get_args(tp):
            _check_simple(a, where)
    elif origin is tuple:
        assert typing.get_args(tp)[1] is Ellipsis and typing.get_args(tp)[0] is int, where
    else:
        assert tp in SIMPLE, where


def test_config_overrides_are_checked_against_the_model():
    assert validate_model_section({"name": "resnet20", "pool": "avg", "width": "2", "stage_sizes": "2,2,2"}) == {
        "name": "resnet20", "pool": "avg", "width": 2.0, "stage_sizes": (2, 2, 2)}
    with pytest.raises(ConfigError, match="choose one of: max, avg, l2"):
        validate_model_section({"name": "resnet20", "pool": "median"})
    with pytest.raises(ConfigError, match="valid knobs"):
        validate_model_section({"name": "mlp", "pool": "avg"})


def test_defaults_of_a_name_override_the_class_defaults():
    assert model_defaults("resnet56")["stage_sizes"] == (9, 9, 9)
    assert model_defaults("resnet18")["num_classes"] == 1000 and model_defaults("resnet20")["num_classes"] == 10
    assert model_defaults("vgg16_bn")["norm"] == "batch" and model_defaults("vgg16")["norm"] == "none"
    assert create_model("resnet56", stage_sizes=(1, 1, 1)).stage_sizes == (1, 1, 1)


def test_registering_checks_the_defaults_and_refuses_a_taken_name():
    from jaxcnn.models.lenet import LeNet5

    with pytest.raises(ModelConfigError, match="no knob 'poool'"):
        register_model("lenet5_typo_test", functools.partial(LeNet5, poool="avg"))
    with pytest.raises(ModelConfigError, match="pool='median'"):
        register_model("lenet5_bad_test", LeNet5, pool="median")
    assert "lenet5_typo_test" not in _REGISTRY and "lenet5_bad_test" not in _REGISTRY

    class Other(nn.Module):
        @nn.compact
        def __call__(self, x):
            return x

    with pytest.raises(ModelConfigError, match="already registered"):
        register_model("lenet5", Other)
    with pytest.raises(ModelConfigError, match="flax.linen.Module class"):
        register_model("not_a_module_test", object)


@pytest.mark.parametrize("name, bound, std", [
    ("torch", lambda fan_in: 1 / np.sqrt(fan_in), lambda fan_in: 1 / np.sqrt(3 * fan_in)),
    ("he_uniform", lambda fan_in: np.sqrt(6 / fan_in), lambda fan_in: np.sqrt(2 / fan_in)),
    ("he_normal", None, lambda fan_in: np.sqrt(2 / fan_in)),
])
def test_conv_init_knob_sets_every_conv_kernel(name, bound, std):
    """PyTorch's default conv init is U(+-1/sqrt(fan_in)) (kaiming_uniform_ with a=sqrt(5)); He: std sqrt(2/fan_in)."""
    model = create_model("vgg11_bn", num_classes=10, stage_sizes=(1, 1, 1, 1), stage_widths=(16, 32, 64, 128),
                         head="gap", head_hidden=(), dropout=0.0, conv_init=name)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))["params"]
    kernels = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params)
               if leaf.ndim == 4 and "kernel" in jax.tree_util.keystr(path)]
    assert len(kernels) == 4
    for k in kernels:
        fan_in = k.shape[0] * k.shape[1] * k.shape[2]
        if bound is not None:
            assert float(jnp.max(jnp.abs(k))) <= bound(fan_in) * (1 + 1e-6)
        if k.size >= 4096:  # enough samples for the standard deviation to be within 5%
            assert abs(float(jnp.std(k)) / std(fan_in) - 1) < 0.05, (name, k.shape)
