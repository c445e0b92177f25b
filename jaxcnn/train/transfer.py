"""Transfer learning: start from another run's parameters (matched by name), freeze some by pattern, unfreeze later.

    variables, report = load_pretrained(fresh_variables, "runs/mnist")   # a run workdir, checkpoint folder or .msgpack
    variables, report = load_pretrained(fresh_variables, "torchvision:resnet18=/path/resnet18.pth")  # PyTorch weights
    print(report.describe())                                              # loaded / re-initialised / ignored
    tx = apply_freeze(tx, variables["params"], cfg.transfer, steps_per_epoch)
    opts = StepOptions(..., freeze_stats=stats_freezer(variables, cfg.transfer, steps_per_epoch))
    export_params("runs/mnist", "mnist_lenet5.msgpack")                   # params + batch_stats, flax msgpack

**Matching by name.** Every leaf of the model's variables has a name like `params/Conv_0/kernel` or
`batch_stats/BatchNorm_0/mean`. A leaf takes the pretrained value when the source has a leaf of that name and
shape (cast to the model's dtype); otherwise it keeps its fresh initialisation and is listed as re-initialised
with the reason (a head with another number of classes has another shape). Source leaves the model does not have
are listed as ignored.

**Freezing** (`transfer.freeze`: regular expressions, `re.search`ed in names like `Conv_0/kernel`; anchor with
`^`/`$` for exact names). Frozen parameters get a zero update through `optax.multi_transform`. A BatchNorm
layer whose parameters are all frozen (or whose statistics' names match a pattern) also keeps its running
statistics: `stats_freezer` gives the train step a function that puts the old statistics back.

**Unfreezing** (`transfer.unfreeze_at_epoch = e`): the frozen group runs the same optimizer as the rest from step 0
on its own gradients, and its updates are zeroed until step round(e · steps_per_epoch). So when it starts
training, its optimizer statistics (momentum, Adam moments) are warm and its learning-rate schedule is the run's
(no spike, no restarted warm-up). The frozen group's gradients then enter gradient clipping as their own group
(`optim.grad_clip_norm` bounds each group's norm separately).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcnn.config import ConfigError, TransferConfig
from jaxcnn.pretrained import is_weights_spec, read_weights
from jaxcnn.train import checkpoint as ckpt_lib
from jaxcnn.train.state import TrainState, leaf_names

COLLECTIONS = ("params", "batch_stats")


# ---------------------------------------------------------------------------------------------------------
# Reading pretrained variables
# ---------------------------------------------------------------------------------------------------------


def _checkpoint_folder(path: Path) -> Path:
    """The folder holding `<step>/` folders for a run workdir or a checkpoints folder."""
    if (path / "checkpoints").is_dir():
        return path / "checkpoints"
    return path


def read_pretrained(init_from: str | Path) -> tuple[dict[str, Any], str]:
    """({'params': ..., 'batch_stats': ...} as numpy, a description of the source) from a run workdir, a checkpoints
    folder, one step folder (`.../checkpoints/<step>`), an exported `.msgpack` file, or PyTorch weights named by a
    spec: `torchvision:resnet50=/path/file.pth`, `timm:resnet50=/path/model.safetensors`,
    `hf-hub:timm/resnet50.a1_in1k` (see `jaxcnn.pretrained`).

    From a run or checkpoints folder the newest good step is used (damaged steps are skipped with a warning, and
    left where they are: this reads another run's files, it does not change them).
    """
    if is_weights_spec(str(init_from)):
        variables, spec, _ = read_weights(str(init_from))
        return variables, f"{spec} (PyTorch weights of {spec.arch})"
    path = Path(init_from)
    if path.is_file():
        try:
            tree = flax.serialization.msgpack_restore(path.read_bytes())
        except Exception as e:  # msgpack raises several types for a file that is not msgpack
            raise ValueError(
                f"transfer.init_from={str(path)!r} is not a msgpack file written by export_params ({type(e).__name__}: "
                f"{e})"
            ) from e
        if not isinstance(tree, Mapping) or "params" not in tree:
            raise ValueError(f"transfer.init_from={str(path)!r} holds no 'params'; write it with export_params")
        return {k: tree[k] for k in COLLECTIONS if k in tree}, str(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"transfer.init_from={str(path)!r} does not exist; give a run workdir, its checkpoints folder, one step "
            f"folder, or a .msgpack file from export_params"
        )
    if (path / ckpt_lib.STATE_ITEM).is_dir():  # one step folder
        tree, _ = ckpt_lib.read_step(path)
        return {k: tree[k] for k in COLLECTIONS if k in tree}, str(path)
    folder = _checkpoint_folder(path)

    def damaged(step: int, reason: str) -> None:
        print(f"warning: skipping damaged checkpoint at step {step} in {folder} ({reason})", flush=True)

    found = ckpt_lib.newest_good_step(folder, None, on_damaged=damaged)
    if found is None:
        raise FileNotFoundError(
            f"transfer.init_from={str(path)!r}: no good checkpoint step found in {folder} (steps there: "
            f"{ckpt_lib.list_steps(folder) or 'none'})"
        )
    step, tree, _ = found
    return {k: tree[k] for k in COLLECTIONS if k in tree}, f"{folder / str(step)} (step {step})"


# ---------------------------------------------------------------------------------------------------------
# Loading by name
# ---------------------------------------------------------------------------------------------------------


@dataclass
class TransferReport:
    """What `load_pretrained` did, leaf by leaf ('params/Conv_0/kernel' style names)."""

    source: str
    loaded: list[str] = field(default_factory=list)
    reinitialised: list[tuple[str, str]] = field(default_factory=list)  # (name, why)
    ignored: list[str] = field(default_factory=list)  # in the source, not in the model

    def describe(self) -> str:
        """A few lines for the console: counts, then the re-initialised and ignored names."""
        lines = [f"transfer: loaded {len(self.loaded)} arrays from {self.source}"]
        if self.reinitialised:
            lines.append(f"  re-initialised ({len(self.reinitialised)}):")
            lines += [f"    {name}: {why}" for name, why in self.reinitialised]
        if self.ignored:
            lines.append(f"  ignored, not in this model ({len(self.ignored)}): {', '.join(self.ignored)}")
        return "\n".join(lines)


def _named_leaves(tree: Any, prefix: str) -> dict[str, Any]:
    leaves = jax.tree_util.tree_leaves(tree)
    return {f"{prefix}/{n}": x for n, x in zip(leaf_names(tree), leaves)}


def load_pretrained(variables: Mapping[str, Any], init_from: str | Path) -> tuple[dict[str, Any], TransferReport]:
    """Copies pretrained values into `variables` ({'params': ..., 'batch_stats': ...}) where names and shapes match.

    Returns the new variables (same structure and dtypes as `variables`) and a TransferReport. Raises ValueError
    when not a single leaf matches (most likely another model family).
    """
    source, where = read_pretrained(init_from)
    report = TransferReport(source=where)
    src = {}
    for coll in COLLECTIONS:
        if coll in source:
            src.update(_named_leaves(source[coll], coll))
    out = dict(variables)
    used: set[str] = set()
    for coll in COLLECTIONS:
        if coll not in variables:
            continue
        target = variables[coll]
        paths_leaves, treedef = jax.tree_util.tree_flatten(target)
        names = [f"{coll}/{n}" for n in leaf_names(target)]
        new_leaves = []
        for name, leaf in zip(names, paths_leaves):
            if name not in src:
                report.reinitialised.append((name, "not in the source"))
                new_leaves.append(leaf)
                continue
            used.add(name)
            value = np.asarray(src[name])
            if tuple(value.shape) != tuple(leaf.shape):
                report.reinitialised.append((name, f"shape {tuple(leaf.shape)} here, {tuple(value.shape)} in the source"))
                new_leaves.append(leaf)
                continue
            report.loaded.append(name)
            new_leaves.append(jnp.asarray(value, dtype=leaf.dtype))
        out[coll] = jax.tree_util.tree_unflatten(treedef, new_leaves)
    report.ignored = sorted(set(src) - used)
    if not report.loaded:
        raise ValueError(
            f"transfer.init_from={str(init_from)!r}: no variable of this model matches the source by name and shape "
            f"(the model has e.g. {', '.join(list(_named_leaves(variables.get('params', {}), 'params'))[:4])}; the "
            f"source has e.g. {', '.join(list(src)[:4])}). Is it the same model family?"
        )
    return out, report


def export_params(workdir_or_state: str | Path | TrainState, path: str | Path) -> Path:
    """Writes params and batch_stats as a flax msgpack file; returns its path.

    workdir_or_state: a host TrainState (for pmap states, `strategy.unreplicate(state)` first), or anything
    `read_pretrained` accepts (a run workdir, its checkpoints folder, one step folder).
    """
    if isinstance(workdir_or_state, TrainState):
        tree = {"params": workdir_or_state.params, "batch_stats": workdir_or_state.batch_stats}
        tree = jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), tree)
    else:
        tree, _ = read_pretrained(workdir_or_state)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(flax.serialization.msgpack_serialize(flax.serialization.to_state_dict(tree)))
    return path


# ---------------------------------------------------------------------------------------------------------
# Freezing
# ---------------------------------------------------------------------------------------------------------


def _compile(patterns: tuple[str, ...]) -> list[re.Pattern[str]]:
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise ConfigError(f"transfer.freeze: {p!r} is not a regular expression ({e})") from e
    return out


def freeze_mask(params: Any, patterns: tuple[str, ...]) -> Any:
    """A pytree of bools like `params`: True where a pattern `re.search`es the leaf's name ('Conv_0/kernel').

    Raises ConfigError for a pattern that matches nothing (a typo would otherwise freeze nothing, silently).
    """
    regexes = _compile(patterns)
    names = leaf_names(params)
    for p, r in zip(patterns, regexes):
        if not any(r.search(n) for n in names):
            raise ConfigError(f"transfer.freeze: {p!r} matches no parameter; the parameters are: {', '.join(names)}")
    flags = [any(r.search(n) for r in regexes) for n in names]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), flags)


class HoldUntilState(NamedTuple):
    count: jax.Array  # int32 []: updates so far
    inner: Any


def hold_until(inner: optax.GradientTransformation, start_step: int) -> optax.GradientTransformation:
    """`inner`, run on every update, with its updates zeroed while count < start_step (its state keeps learning)."""

    def init(params: Any) -> HoldUntilState:
        return HoldUntilState(count=jnp.zeros((), jnp.int32), inner=inner.init(params))

    def update(updates: Any, state: HoldUntilState, params: Any = None) -> tuple[Any, HoldUntilState]:
        new_updates, new_inner = inner.update(updates, state.inner, params)
        active = state.count >= start_step
        new_updates = jax.tree_util.tree_map(lambda u: jnp.where(active, u, jnp.zeros_like(u)), new_updates)
        return new_updates, HoldUntilState(count=optax.safe_int32_increment(state.count), inner=new_inner)

    return optax.GradientTransformation(init, update)


def unfreeze_step(transfer_cfg: TransferConfig, steps_per_epoch: int) -> int | None:
    """The step at which frozen parameters start training, or None (never)."""
    e = transfer_cfg.unfreeze_at_epoch
    if e is None:
        return None
    if e < 0:
        raise ConfigError(f"transfer.unfreeze_at_epoch={e} must be >= 0")
    return round(e * steps_per_epoch)


def apply_freeze(
    tx: optax.GradientTransformation, params: Any, transfer_cfg: TransferConfig, steps_per_epoch: int
) -> optax.GradientTransformation:
    """`tx` with the parameters named by `transfer_cfg.freeze` frozen (and, with unfreeze_at_epoch, unfrozen later).

    No freeze patterns: `tx` itself. Otherwise `optax.multi_transform` with the labels 'train' (→ tx) and 'frozen'
    (→ `optax.set_to_zero()`, or `hold_until(tx, unfreeze step)`).
    """
    if not transfer_cfg.freeze:
        if transfer_cfg.unfreeze_at_epoch is not None:
            raise ConfigError("transfer.unfreeze_at_epoch is set but transfer.freeze is empty: nothing to unfreeze")
        return tx
    mask = freeze_mask(params, tuple(transfer_cfg.freeze))
    labels = jax.tree_util.tree_map(lambda f: "frozen" if f else "train", mask)
    start = unfreeze_step(transfer_cfg, steps_per_epoch)
    frozen = optax.set_to_zero() if start is None else hold_until(tx, start)
    return optax.multi_transform({"train": tx, "frozen": frozen}, labels)


def frozen_stats_mask(variables: Mapping[str, Any], patterns: tuple[str, ...]) -> Any:
    """A pytree of bools like `variables['batch_stats']`: True for the statistics of a layer whose parameters are all
    frozen (a BatchNorm's scale and bias), or whose own name ('BatchNorm_0/mean') matches a pattern."""
    stats = variables.get("batch_stats") or {}
    if not patterns or not jax.tree_util.tree_leaves(stats):
        return jax.tree_util.tree_map(lambda _: False, stats)
    regexes = _compile(patterns)
    params = variables.get("params", {})
    param_names = leaf_names(params)
    frozen_params = dict(zip(param_names, jax.tree_util.tree_leaves(freeze_mask(params, patterns))))

    def is_frozen(name: str) -> bool:
        if any(r.search(name) for r in regexes):
            return True
        layer = name.rsplit("/", 1)[0] + "/"
        mine = [f for n, f in frozen_params.items() if n.startswith(layer)]
        return bool(mine) and all(mine)

    flags = [is_frozen(n) for n in leaf_names(stats)]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(stats), flags)


def stats_freezer(
    variables: Mapping[str, Any], transfer_cfg: TransferConfig, steps_per_epoch: int
) -> Callable[[Any, Any, jax.Array], Any] | None:
    """For `StepOptions.freeze_stats`: `fn(old_stats, new_stats, step) -> stats` keeping the frozen layers' running
    statistics (until the unfreeze step), or None when no statistic is frozen."""
    mask = frozen_stats_mask(variables, tuple(transfer_cfg.freeze))
    if not any(jax.tree_util.tree_leaves(mask)):
        return None
    start = unfreeze_step(transfer_cfg, steps_per_epoch)

    def freeze(old: Any, new: Any, step: jax.Array) -> Any:
        def pick(frozen: bool, o: jax.Array, n: jax.Array) -> jax.Array:
            if not frozen:
                return n
            return o if start is None else jnp.where(step < start, o, n)

        return jax.tree_util.tree_map(pick, mask, old, new)

    return freeze
