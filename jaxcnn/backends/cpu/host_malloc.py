"""Opt-in glibc malloc settings that keep the memory of XLA's CPU executions mapped from one call to the next.

    JAXCNN_HOST_MALLOC=1 python my_per_step_loop.py      # or, in the process, before JAX starts its backend:
    os.environ["JAXCNN_HOST_MALLOC"] = "1"; configure_host_malloc()   # (configure_xla_cpu() calls it)

Why: on the CPU, XLA allocates each execution's temporary buffer (every activation the backward pass keeps:
285 MB for a CIFAR ResNet-20 step at batch 128) with `posix_memalign` from one of its worker threads, and frees
it when the execution ends. With glibc's defaults a block that size is `mmap`ed fresh and `munmap`ed again, so
every call touches 70,000 new pages, each a page fault that the kernel zero-fills: 150 ms of kernel time in
a 480 ms step on the 2-core benchmark machine (`getrusage` minor faults, `strace`; benchmarks/README.md).
Three settings keep that memory in the process and reuse it:

- ``M_ARENA_MAX = 1``: every thread allocates from the main (``brk``) heap. Worker threads otherwise get
  their own 64 MB arenas, which cannot hold such a block and hand it to ``mmap``.
- ``M_MMAP_MAX = 0``: no allocation is served by ``mmap``, however large.
- ``M_TRIM_THRESHOLD = 2 GiB``: freed memory at the top of the heap stays mapped unless more than 2 GiB of it
  is free at once.

**Off by default.** `jaxcnn train` runs many steps per compiled call (`Strategy.compile_train_steps`), so the
buffer is allocated once per call of ~50 steps instead of once per step and the faults cost about 1%; the
single arena, on the other hand, slows every allocation-heavy thread (measured with the multi-step loop, glibc's
defaults against these settings, alternating processes: the fast Fashion-MNIST recipe's net 7,400-8,000 against
6,200-6,500 images/s, LeNet-5 +15%, ResNet-20 the same). They pay where one step runs per call, e.g. a
hand-written loop over `compile_train_step` (ResNet-20 330 -> 450-511 images/s, per-step calls): set
`JAXCNN_HOST_MALLOC=1` there.

Threads choose their arena at their first allocation, so this must run before JAX starts its backend (and
its thread pools); later, it is too late for XLA's worker threads (`configure_xla_cpu` warns). It changes
nothing unless `JAXCNN_HOST_MALLOC=1`, when `GLIBC_TUNABLES` already sets any ``glibc.malloc.*`` tunable (the
user's choice wins), or on a C library without glibc's `mallopt` (macOS, musl).
"""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt parameters (glibc's <malloc.h>).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8

SETTINGS: dict[str, tuple[int, int]] = {
    "arena_max": (M_ARENA_MAX, 1),
    "mmap_max": (M_MMAP_MAX, 0),
    "trim_threshold": (M_TRIM_THRESHOLD, 2**31 - 1),
}

ENV_SWITCH = "JAXCNN_HOST_MALLOC"


def _glibc() -> ctypes.CDLL | None:
    """This process's C library when it is glibc with `mallopt` (musl has no `gnu_get_libc_version`), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018
        libc.mallopt  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def skip_reason() -> str | None:
    """Why `configure_host_malloc` would change nothing here, or None when it applies its settings."""
    if os.environ.get(ENV_SWITCH, "0").strip().lower() not in ("1", "true", "yes", "on"):
        return f"{ENV_SWITCH} is not 1 (the settings are opt-in)"
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES already sets glibc.malloc tunables"
    if _glibc() is None:
        return f"the C library is not glibc ({sys.platform})"
    return None


def configure_host_malloc() -> bool:
    """Applies `SETTINGS` with glibc's `mallopt`; True when applied, False when skipped (see `skip_reason`)."""
    if skip_reason() is not None:
        return False
    mallopt = _glibc().mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in SETTINGS.values())


__all__ = ["ENV_SWITCH", "SETTINGS", "configure_host_malloc", "skip_reason"]
