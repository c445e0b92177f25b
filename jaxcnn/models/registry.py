"""The model registry: names -> Flax modules with default knobs.

    create_model("resnet20", num_classes=10, pool="avg")   # a flax.linen.Module, knobs checked
    list_models("resnet*")                                 # fnmatch pattern
    model_knobs("lenet5")                                  # {'act': Literal['relu', ...], 'pad_to': int | None, ...}
    model_defaults("lenet5")                               # {'act': 'relu', 'pad_to': 32, ...}

A model's knobs are the fields of its module dataclass (Flax's own `parent` and `name` left out), with the
types of their annotations; `jaxcnn.config` uses `model_knobs` to type-check `--set model.pool=avg`. A registered
name is a module class plus defaults (what a `functools.partial` size alias would hold):

    @register("lenet5")
    class LeNet5(ClassifierBase): ...

    register_model("resnet56", partial(CifarResNet, stage_sizes=(9, 9, 9)))
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import functools
import numbers
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import flax.linen as nn
import numpy as np

# Fields every flax Module has that are not model knobs.
_FLAX_FIELDS = ("parent", "name")
# Knobs naming a dtype by string; jnp dtypes (jnp.bfloat16, np.dtype('float32')) are accepted and turned into names.
_DTYPE_KNOBS = ("dtype", "param_dtype")


class ModelConfigError(ValueError):
    """A model name, knob or knob value is wrong; the message says which and what is allowed."""


@dataclass(frozen=True)
class ModelEntry:
    """One registered model: its module class, the defaults its name sets, and a one-line description."""

    name: str
    module: type[nn.Module]
    defaults: Mapping[str, Any]
    description: str


_REGISTRY: dict[str, ModelEntry] = {}

ModuleT = TypeVar("ModuleT", bound=type)


# ---------------------------------------------------------------------------------------------------------
# Registering
# ---------------------------------------------------------------------------------------------------------


def _knob_types(cls: type[nn.Module]) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.name not in _FLAX_FIELDS}


def register_model(
    name: str, module: type[nn.Module] | functools.partial, *, description: str | None = None, **defaults: Any
) -> None:
    """Registers `module` (a flax Module class, or a `functools.partial` of one with keyword defaults) as `name`.

    `defaults` (and the partial's keywords) are checked against the module's knobs now, so a typo in the zoo
    fails at import, not when someone first asks for the model.
    """
    if isinstance(module, functools.partial):
        if module.args:
            raise ModelConfigError(f"register_model({name!r}): give the partial's defaults as keywords, not positions")
        defaults = {**module.keywords, **defaults}
        module = module.func
    if not (isinstance(module, type) and issubclass(module, nn.Module)):
        raise ModelConfigError(f"register_model({name!r}): expected a flax.linen.Module class, got {module!r}")
    old = _REGISTRY.get(name)
    if old is not None and (old.module.__module__, old.module.__qualname__) != (module.__module__, module.__qualname__):
        raise ModelConfigError(f"model name {name!r} is already registered to {old.module.__qualname__}")
    knobs = _knob_types(module)
    checked = {}
    for knob, value in defaults.items():
        if knob not in knobs:
            raise ModelConfigError(_unknown_knob_message(name, knob, knobs))
        checked[knob] = check_knob_value(name, knob, value, knobs[knob])
    doc = description or (module.__doc__ or module.__name__).strip().split("\n")[0]
    _REGISTRY[name] = ModelEntry(name=name, module=module, defaults=types.MappingProxyType(checked), description=doc)


def register(name: str, *, description: str | None = None, **defaults: Any) -> Callable[[ModuleT], ModuleT]:
    """Class decorator: `@register("lenet5")` registers the class under that name (with optional defaults)."""

    def wrap(cls: ModuleT) -> ModuleT:
        register_model(name, cls, description=description, **defaults)
        return cls

    return wrap


# ---------------------------------------------------------------------------------------------------------
# Looking up
# ---------------------------------------------------------------------------------------------------------


def _entry(name: str) -> ModelEntry:
    if not isinstance(name, str) or name not in _REGISTRY:
        names = sorted(_REGISTRY)
        close = difflib.get_close_matches(str(name), names, n=5, cutoff=0.5)
        rest = [n for n in names if n not in close]
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ModelConfigError(f"unknown model {name!r}; {hint}valid models: {', '.join(close + rest)}")
    return _REGISTRY[name]


def list_models(pattern: str | None = None) -> list[str]:
    """Registered model names, sorted; `pattern` is an fnmatch pattern such as ``'resnet*'``."""
    names = sorted(_REGISTRY)
    return names if pattern is None else [n for n in names if fnmatch.fnmatchcase(n, pattern)]


def model_knobs(name: str) -> dict[str, Any]:
    """The knobs of model `name` and their type annotations (``Literal[...]`` for choices), in field order."""
    return _knob_types(_entry(name).module)


def model_defaults(name: str) -> dict[str, Any]:
    """Each knob's value when `create_model(name)` is called without overrides."""
    entry = _entry(name)
    fields = {f.name: f for f in dataclasses.fields(entry.module) if f.name not in _FLAX_FIELDS}
    out = {}
    for knob, f in fields.items():
        if knob in entry.defaults:
            out[knob] = entry.defaults[knob]
        elif f.default is not dataclasses.MISSING:
            out[knob] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[knob] = f.default_factory()
    return out


def model_description(name: str) -> str:
    """One line saying what model `name` is."""
    return _entry(name).description


def create_model(name: str, num_classes: int | None = None, **overrides: Any) -> nn.Module:
    """Builds the registered model `name` with its defaults, `num_classes` and `overrides` (knob=value).

    Every knob is checked here, before any array exists: an unknown name or knob, a value of the wrong type or
    a choice that is not offered raises `ModelConfigError` (a ValueError) that lists what is valid; the module's
    own checks (e.g. widths not divisible by `groups`) run at construction too. Only checks that need the input's
    shape (a feature map shrinking below 1x1) wait for the first call.

    The model is called as ``model.apply(variables, x, train=False)`` with ``x: float [N, H, W, C]`` and returns
    logits ``[N, num_classes]``; see `jaxcnn.models.base.ClassifierBase`.
    """
    entry = _entry(name)
    knobs = _knob_types(entry.module)
    if num_classes is not None:
        overrides = {**overrides, "num_classes": num_classes}
    kwargs = dict(entry.defaults)
    for knob, value in overrides.items():
        if knob not in knobs:
            raise ModelConfigError(_unknown_knob_message(name, knob, knobs))
        kwargs[knob] = check_knob_value(name, knob, value, knobs[knob])
    return entry.module(**kwargs)


def _unknown_knob_message(model: str, knob: str, knobs: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(knob, list(knobs), n=3, cutoff=0.6)
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    return f"model {model!r} has no knob {knob!r}{hint}; valid knobs: {', '.join(sorted(knobs))}"


# ---------------------------------------------------------------------------------------------------------
# Checking knob values against their annotations
# ---------------------------------------------------------------------------------------------------------


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a tuple of {_describe(args[0])}"
        return f"a tuple ({', '.join(_describe(a) for a in args)})"
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", str(tp))


class _Mismatch(Exception):
    pass


def _coerce(value: Any, tp: Any) -> Any:
    """`value` as type `tp` (lists become tuples, ints floats), or raises _Mismatch."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        for choice in typing.get_args(tp):
            if value == choice and type(value) is type(choice):
                return choice
        raise _Mismatch
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is tuple:
        if not isinstance(value, (tuple, list)):
            raise _Mismatch
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0]) for v in value)
        if len(args) != len(value):
            raise _Mismatch
        return tuple(_coerce(v, a) for v, a in zip(value, args))
    if tp is type(None):
        if value is None:
            return None
        raise _Mismatch
    if tp is bool:
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
        raise _Mismatch
    if tp is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)):
            return int(value)
        raise _Mismatch
    if tp is float:
        if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
            return float(value)
        raise _Mismatch
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _Mismatch
    return value  # an annotation we do not check (callables and such)


def check_knob_value(model: str, knob: str, value: Any, tp: Any) -> Any:
    """`value` checked (and normalised: lists -> tuples, ints -> floats, jnp dtypes -> names) against `tp`."""
    if knob in _DTYPE_KNOBS and value is not None and not isinstance(value, str):
        try:
            value = np.dtype(value).name
        except TypeError:
            pass
    try:
        return _coerce(value, tp)
    except _Mismatch:
        raise ModelConfigError(
            f"model {model!r}: knob {knob}={value!r} is not valid; expected {_describe(tp)}"
        ) from None


__all__ = [
    "ModelConfigError",
    "ModelEntry",
    "check_knob_value",
    "create_model",
    "list_models",
    "model_defaults",
    "model_description",
    "model_knobs",
    "register",
    "register_model",
]
