"""XLA flags for the CPU backend, and the host malloc settings it runs best with, set before JAX starts it.

XLA reads `XLA_FLAGS` once, when JAX creates its first backend (the first array, jit or `jax.devices()`), so
`configure_xla_cpu()` must run before that: `jaxcnn.train.loop.train` (and so `python -m jaxcnn train` and
`sweep`) calls it first thing; a script or notebook that builds its own steps calls it before its first JAX call.

    from jaxcnn.backends.cpu.xla_flags import configure_xla_cpu
    configure_xla_cpu()          # then import models, build arrays, ...

A flag the user already put in `XLA_FLAGS` is never overridden, so any default below can be switched off from
the environment (e.g. `XLA_FLAGS=--xla_cpu_use_thunk_runtime=true`).

The same call applies `jaxcnn.backends.cpu.host_malloc.configure_host_malloc()` when `JAXCNN_HOST_MALLOC=1` (glibc
keeps each execution's temporary memory mapped instead of page-faulting it in again every call; opt-in, for
loops that run one step per call), which has the same deadline: before JAX starts its thread pools.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings

from jaxcnn.backends.cpu.host_malloc import configure_host_malloc

# flag -> value, with why. Applied on every platform (XLA ignores CPU flags on GPU/TPU backends).
DEFAULT_CPU_FLAGS: dict[str, str] = {
    # Convolutions on XLA's classic (Eigen) kernels instead of YNNPACK, which jax 0.10-0.12 use by default for the
    # filter-gradient convolutions: Eigen runs those 1.5-3x faster on this CPU (benchmarks/README.md); dots,
    # reductions and elementwise ops stay on their defaults. The leading '-' removes one entry from the default
    # set (both jax 0.10 and 0.12 accept it).
    "xla_cpu_experimental_ynn_fusion_type": "-individual_convolution",
}


def _flag_name(item: str) -> str:
    return item.lstrip("-").split("=", 1)[0]


def _backends_started() -> bool:
    """Whether JAX already started its backends in this process (after which XLA_FLAGS is read no more).

    JAX has no public query for it, but its documented rule for ``jax_num_cpu_devices`` is one: the setting may only
    change before the backends start, and `jax.config.update` raises RuntimeError after. So: try to change it, and
    put the value back when that worked.
    """
    if "jax" not in sys.modules:
        return False
    import jax

    current = jax.config.jax_num_cpu_devices
    try:
        jax.config.update("jax_num_cpu_devices", current + 1 if current < 1 << 20 else 1)
    except RuntimeError:
        return True
    jax.config.update("jax_num_cpu_devices", current)
    return False


def configure_xla_cpu(flags: dict[str, str] | None = None) -> bool:
    """Adds `flags` (default `DEFAULT_CPU_FLAGS`) to `XLA_FLAGS`, keeping any flag the user already set.

    Returns True when the flags are in place for the backend about to start, False (with a warning) when JAX
    already started its backends in this process, where new XLA flags have no effect.
    """
    flags = DEFAULT_CPU_FLAGS if flags is None else flags
    if not _backends_started():
        configure_host_malloc()
    current = os.environ.get("XLA_FLAGS", "").split()
    present = {_flag_name(item) for item in current}
    missing = [f"--{name}={value}" for name, value in flags.items() if name not in present]
    if not missing:
        return True
    if _backends_started():
        import jax

        if jax.default_backend() == "cpu":  # on GPU/TPU the CPU flags would not matter anyway
            warnings.warn(
                f"jaxcnn: JAX's CPU backend is already running, so the XLA flags {' '.join(missing)} and jaxcnn's "
                "host malloc settings cannot take effect (training runs slower); call "
                "jaxcnn.backends.cpu.xla_flags.configure_xla_cpu() before the first JAX array or jit",
                RuntimeWarning,
                stacklevel=2,
            )
        return False
    os.environ["XLA_FLAGS"] = " ".join(current + missing)
    return True


# Per-executable options for evaluation steps on the CPU: YNNPACK only for individual dots, so that XLA's own
# fusions run the eval-mode BatchNorm, ReLU and pooling (YNNPACK's reduce and elementwise fusions split them into
# materialised broadcasts). The fast Fashion-MNIST recipe's evaluation (10,000 images with flip test-time
# augmentation): 2.7 -> 1.2 s, its first call (with compilation) 3.4 -> 1.7 s; 2026-12-07, jax 0.10.2, 2-core Xeon.
# Not for training steps: there the same option trained the recipe 10% slower and the MLP's gradients lose
# YNNPACK's reductions (docs/cpu_backend.md, benchmarks/README.md).
EVAL_COMPILER_OPTIONS: dict[str, str] = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


@functools.lru_cache(maxsize=None)
def eval_compiler_options() -> dict[str, str] | None:
    """`EVAL_COMPILER_OPTIONS` when JAX's default backend is the CPU and its XLA accepts them, else None (the
    defaults). Checked once per process by compiling a one-operation function with them."""
    import jax
    import jax.numpy as jnp

    if jax.default_backend() != "cpu":
        return None
    try:
        jax.jit(jnp.negative, compiler_options=EVAL_COMPILER_OPTIONS).lower(jnp.zeros((2,), jnp.float32)).compile()
    except Exception:  # noqa: BLE001 - an XLA without the option or the value: keep its defaults
        return None
    return dict(EVAL_COMPILER_OPTIONS)


__all__ = ["DEFAULT_CPU_FLAGS", "EVAL_COMPILER_OPTIONS", "configure_xla_cpu", "eval_compiler_options"]
