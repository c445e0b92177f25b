"""The backend seam holds: only `jaxcnn.backends` imports the CPU backend's internals, nothing imports `jax._src`,
and every dispatch function gives the values of the `lax` operation it stands for."""

from __future__ import annotations

import ast
import contextlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxcnn import backends

REPO = Path(__file__).resolve().parents[2]
BACKENDS = REPO / "jaxcnn" / "backends"
BACKEND_TESTS = REPO / "tests" / "backends"


def imported_modules(path: Path) -> list[str]:
    """Every module `path` imports (absolute names; `from a import b` counts as a and a.b)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def python_files(*folders: str) -> list[Path]:
    return [p for folder in folders for p in sorted((REPO / folder).rglob("*.py")) if ".ipynb_checkpoints" not in p.parts]


def test_only_the_seam_imports_the_cpu_backend_and_nothing_imports_jax_src():
    offenders = []
    for path in python_files("jaxcnn", "benchmarks", "experiments", "examples", "tests"):
        inside_backend = BACKENDS in path.parents or BACKEND_TESTS in path.parents
        for name in imported_modules(path):
            if name == "jax._src" or name.startswith("jax._src."):
                offenders.append(f"{path.relative_to(REPO)}: imports {name} (private JAX API)")
            if not inside_backend and (name == "jaxcnn.backends.cpu" or name.startswith("jaxcnn.backends.cpu.")):
                offenders.append(f"{path.relative_to(REPO)}: imports {name}; use jaxcnn.backends")
    assert not offenders, "\n".join(offenders)


def test_the_scan_sees_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import jax._src.xla_bridge\nfrom jaxcnn.backends.cpu import kernels\n")
    assert imported_modules(probe) == ["jax._src.xla_bridge", "jaxcnn.backends.cpu", "jaxcnn.backends.cpu.kernels"]


@pytest.mark.parametrize("native", [True, False], ids=["native", "xla"])
def test_dispatch_functions_equal_lax(native):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 6, 6, 3)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 3, 4)), jnp.float32)
    pads = ((1, 1), (1, 1))

    def conv(f):
        return f(x, w, (1, 1), pads, dimension_numbers=backends.NHWC_HWIO)

    a = jnp.asarray(rng.standard_normal((5, 7)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((7, 3)), jnp.float32)
    dims = (((1,), (0,)), ((), ()))
    with (contextlib.nullcontext() if native else backends.xla_kernels()):
        got_conv = jax.jit(lambda: conv(backends.conv_general_dilated))()
        got_dot = jax.jit(lambda: backends.dot_general(a, b, dims))()
        got_pool = jax.jit(lambda: backends.max_pool(x, (2, 2), (2, 2), ((0, 0), (0, 0))))()
        got_pool3 = backends.max_pool(x, (3, 3), (1, 1), pads)
    np.testing.assert_allclose(got_conv, conv(lax.conv_general_dilated), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_dot, lax.dot_general(a, b, dims, precision="highest"), rtol=1e-5, atol=1e-5)
    for got, window, strides, padding in ((got_pool, (2, 2), (2, 2), ((0, 0), (0, 0))),
                                          (got_pool3, (3, 3), (1, 1), pads)):
        want = lax.reduce_window(x, -np.inf, lax.max, (1, *window, 1), (1, *strides, 1), ((0, 0), *padding, (0, 0)))
        np.testing.assert_array_equal(got, want)

