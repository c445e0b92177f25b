"""Config overrides: type checking, unknown keys and choices give errors that name the key and the valid values."""

import json
import textwrap

import pytest

from jaxcnn.config import (
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    diff_configs,
    load_experiment,
)

EXPERIMENT = "experiments/fashion_mnist_lenet5.py"


def test_overrides_are_typed():
    cfg = apply_overrides(Config(), ["optim.lr=0.05", "data.batch_size=64", "optim.nesterov=true",
                                     "schedule.decay_epochs=30,60", "optim.grad_clip_norm=none", "seed=3"])
    assert cfg.optim.lr == 0.05 and isinstance(cfg.optim.lr, float)
    assert cfg.data.batch_size == 64 and cfg.optim.nesterov is True
    assert cfg.schedule.decay_epochs == (30.0, 60.0)
    assert cfg.optim.grad_clip_norm is None and cfg.seed == 3


@pytest.mark.parametrize(
    "override, fragments",
    [
        ("optim.lrr=0.1", ["optim.lrr", "valid keys in optim", "lr"]),
        ("optimizer.lr=0.1", ["optimizer.lr", "top-level keys", "optim"]),
        ("data.batch_size=big", ["data.batch_size", "int"]),
        ("optim.name=rmsprop", ["optim.name", "sgd", "adam", "lars"]),
        ("data.flip=maybe", ["data.flip", "random", "alternating"]),
        ("optim.lr", ["key=value"]),
    ],
)
def test_override_errors_name_key_and_choices(override, fragments):
    with pytest.raises(ConfigError) as e:
        apply_overrides(Config(), [override])
    for f in fragments:
        assert f in str(e.value)


def test_model_knobs_are_checked_against_the_model():
    cfg = load_experiment(EXPERIMENT, ["model.pool=avg"])
    assert cfg.model["pool"] == "avg"
    with pytest.raises(ConfigError, match=r"model.pool=.*'median'.*max.*avg.*l2|model.pool.*choose one of"):
        load_experiment(EXPERIMENT, ["model.pool=median"])
    with pytest.raises(ConfigError, match="not a knob of model 'lenet5'.*valid knobs"):
        load_experiment(EXPERIMENT, ["model.depth_of_field=3"])
    with pytest.raises(ValueError, match="lenet5"):  # unknown model lists valid names
        load_experiment(EXPERIMENT, ["model.name=lenet7"])


def test_switching_model_keeps_only_valid_knobs():
    cfg = load_experiment(EXPERIMENT, ["model.name=mlp"])
    assert cfg.model["name"] == "mlp" and "pool" not in cfg.model


def test_round_trip_through_json_and_diff():
    cfg = load_experiment(EXPERIMENT, ["optim.lr=0.02", "schedule.decay_epochs=5,8"])
    again = config_from_dict(json.loads(json.dumps(config_to_dict(cfg))))
    assert again == cfg
    other = apply_overrides(cfg, ["optim.lr=0.03", "train.progress=false"])
    assert diff_configs(cfg, other, ignore=["train.progress"]) == {"optim.lr": (0.02, 0.03)}


def test_experiment_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_experiment(tmp_path / "nope.py")
    bad = tmp_path / "bad.py"
    bad.write_text("x = 1\n")
    with pytest.raises(ConfigError, match="get_config"):
        load_experiment(bad)
    wrong = tmp_path / "wrong.py"
    wrong.write_text(textwrap.dedent("def get_config():\n    return {'model': 'lenet5'}\n"))
    with pytest.raises(ConfigError, match="must return jaxcnn.config.Config"):
        load_experiment(wrong)


def test_experiment_docstrings_state_command_runtime_and_result():
    from pathlib import Path

    for path in sorted(Path("experiments").glob("*.py")):
        doc = (path.read_text().split('"""') + ["", ""])[1]
        for word in ("Command:", "Runtime:", "Expected:"):
            assert word in doc, f"{path}: docstring lacks {word!r}"


@pytest.mark.parametrize(
    "override, fragments",
    [
        ("train.steps=-5", ["train.steps=-5", "a whole number >= 1", "train.epochs"]),
        ("train.steps=0", ["train.steps=0", ">= 1"]),
        ("train.epochs=0", ["train.epochs=0.0", "> 0"]),
        ("train.steps_per_call=-1", ["train.steps_per_call=-1", "positive cap"]),
        ("train.max_seconds_per_call=0", ["train.max_seconds_per_call=0.0", "seconds > 0"]),
    ],
)
def test_values_outside_a_key_s_range_are_refused_naming_the_key(override, fragments):
    with pytest.raises(ConfigError) as e:
        apply_overrides(Config(), [override])
    for f in fragments:
        assert f in str(e.value), str(e.value)


def test_a_config_built_in_python_is_checked_too():
    import dataclasses

    from jaxcnn.config import TrainConfig, validate_config

    validate_config(Config())
    with pytest.raises(ConfigError, match=r"train\.steps=-5 is not allowed"):
        validate_config(dataclasses.replace(Config(), train=TrainConfig(steps=-5)))
    assert apply_overrides(Config(), ["train.steps=none"]).train.steps is None
