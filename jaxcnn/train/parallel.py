"""Running one pure train step on many devices: `jax.jit` with shardings, `jax.pmap`, or `jax.shard_map`.

    init_distributed(cfg.parallel)                       # first, before any other jax call (multi-host)
    strategy = make_strategy(cfg.parallel, cfg.data.batch_size)
    model = create_model(name, **strategy.model_overrides)
    train_step = strategy.compile_train_step(make_train_step(opts, axis_name=strategy.axis_name))
    eval_step = strategy.compile_eval_step(make_eval_step(opts, axis_name=strategy.axis_name))
    state = strategy.place_state(state)                  # replicated on every device
    loader = DeviceEpochLoader(ds, batch_size, seed=0, sharding=strategy.batch_sharding)
    state, metrics = train_step(state, batch, rng)       # metrics: scalars, the same on every device
    train_steps = strategy.compile_train_steps(make_train_step(...))   # several steps per call (jaxcnn train):
    state, sums = train_steps(state, loader.epoch_arrays(epoch), first, count, base_rng, step0)
    host_state = strategy.unreplicate(state)             # numpy, the same for every strategy (checkpoints, logs)

The strategies (`parallel.strategy`) compute the same thing, to float rounding (tests/train/test_parallel.py; the
tolerances per step and over a run: tests/train/test_device_equivalence.py, docs/architecture.md):

- `jit` (default): one program over a `Mesh` of all devices with axis `data`; the batch is sharded along it
  (`P('data')`), the state replicated (`P()`). The step is written for the global batch and XLA inserts the
  collectives. BatchNorm runs WITHOUT an axis name: its batch mean is a reduction over the global batch, i.e.
  synced BatchNorm. `axis_name` is None. On several CPU devices the step traces XLA's kernels only: the backend's
  native kernels are custom calls without a partitioning rule, which XLA would run whole on every device
  (docs/architecture.md, "Many devices").
- `pmap`: `jax.pmap(step, axis_name='batch')`; each device sees its [B/D, ...] part, the state carries a leading
  replica axis [D_local, ...], the step `pmean`s gradients and metrics over 'batch' and BatchNorm gets
  `bn_axis_name='batch'` (synced statistics: the backend's closed form with its per-channel sums all-reduced).
- `shard_map`: `jax.jit(jax.shard_map(step, mesh, in_specs=(P(), P('batch'), P()), out_specs=P(),
  check_vma=False))`: per-device code with the same explicit collectives as pmap. `check_vma=False` is required
  with a step that `pmean`s its gradients: with the default `check_vma=True`, the transpose of the implicit
  broadcast of the replicated params already sums the gradients over devices, and the pmean on top leaves them
  D times too large, silently (NOTES.md; a test checks the gradient against the single-device one).
- `single`: one device, no mesh.

Per-device randomness: under pmap and shard_map each device folds its index into the step's key
(`fold_in(rng, axis_index)`), so data augmentation and dropout differ between devices; under jit and single the
key draws numbers for the global batch. Random draws therefore differ between {jit, single} and {pmap,
shard_map}; everything deterministic agrees.

BatchNorm running statistics: under pmap and shard_map the strategy `pmean`s `batch_stats` after every step, so
every replica holds identical statistics whatever the model does (with synced BatchNorm they are equal already;
with ghost BatchNorm the mean over devices of per-slice statistics is the single-device value).

CPU threads: every strategy traces its steps inside `jaxcnn.backends.concurrent_devices(n)`, n = its devices in
this process, so the native CPU kernels get every core on one device and cores // n each when n devices run at once.
The jit strategy on several devices traces XLA's kernels only: the native ones are custom calls that XLA's
SPMD partitioner cannot split, so it would gather the batch and run each whole on every device.

Multi-host: call `init_distributed` first. The devices are ordered by process (process 0's, then process 1's,
...), so process p of P holds rows [p·B/P, (p+1)·B/P) of every global batch and loads only those
(`process_rows`, `put_batch`; the data pipeline does the same from `batch_sharding`). pmap maps over each
process's local devices with collectives across all of them. Only `is_main_process` should write files.
Launching on SLURM and TPU pod slices: docs/multihost.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import importlib.util
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, Sharding, make_single_device_sharding
from jax.sharding import PartitionSpec as P

from jaxcnn import backends
from jaxcnn.config import ConfigError, ParallelConfig
from jaxcnn.data.pipeline import stacked_sharding, take_batch

DATA_AXIS = "data"  # the jit strategy's mesh axis
BATCH_AXIS = "batch"  # the pmap / shard_map axis name (BatchNorm's axis_name)
STRATEGIES = ("jit", "pmap", "shard_map", "single")


def _shard_map(f: Callable, *, mesh: Mesh, in_specs: Any, out_specs: Any) -> Callable:
    """`jax.shard_map` with `check_vma=False` (jax >= 0.7; both supported interpreters have it)."""
    if hasattr(jax, "shard_map"):
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    from jax.experimental.shard_map import (
        shard_map,  # older jax: the same function, `check_rep` spelling
    )

    return shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


# ---------------------------------------------------------------------------------------------------------
# Multi-host initialisation
# ---------------------------------------------------------------------------------------------------------


def _int_env(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} must be an integer") from None


def detected_cluster() -> str | None:
    """The multi-process launcher this process runs under, from the environment, or None.

    'coordinator' (JAX_COORDINATOR_ADDRESS set), 'slurm' (an srun step with more than one task), 'openmpi'
    (mpirun with more than one process), 'tpu' (a Cloud TPU VM or a TPU pod slice).
    """
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "coordinator"
    slurm_keys = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")
    if all(k in env for k in slurm_keys) and (_int_env("SLURM_NTASKS") or _int_env("SLURM_STEP_NUM_TASKS") or 1) > 1:
        return "slurm"
    if "OMPI_MCA_orte_hnp_uri" in env and (_int_env("OMPI_COMM_WORLD_SIZE") or 1) > 1:
        return "openmpi"
    if any(env.get(k) for k in ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS")):
        return "tpu"
    if _on_cloud_tpu_vm():
        return "tpu"
    return None


def _on_cloud_tpu_vm() -> bool:
    """A Cloud TPU VM, decided as JAX decides it when it starts libtpu: libtpu installed (or TPU_LIBRARY_PATH set) and
    a Google (PCI vendor 0x1ae0) processing accelerator (PCI class 0x12) on the bus."""
    if not os.environ.get("TPU_LIBRARY_PATH") and importlib.util.find_spec("libtpu") is None:
        return False
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        device = os.path.dirname(vendor)
        try:
            with open(vendor) as v, open(os.path.join(device, "class")) as c:
                if v.read().strip() == "0x1ae0" and c.read().strip().startswith("0x12"):
                    return True
        except OSError:
            continue
    return False


def init_distributed(cfg: ParallelConfig) -> bool:
    """Starts `jax.distributed` if the config or the environment asks for it; returns whether it is running.

    Call it first in the process, before anything else touches jax devices (jax requires it).

    - `distributed='off'`: never.
    - `'on'`: always, with `coordinator_address`, `num_processes`, `process_id` from the config, else from the
      environment (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID), else detected by JAX (SLURM,
      Open MPI, Cloud TPU). ConfigError if nothing gives a coordinator.
    - `'auto'` (default): as 'on' when a coordinator address is configured or `detected_cluster()` finds a
      multi-process launcher; on a single plain machine it does nothing.

    Raises ConfigError when a coordinator is set without the process count and id (and no cluster supplies
    them), RuntimeError (with what to do) when jax refuses, e.g. because the backend already started.
    Under SLURM, JAX gives each process the one GPU numbered SLURM_LOCALID unless JAX_LOCAL_DEVICE_IDS says
    otherwise (docs/multihost.md). Cross-process collectives on CPU use gloo (`jax_cpu_collectives_implementation`, the default in jax 0.10 and
    0.12); GPUs use NCCL and TPUs their interconnect.
    """
    if cfg.distributed not in ("auto", "on", "off"):
        raise ConfigError(f"parallel.distributed={cfg.distributed!r} must be 'auto', 'on' or 'off'")
    if cfg.distributed == "off":
        return False
    if jax.distributed.is_initialized():
        return True
    coordinator = cfg.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    num_processes = cfg.num_processes if cfg.num_processes is not None else _int_env("JAX_NUM_PROCESSES")
    process_id = cfg.process_id if cfg.process_id is not None else _int_env("JAX_PROCESS_ID")
    if cfg.distributed == "auto" and coordinator is None and detected_cluster() is None:
        return False
    if coordinator is not None and (num_processes is None or process_id is None) and detected_cluster() in (
        None,
        "coordinator",
    ):
        raise ConfigError(
            f"parallel.coordinator_address={coordinator!r} is set but the process count or this process's id is "
            f"not (num_processes={num_processes}, process_id={process_id}); set parallel.num_processes and "
            f"parallel.process_id (or JAX_NUM_PROCESSES and JAX_PROCESS_ID) on every process"
        )
    try:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    except ValueError as e:  # JAX found no cluster to take the missing values from
        raise ConfigError(
            f"parallel.distributed={cfg.distributed!r}: jax.distributed.initialize could not start ({e}); no "
            f"coordinator is configured and JAX detected no cluster (SLURM, Open MPI, Cloud TPU). Set "
            f"parallel.coordinator_address, parallel.num_processes and parallel.process_id (see docs/multihost.md)"
        ) from e
    except RuntimeError as e:
        raise RuntimeError(
            f"jax.distributed.initialize failed: {e}. It must run before any other jax call in the process "
            f"(call jaxcnn.train.parallel.init_distributed first), and every process must reach the coordinator "
            f"{coordinator or '(detected)'}"
        ) from e
    return True


# ---------------------------------------------------------------------------------------------------------
# Batch sizes
# ---------------------------------------------------------------------------------------------------------


def check_batch_size(batch_size: int, num_devices: int, *, accum_steps: int = 1, what: str = "data.batch_size") -> None:
    """Raises ConfigError unless `batch_size` splits into `num_devices` × `accum_steps` equal parts.

    The message gives the numbers and the nearest valid sizes.
    """
    unit = num_devices * max(accum_steps, 1)
    if batch_size <= 0:
        raise ConfigError(f"{what}={batch_size} must be positive")
    if batch_size % unit == 0:
        return
    below, above = (batch_size // unit) * unit, (batch_size // unit + 1) * unit
    nearest = f"{below} or {above}" if below else f"{above}"
    parts = f"{num_devices} devices" + (f" × {accum_steps} accumulation micro-batches" if accum_steps > 1 else "")
    raise ConfigError(
        f"{what}={batch_size} does not split evenly over {parts}: it must be a multiple of {unit}. "
        f"Nearest valid sizes: {nearest} (or change parallel.num_devices"
        + (", optim.accum_steps" if accum_steps > 1 else "")
        + ")"
    )


# ---------------------------------------------------------------------------------------------------------
# Strategy
# ---------------------------------------------------------------------------------------------------------


def global_devices() -> list[Any]:
    """All devices of all processes, grouped by process (process 0's first), each group in local order."""
    return [d for p in range(jax.process_count()) for d in jax.local_devices(process_index=p)]


def _host_copy(x: Any) -> np.ndarray:
    """A private host copy of one replica of `x` (never aliasing a device buffer that a donation could free)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = x.addressable_data(0)
    return np.array(x, copy=True)


def _sync_batch_stats(state: Any, axis: str) -> Any:
    """The state with its floating BatchNorm statistics averaged over `axis` (identical replicas)."""
    stats = getattr(state, "batch_stats", None)
    if not stats:
        return state

    def avg(x: jax.Array) -> jax.Array:
        return lax.pmean(x, axis) if jax.numpy.issubdtype(x.dtype, jax.numpy.floating) else x

    return state.replace(batch_stats=jax.tree_util.tree_map(avg, stats))


@dataclasses.dataclass(frozen=True)
class Strategy:
    """How the steps run on the devices; made by `make_strategy`. See the module docstring."""

    name: str
    devices: tuple[Any, ...]  # global, grouped by process
    axis_name: str | None  # what make_train_step / make_eval_step get: None (jit, single) or 'batch'
    model_overrides: Mapping[str, Any]  # model knobs, e.g. {'bn_axis_name': 'batch'}
    batch_sharding: Sharding  # how global [B, ...] batches are laid out (for the data loaders)
    global_batch_size: int
    mesh: Mesh | None = None

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    @property
    def local_devices(self) -> tuple[Any, ...]:
        return tuple(d for d in self.devices if d.process_index == jax.process_index())

    @property
    def process_index(self) -> int:
        return jax.process_index()

    @property
    def process_count(self) -> int:
        return jax.process_count()

    @property
    def is_main_process(self) -> bool:
        return jax.process_index() == 0

    @property
    def _replicated(self) -> Sharding:
        if self.mesh is None:
            return self.batch_sharding
        return NamedSharding(self.mesh, P())

    @property
    def _local_mesh(self) -> Mesh:
        return Mesh(np.array(self.local_devices), (BATCH_AXIS,))

    # -- data ------------------------------------------------------------------------------------------------

    def process_rows(self, batch_size: int | None = None) -> slice:
        """The rows of a global batch of `batch_size` (default: the training batch) this process holds."""
        b = self.global_batch_size if batch_size is None else batch_size
        rows: set[int] = set()
        for index in self.batch_sharding.addressable_devices_indices_map((b,)).values():
            rows.update(range(b)[index[0]])
        lo, hi = min(rows), max(rows) + 1
        if hi - lo != len(rows):
            raise RuntimeError(f"process {self.process_index} holds non-contiguous rows of the batch: {sorted(rows)}")
        return slice(lo, hi)

    def put_batch(self, local_batch: Mapping[str, np.ndarray], batch_size: int | None = None) -> dict[str, jax.Array]:
        """Host arrays holding this process's rows (`process_rows`) -> global [B, ...] arrays on `batch_sharding`.

        On one process the local rows are the whole batch. `batch_size`: the global B (default: the training
        batch; pass it for evaluation batches).
        """
        b = self.global_batch_size if batch_size is None else batch_size
        if self.process_count == 1 and len(self.batch_sharding.device_set) == 1:
            return {k: jax.device_put(np.asarray(v), self.batch_sharding) for k, v in local_batch.items()}
        return {
            k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v), (b,) + np.shape(v)[1:])
            for k, v in local_batch.items()
        }

    # -- state -----------------------------------------------------------------------------------------------

    def place_state(self, state: Any) -> Any:
        """A copy of `state` (host or device arrays) replicated on every device of the strategy.

        jit / shard_map: global arrays with sharding P(); pmap: [D_local, ...] arrays, one replica per local
        device; single: arrays on the one device. The copy never aliases `state`, so donating it is safe.
        """

        def put(x: Any) -> Any:
            host = _host_copy(x)
            if self.name == "single":
                return jax.device_put(host, self.devices[0])
            if self.name == "pmap":
                n = len(self.local_devices)
                stacked = np.broadcast_to(host, (n,) + host.shape)
                return jax.device_put(stacked, NamedSharding(self._local_mesh, P(BATCH_AXIS)))
            return jax.make_array_from_callback(host.shape, self._replicated, lambda idx: np.asarray(host[idx]))

        return jax.tree_util.tree_map(put, state)

    def unreplicate(self, state: Any) -> Any:
        """A host (numpy) copy of one replica of a placed state: the same tree for every strategy."""

        def get(x: Any) -> Any:
            if not isinstance(x, jax.Array):
                return np.asarray(x)
            one = np.asarray(jax.device_get(x.addressable_data(0)))
            return one.reshape(x.shape[1:]) if self.name == "pmap" else one.reshape(x.shape)

        return jax.tree_util.tree_map(get, state)

    def replicas(self, x: jax.Array) -> list[np.ndarray]:
        """Every local device's copy of a placed state leaf, as numpy (to check that replicas agree)."""
        by_device = {s.device: np.asarray(jax.device_get(s.data)) for s in x.addressable_shards}
        shape = x.shape[1:] if self.name == "pmap" else x.shape
        return [by_device[d].reshape(shape) for d in self.local_devices if d in by_device]

    # -- steps -----------------------------------------------------------------------------------------------

    def _pmap_batch(self, batch: Any) -> Any:
        """Global [B, ...] batch arrays -> this process's [D_local, B/D, ...] arrays, device-local, for pmap."""
        n, d = len(self.local_devices), self.num_devices
        sharding = NamedSharding(self._local_mesh, P(BATCH_AXIS))

        def split(x: jax.Array) -> jax.Array:
            per = x.shape[0] // d
            if self.process_count == 1:
                return _split_leading(x, n)
            shards = {s.device: s.data for s in x.addressable_shards}
            parts = [shards[dev].reshape((1, per) + x.shape[1:]) for dev in self.local_devices]
            return jax.make_array_from_single_device_arrays((n, per) + x.shape[1:], sharding, parts)

        return jax.tree_util.tree_map(split, batch)

    def _traced_here(self, fn: Callable) -> Callable:
        """`fn`, traced with the backend told how many of this process's devices run it at once (its thread share)."""
        n = len(self.local_devices)
        # The native CPU kernels are custom calls without partitioning rules: under the jit strategy XLA would gather
        # the global batch and run each of them whole on every device. With several devices that strategy therefore
        # traces XLA's own kernels, which its SPMD partitioner splits over the batch.
        xla_only = self.name == "jit" and self.num_devices > 1

        @functools.wraps(fn)
        def traced(*args: Any, **kwargs: Any) -> Any:
            with backends.concurrent_devices(n), (backends.xla_kernels() if xla_only else contextlib.nullcontext()):
                return fn(*args, **kwargs)

        return traced

    def compile_train_step(self, train_step: Callable) -> Callable:
        """`train_step(state, batch, rng) -> (state, metrics)` compiled for this strategy, the state donated.

        state: placed by `place_state`; batch: global [B, ...] arrays on `batch_sharding`; rng: one key for the
        step. Returns the new placed state and scalar metrics. The returned function checks the batch size
        before compiling.
        """
        train_step = self._traced_here(train_step)
        if self.name == "single":
            compiled = jax.jit(train_step, donate_argnums=0)
        elif self.name == "jit":
            rep = self._replicated
            compiled = jax.jit(
                train_step,
                in_shardings=(rep, self.batch_sharding, rep),
                out_shardings=(rep, rep),
                donate_argnums=0,
            )
        else:
            per_device = _per_device_train_step(train_step, BATCH_AXIS)
            if self.name == "pmap":
                pmapped = jax.pmap(
                    per_device,
                    axis_name=BATCH_AXIS,
                    in_axes=(0, 0, None),
                    out_axes=(0, None),
                    donate_argnums=0,
                    devices=list(self.devices),
                )

                def compiled(state: Any, batch: Any, rng: jax.Array) -> Any:
                    return pmapped(state, self._pmap_batch(batch), rng)

            else:
                rep = self._replicated
                mapped = _shard_map(
                    per_device, mesh=self.mesh, in_specs=(P(), P(BATCH_AXIS), P()), out_specs=(P(), P())
                )
                compiled = jax.jit(
                    mapped, in_shardings=(rep, self.batch_sharding, rep), out_shardings=(rep, rep), donate_argnums=0
                )
        return self._checked(compiled, self.global_batch_size, "the train batch")

    def compile_train_steps(self, train_step: Callable) -> Callable:
        """`train_steps(state, batches, first, count, rng, step0) -> (state, metric_sums)`: `count` steps per call.

        The loop `jaxcnn train` runs (jaxcnn.train.step.make_multi_step): batches are an epoch's stacked global
        batches [S, B, ...] as `DeviceEpochLoader.epoch_arrays` puts them (batch axis on `batch_sharding`); step i
        trains on batches[first + i] with ``fold_in(rng, step0 + i)``, exactly as `count` calls of
        `compile_train_step`'s function would, to float rounding. single / jit / shard_map compile the whole loop
        (the state donated); pmap calls its per-step function `count` times (jax.pmap is in maintenance mode: use
        jit or shard_map for speed). Raises ValueError, before compiling, for a count outside [1, S - first].
        """
        from jaxcnn.train.step import make_multi_step

        train_step = self._traced_here(train_step)
        rep = self._replicated
        stacked = stacked_sharding(self.batch_sharding)
        if self.name == "single":
            compiled = jax.jit(make_multi_step(train_step), donate_argnums=0)
        elif self.name == "jit":
            compiled = jax.jit(make_multi_step(train_step), in_shardings=(rep, stacked, rep, rep, rep, rep),
                               out_shardings=(rep, rep), donate_argnums=0)
        elif self.name == "shard_map":
            mapped = _shard_map(make_multi_step(_per_device_train_step(train_step, BATCH_AXIS)), mesh=self.mesh,
                                in_specs=(P(), P(None, BATCH_AXIS), P(), P(), P(), P()), out_specs=(P(), P()))
            compiled = jax.jit(mapped, in_shardings=(rep, stacked, rep, rep, rep, rep), out_shardings=(rep, rep),
                               donate_argnums=0)
        else:
            compiled = self._per_step_loop(self.compile_train_step(train_step))
        b = self.global_batch_size

        def run(state: Any, batches: Mapping[str, jax.Array], first: int, count: int, rng: jax.Array,
                step0: int) -> Any:
            sizes = {k: tuple(np.shape(v)[:2]) for k, v in batches.items()}
            if len(set(sizes.values())) != 1 or any(len(v) != 2 for v in sizes.values()):
                raise ValueError(f"train_steps: batches must be stacked [steps, batch, ...] arrays that agree on "
                                 f"both, got leading shapes {sizes}")
            s, got = next(iter(sizes.values()))
            if got != b:
                raise ValueError(f"train_steps: the stacked batches hold batches of {got} examples but the strategy "
                                 f"was made for global batches of {b}")
            if not (0 <= int(first) and 1 <= int(count) and int(first) + int(count) <= s):
                raise ValueError(f"train_steps: first={first}, count={count} must satisfy 0 <= first, 1 <= count "
                                 f"and first + count <= {s} (the stacked batches)")
            return compiled(state, batches, int(first), int(count), rng, int(step0))

        run.__wrapped__ = compiled  # type: ignore[attr-defined]
        return run

    @staticmethod
    def _per_step_loop(train_step: Callable) -> Callable:
        """make_multi_step's contract as a Python loop over a per-step function (the pmap strategy)."""

        def run(state: Any, batches: Mapping[str, jax.Array], first: int, count: int, rng: jax.Array,
                step0: int) -> Any:
            sums = None
            for i in range(count):
                batch = take_batch(batches, first + i)
                state, metrics = train_step(state, batch, jax.random.fold_in(rng, step0 + i))
                sums = metrics if sums is None else jax.tree_util.tree_map(jax.numpy.add, sums, metrics)
            return state, sums

        return run

    def compile_eval_step(self, eval_step: Callable) -> Callable:
        """`eval_step(state, batch) -> metric sums` compiled for this strategy (sums over all devices).

        batch: global [B, ...] arrays on `batch_sharding`, B any multiple of the device count (padded batches
        carry `mask`).
        """
        eval_step = self._traced_here(eval_step)
        options = backends.eval_compiler_options()
        if self.name == "single":
            compiled = jax.jit(eval_step, compiler_options=options)
        elif self.name == "jit":
            rep = self._replicated
            compiled = jax.jit(eval_step, in_shardings=(rep, self.batch_sharding), out_shardings=rep,
                               compiler_options=options)
        elif self.name == "pmap":
            pmapped = jax.pmap(
                eval_step, axis_name=BATCH_AXIS, in_axes=(0, 0), out_axes=None, devices=list(self.devices)
            )

            def compiled(state: Any, batch: Any) -> Any:
                return pmapped(state, self._pmap_batch(batch))

        else:
            rep = self._replicated
            mapped = _shard_map(eval_step, mesh=self.mesh, in_specs=(P(), P(BATCH_AXIS)), out_specs=P())
            compiled = jax.jit(mapped, in_shardings=(rep, self.batch_sharding), out_shardings=rep,
                               compiler_options=options)
        return self._checked(compiled, None, "the eval batch")

    def _checked(self, fn: Callable, expected: int | None, what: str) -> Callable:
        """Wraps a compiled step with a batch-size check that runs before tracing (a clear error, not XLA's)."""

        def step(state: Any, batch: Mapping[str, jax.Array], *rest: Any) -> Any:
            sizes = {k: np.shape(v)[0] for k, v in batch.items()}
            b = next(iter(sizes.values()))
            if len(set(sizes.values())) != 1:
                raise ValueError(f"{what}: the batch's arrays disagree on the batch size: {sizes}")
            if expected is not None and b != expected:
                raise ValueError(
                    f"{what} has {b} examples but the strategy was made for global batches of {expected}; "
                    f"pass the global batch (all processes' rows) placed with strategy.batch_sharding"
                )
            check_batch_size(b, self.num_devices, what=what)
            return fn(state, batch, *rest)

        step.__wrapped__ = fn  # type: ignore[attr-defined]
        return step


def _per_device_train_step(train_step: Callable, axis: str) -> Callable:
    """The step as each device runs it under pmap / shard_map: its own random stream, synced BatchNorm stats."""

    def step(state: Any, batch: Any, rng: jax.Array) -> Any:
        rng = jax.random.fold_in(rng, lax.axis_index(axis))
        new_state, metrics = train_step(state, batch, rng)
        return _sync_batch_stats(new_state, axis), metrics

    return step


@functools.partial(jax.jit, static_argnums=1)
def _split_leading(x: jax.Array, n: int) -> jax.Array:
    """[B, ...] -> [n, B/n, ...] (a device-local reshape when B is sharded over n devices in order)."""
    return x.reshape((n, x.shape[0] // n) + x.shape[1:])


def make_strategy(cfg: ParallelConfig, global_batch_size: int, *, accum_steps: int = 1) -> Strategy:
    """The strategy named by `cfg.strategy` over `cfg.num_devices` devices (None = all devices of all processes).

    Raises ConfigError, before anything is compiled, if `global_batch_size` does not split into num_devices ×
    accum_steps equal parts (the message names the nearest valid sizes), or if the device count is impossible.
    """
    if cfg.strategy not in STRATEGIES:
        raise ConfigError(f"parallel.strategy={cfg.strategy!r} is not known; choose one of: {', '.join(STRATEGIES)}")
    every = global_devices()
    nproc = jax.process_count()
    if cfg.strategy == "single":
        if nproc > 1:
            raise ConfigError(
                f"parallel.strategy='single' runs on one device, but this run has {nproc} processes; use 'jit', "
                f"'pmap' or 'shard_map' for multi-host training"
            )
        if cfg.num_devices not in (None, 1):
            raise ConfigError(f"parallel.strategy='single' uses one device; parallel.num_devices={cfg.num_devices}")
        devices: Sequence[Any] = every[:1]
    else:
        n = len(every) if cfg.num_devices is None else cfg.num_devices
        if not 1 <= n <= len(every):
            raise ConfigError(
                f"parallel.num_devices={cfg.num_devices} but there are {len(every)} devices "
                f"({jax.local_device_count()} local × {nproc} processes)"
            )
        if nproc > 1 and n != len(every):
            raise ConfigError(
                f"parallel.num_devices={n}: with {nproc} processes every device takes part ({len(every)}); "
                f"leave parallel.num_devices unset"
            )
        devices = every[:n]
    check_batch_size(global_batch_size, len(devices), accum_steps=accum_steps)

    if cfg.strategy == "single":
        return Strategy(
            name="single",
            devices=tuple(devices),
            axis_name=None,
            model_overrides={},
            batch_sharding=make_single_device_sharding(devices[0]),
            global_batch_size=global_batch_size,
        )
    if cfg.strategy == "jit":
        mesh = Mesh(np.array(devices), (DATA_AXIS,))
        return Strategy(
            name="jit",
            devices=tuple(devices),
            axis_name=None,
            model_overrides={},
            batch_sharding=NamedSharding(mesh, P(DATA_AXIS)),
            global_batch_size=global_batch_size,
            mesh=mesh,
        )
    mesh = Mesh(np.array(devices), (BATCH_AXIS,))
    return Strategy(
        name=cfg.strategy,
        devices=tuple(devices),
        axis_name=BATCH_AXIS,
        model_overrides={"bn_axis_name": BATCH_AXIS},
        batch_sharding=NamedSharding(mesh, P(BATCH_AXIS)),
        global_batch_size=global_batch_size,
        mesh=mesh,
    )
