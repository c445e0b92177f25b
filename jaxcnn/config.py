"""Experiment configuration: the schema, loading an experiment file, and `--set key=value` overrides.

A config is data: nested frozen dataclasses, one per stage of the data flow (data → model → optim/schedule →
train → parallel → checkpoint → transfer). The `model` section is the one open-ended part: a mapping with
`name` plus any knob that the named model's constructor takes; its knobs and their types come from the model
registry, so `--set model.pool=avg` is type-checked against the model itself.

    cfg = load_experiment("experiments/fashion_mnist_lenet5.py")
    cfg = apply_overrides(cfg, ["optim.lr=0.05", "model.pool=avg"])
    config_to_dict(cfg)            # JSON-ready, written to the run's config.json
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence


class ConfigError(ValueError):
    """A config key or value is wrong; the message says which and what is allowed."""


# ---------------------------------------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataConfig:
    """Which dataset, where it lives, how it is batched and augmented."""

    name: str = "fashion_mnist"
    # Folder with the dataset's official files (IDX .gz, CIFAR tarballs, a TFDS data_dir ...). None searches the
    # default places (see jaxcnn.data.sources); the JAXCNN_DATA_DIR environment variable also works.
    data_dir: str | None = None
    # 'auto' tries the archive reader on local files first, then TFDS; 'idx'/'archive' and 'tfds' force one.
    source: Literal["auto", "archive", "tfds"] = "auto"
    batch_size: int = 128  # global batch, split across all devices of all processes
    eval_batch_size: int = 1000
    # Use only the first N examples (quick runs and tests). None = all.
    train_limit: int | None = None
    test_limit: int | None = None
    # Carve a validation split of this many examples off the end of the training set (eval reports it too).
    val_size: int = 0
    normalize: bool = True
    # Augmentation, run inside the compiled train step.
    crop_padding: int = 0  # random crop after zero-padding by this many pixels per side (0 = off)
    flip: Literal["none", "random", "alternating"] = "none"
    cutout: int = 0  # side of the square cut out (0 = off)
    # Test-time augmentation at evaluation.
    tta: Literal["none", "flip", "flip_translate"] = "none"


@dataclass(frozen=True)
class OptimConfig:
    """The optimizer (see jaxcnn.train.optim)."""

    name: Literal["sgd", "adam", "adamw", "lamb", "lars"] = "sgd"
    lr: float = 0.1  # peak learning rate for batch_size; the schedule shapes it
    momentum: float = 0.9
    nesterov: bool = False
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    # Weight decay: for sgd and adam L2 added to the gradient before momentum / the moments (PyTorch's form);
    # decoupled (added to the update) for adamw and lamb; LARS's own form for lars (see jaxcnn.train.optim) ...
    weight_decay: float = 0.0
    # ... applied to: 'kernels' (conv/dense kernels only: BatchNorm scale/bias and biases left out), or 'all'.
    weight_decay_mask: Literal["kernels", "all"] = "kernels"
    grad_clip_norm: float | None = None
    label_smoothing: float = 0.0
    accum_steps: int = 1  # gradient accumulation over this many micro-batches per optimizer step
    ema_decay: float | None = None  # keep an EMA of the parameters with this decay
    eval_ema: bool = False  # evaluate with the EMA parameters


@dataclass(frozen=True)
class ScheduleConfig:
    """The learning-rate schedule over the whole run (see jaxcnn.train.optim)."""

    name: Literal["constant", "step", "cosine", "onecycle", "triangular"] = "cosine"
    warmup_epochs: float = 0.0
    # 'step': multiply the lr by decay_factor at each of these epochs.
    decay_epochs: tuple[float, ...] = ()
    decay_factor: float = 0.1
    # 'cosine': final lr = lr * final_lr_fraction. 'onecycle'/'triangular': start and end lr fractions too.
    final_lr_fraction: float = 0.0
    initial_lr_fraction: float = 0.04
    peak_fraction: float = 0.25  # 'onecycle'/'triangular': where the peak lies, as a fraction of training


@dataclass(frozen=True)
class TrainConfig:
    """How long to train and how to log."""

    epochs: float = 10.0
    steps: int | None = None  # if set, overrides epochs
    log_every_steps: int = 50
    eval_every_epochs: int = 1  # 0 = only at the end
    # Train steps per compiled call (one lax.fori_loop over the epoch's device-resident batches): 0 = every step up
    # to the next log, checkpoint or evaluation point in one call; n >= 1 = at most n. The same updates either way.
    steps_per_call: int = 0
    # ... and at most as many as take this long at the pace of the previous call: a SIGTERM/SIGINT is honoured
    # (checkpoint, exit) when the running call returns, so this bounds how long a stop takes.
    max_seconds_per_call: float = 5.0
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    progress: bool = True  # the console progress bar
    # Stop with an error at the first non-finite loss or gradient.
    check_finite: bool = True


@dataclass(frozen=True)
class ParallelConfig:
    """How the train step runs on the devices (see jaxcnn.train.parallel)."""

    strategy: Literal["jit", "pmap", "shard_map", "single"] = "jit"
    num_devices: int | None = None  # None = all local devices (of every process)
    # Multi-host: 'auto' initialises jax.distributed when the environment says so (coordinator set, SLURM, TPU).
    distributed: Literal["auto", "on", "off"] = "auto"
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


@dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints and resume (see jaxcnn.train.checkpoint)."""

    enabled: bool = True
    every_steps: int | None = None
    every_epoch: bool = True
    keep: int = 2
    keep_best_metric: str | None = None  # e.g. 'test_accuracy': also keep the best step by this metric
    async_save: bool = True
    resume: bool = True
    allow_config_change: bool = False


@dataclass(frozen=True)
class TransferConfig:
    """Start from another run's parameters, freeze some (see jaxcnn.train.transfer)."""

    # a run workdir, a checkpoint folder, an exported .msgpack file, or PyTorch weights: torchvision:ARCH=PATH,
    # timm:ARCH=PATH, hf-hub:timm/ARCH.TAG (see jaxcnn.pretrained, docs/pretrained.md)
    init_from: str | None = None
    freeze: tuple[str, ...] = ()  # regular expressions over parameter paths like 'Conv_0/kernel'
    unfreeze_at_epoch: float | None = None


@dataclass(frozen=True)
class Config:
    """The whole experiment."""

    model: Mapping[str, Any] = field(default_factory=lambda: {"name": "lenet5"})
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    train: TrainConfig = TrainConfig()
    parallel: ParallelConfig = ParallelConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    transfer: TransferConfig = TransferConfig()
    seed: int = 0
    name: str = ""  # a label for tables; defaults to the experiment file's stem


SECTIONS: dict[str, type] = {
    name: tp for name, tp in typing.get_type_hints(Config).items() if name not in ("model", "seed", "name")
}


# ---------------------------------------------------------------------------------------------------------
# Parsing values by type
# ---------------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        return f"a comma-separated list of {_type_name(args[0])}" if args else "a list"
    if tp is type(None):
        return "none"
    return getattr(tp, "__name__", str(tp))


def parse_value(text: str | Any, tp: Any, key: str) -> Any:
    """Converts `text` (from the command line, or already a Python value) to type `tp`, or raises ConfigError."""
    origin = typing.get_origin(tp)
    fail = ConfigError(f"{key}={text!r}: expected {_type_name(tp)}")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and (text is None or (isinstance(text, str) and text.lower() in ("none", "null"))):
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return parse_value(text, a, key)
            except ConfigError:
                continue
        raise fail
    if origin is Literal:
        choices = typing.get_args(tp)
        for c in choices:
            if text == c or (isinstance(text, str) and str(c) == text):
                return c
        raise ConfigError(f"{key}={text!r} is not a valid choice; choose one of: {', '.join(map(str, choices))}")
    if origin is tuple:
        (elem, *rest) = typing.get_args(tp) or (str,)
        if isinstance(text, str):
            s = text.strip()
            if s.startswith("["):
                try:
                    items = json.loads(s)
                except json.JSONDecodeError:
                    raise fail from None
            else:
                items = [t for t in s.strip("()").split(",") if t.strip()]
        elif isinstance(text, (list, tuple)):
            items = list(text)
        else:
            raise fail
        return tuple(parse_value(i.strip() if isinstance(i, str) else i, elem, key) for i in items)
    if tp is bool:
        if isinstance(text, bool):
            return text
        if isinstance(text, str) and text.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(text, str) and text.lower() in ("false", "0", "no", "off"):
            return False
        raise fail
    if tp is int:
        if isinstance(text, bool):
            raise fail
        if isinstance(text, int):
            return text
        if isinstance(text, float) and text.is_integer():
            return int(text)
        try:
            return int(str(text).replace("_", ""))
        except ValueError:
            raise fail from None
    if tp is float:
        if isinstance(text, bool):
            raise fail
        try:
            return float(text)
        except (TypeError, ValueError):
            raise fail from None
    if tp is str:
        if isinstance(text, str):
            return text
        raise fail
    if tp is Any:
        return text
    raise ConfigError(f"{key}: cannot parse values of type {tp!r}")


def _resolved_fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


# ---------------------------------------------------------------------------------------------------------
# Overrides
# ---------------------------------------------------------------------------------------------------------


def _model_knobs(model_name: str) -> dict[str, Any]:
    from jaxcnn.models.registry import model_knobs  # deferred: the model zoo imports jax

    return model_knobs(model_name)


def validate_model_section(model: Mapping[str, Any]) -> dict[str, Any]:
    """Checks every knob of the `model` section against the named model's constructor; returns typed values."""
    if "name" not in model:
        raise ConfigError("model: the model section needs a 'name' (see `python -m jaxcnn models`)")
    knobs = _model_knobs(model["name"])
    out: dict[str, Any] = {"name": model["name"]}
    for k, v in model.items():
        if k == "name":
            continue
        if k not in knobs:
            raise ConfigError(
                f"model.{k} is not a knob of model {model['name']!r}; valid knobs: {', '.join(sorted(knobs))}"
            )
        out[k] = parse_value(v, knobs[k], f"model.{k}")
    return out


def set_value(cfg: Config, key: str, value: Any) -> Config:
    """Returns a copy of `cfg` with the dotted `key` set to `value` (a string from the CLI, or a Python value)."""
    parts = key.split(".")
    top = _resolved_fields(Config)
    if parts[0] not in top:
        raise ConfigError(f"unknown config key {key!r}; the top-level keys are: {', '.join(top)}")
    if parts[0] == "model":
        if len(parts) != 2:
            raise ConfigError(f"{key!r}: model keys look like model.KNOB (e.g. model.pool=avg)")
        model = dict(cfg.model)
        if parts[1] == "name":
            new_name = parse_value(value, str, key)
            _model_knobs(new_name)  # raises for an unknown model, listing the valid ones
            # Knobs of the old model may not exist on the new one: keep only those that do.
            knobs = _model_knobs(new_name)
            model = {"name": new_name, **{k: v for k, v in model.items() if k in knobs}}
        else:
            model[parts[1]] = value
        return dataclasses.replace(cfg, model=validate_model_section(model))
    if len(parts) == 1:
        if parts[0] in SECTIONS:
            raise ConfigError(f"{key!r} is a section; set one of its fields, e.g. {key}.{_first_field(parts[0])}=...")
        return dataclasses.replace(cfg, **{parts[0]: parse_value(value, top[parts[0]], key)})
    if len(parts) != 2 or parts[0] not in SECTIONS:
        raise ConfigError(f"unknown config key {key!r}")
    section_cls = SECTIONS[parts[0]]
    fields = _resolved_fields(section_cls)
    if parts[1] not in fields:
        raise ConfigError(f"unknown config key {key!r}; valid keys in {parts[0]}: {', '.join(fields)}")
    section = getattr(cfg, parts[0])
    parsed = parse_value(value, fields[parts[1]], key)
    _check_value(key, parsed)
    section = dataclasses.replace(section, **{parts[1]: parsed})
    return dataclasses.replace(cfg, **{parts[0]: section})


# Values a key's type allows but the run does not: key → (test, what is allowed). Checked where a key is set and by
# validate_config (for configs built in Python).
VALUE_RULES: dict[str, tuple[Any, str]] = {
    "train.steps": (lambda v: v is None or v >= 1, "a whole number >= 1, or none to train for train.epochs"),
    "train.epochs": (lambda v: v > 0, "a number > 0"),
    "train.steps_per_call": (lambda v: v >= 0, "0 (every step up to the next log, checkpoint or evaluation point in "
                                               "one call) or a positive cap"),
    "train.max_seconds_per_call": (lambda v: v > 0, "a number of seconds > 0"),
}


def _check_value(key: str, value: Any) -> None:
    rule = VALUE_RULES.get(key)
    if rule is not None and not rule[0](value):
        raise ConfigError(f"{key}={value!r} is not allowed: expected {rule[1]}")


def validate_config(cfg: Config) -> None:
    """Checks the values every key's type allows but the run does not (VALUE_RULES); raises ConfigError."""
    for key, value in flatten_config(cfg).items():
        _check_value(key, value)


def _first_field(section: str) -> str:
    return dataclasses.fields(SECTIONS[section])[0].name


def apply_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """Applies `key=value` strings in order (the CLI's `--set`)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set optim.lr=0.05")
        key, value = item.split("=", 1)
        cfg = set_value(cfg, key.strip(), value.strip())
    return cfg


def with_updates(cfg: Config, updates: Mapping[str, Any]) -> Config:
    """Applies a mapping of dotted keys to Python values (used by sweeps)."""
    for k, v in updates.items():
        cfg = set_value(cfg, k, v)
    return cfg


# ---------------------------------------------------------------------------------------------------------
# Serialisation and experiment files
# ---------------------------------------------------------------------------------------------------------


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """A JSON-ready nested dict (tuples become lists)."""

    def conv(x: Any) -> Any:
        if dataclasses.is_dataclass(x):
            return {f.name: conv(getattr(x, f.name)) for f in dataclasses.fields(x)}
        if isinstance(x, Mapping):
            return {k: conv(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [conv(v) for v in x]
        return x

    return conv(cfg)


def config_from_dict(d: Mapping[str, Any]) -> Config:
    """Inverse of `config_to_dict`, validating every value (e.g. reading a run's config.json)."""
    cfg = Config(model=validate_model_section(d.get("model", {"name": "lenet5"})))
    for k, v in d.items():
        if k == "model":
            continue
        if k in SECTIONS:
            if not isinstance(v, Mapping):
                raise ConfigError(f"{k}: expected a mapping of its fields")
            for fk, fv in v.items():
                cfg = set_value(cfg, f"{k}.{fk}", fv)
        else:
            cfg = set_value(cfg, k, v)
    return cfg


def flatten_config(cfg: Config) -> dict[str, Any]:
    """{'optim.lr': 0.1, 'model.name': 'lenet5', ...}: for diffs and tables."""
    out: dict[str, Any] = {}
    for k, v in config_to_dict(cfg).items():
        if isinstance(v, dict):
            for fk, fv in v.items():
                out[f"{k}.{fk}"] = fv
        else:
            out[k] = v
    return out


# Config keys (prefixes) that do not change a run's result (its trained parameters and metrics): a resumed run may
# change them freely, and a sweep does not call a finished run stale for them. parallel.*: the device count and
# strategy change float summation order only (restoring onto another device count is supported);
# data.source/data_dir: where the same data is read from; eval_batch_size: eval sums are exact over any batching;
# transfer.init_from: a resumed state comes from the checkpoint, not from it.
RESUME_IGNORED_KEYS: tuple[str, ...] = (
    "name",
    "train.progress",
    "train.log_every_steps",
    "train.steps_per_call",
    "train.max_seconds_per_call",
    "train.eval_every_epochs",
    "train.check_finite",
    "checkpoint.",
    "parallel.",
    "data.data_dir",
    "data.source",
    "data.eval_batch_size",
    "transfer.init_from",
)


def diff_configs(a: Config, b: Config, ignore: Sequence[str] = ()) -> dict[str, tuple[Any, Any]]:
    """Keys whose values differ: {key: (value in a, value in b)}; keys starting with an `ignore` prefix skipped."""
    fa, fb = flatten_config(a), flatten_config(b)
    out = {}
    for k in sorted(set(fa) | set(fb)):
        if any(k.startswith(p) for p in ignore):
            continue
        if fa.get(k) != fb.get(k):
            out[k] = (fa.get(k), fb.get(k))
    return out


def load_experiment_module(path: str | Path) -> types.ModuleType:
    """Imports an experiment file (which defines get_config(), and optionally sweep())."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"experiment file {str(path)!r} not found; experiments live in experiments/*.py")
    spec = importlib.util.spec_from_file_location(f"jaxcnn_experiment_{path.stem}", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} does not define get_config(); an experiment file must return its Config")
    return module


def load_experiment(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Loads `get_config()` from an experiment file, validates the model section and applies `overrides`."""
    module = load_experiment_module(path)
    cfg = module.get_config()
    if not isinstance(cfg, Config):
        raise ConfigError(f"{path}: get_config() must return jaxcnn.config.Config, got {type(cfg).__name__}")
    cfg = dataclasses.replace(cfg, model=validate_model_section(cfg.model))
    if not cfg.name:
        cfg = dataclasses.replace(cfg, name=Path(path).stem)
    cfg = apply_overrides(cfg, overrides)
    validate_config(cfg)
    return cfg
