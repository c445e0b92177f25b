"""jaxcnn.backends.cpu.xla_flags: flags land in XLA_FLAGS before the backend starts, user settings win, late calls warn."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def run_python(code: str, xla_flags: str) -> subprocess.CompletedProcess:
    env = {"XLA_FLAGS": xla_flags, "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=120)


def test_adds_defaults_keeps_user_flags_and_warns_when_too_late():
    code = """
        import os, warnings
        from jaxcnn.backends.cpu.xla_flags import DEFAULT_CPU_FLAGS, configure_xla_cpu
        assert configure_xla_cpu() is True
        flags = os.environ["XLA_FLAGS"].split()
        assert "--xla_force_host_platform_device_count=2" in flags
        for name, value in DEFAULT_CPU_FLAGS.items():
            assert f"--{name}={value}" in flags, flags
        assert configure_xla_cpu({"xla_cpu_experimental_ynn_fusion_type": "other"}) is True  # already set: kept
        assert os.environ["XLA_FLAGS"].split() == flags
        import jax
        assert jax.device_count() == 2  # the flags reached XLA
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert configure_xla_cpu({"xla_cpu_enable_fast_math": "false"}) is False
        assert any("already running" in str(w.message) for w in caught)
        print("ok")
    """
    result = run_python(code, "--xla_force_host_platform_device_count=2")
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_user_value_of_a_default_flag_wins():
    code = """
        import os
        from jaxcnn.backends.cpu.xla_flags import configure_xla_cpu
        configure_xla_cpu()
        print(os.environ["XLA_FLAGS"])
    """
    result = run_python(code, "--xla_cpu_experimental_ynn_fusion_type=individual_dot")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["--xla_cpu_experimental_ynn_fusion_type=individual_dot"]


def test_backends_started_is_read_through_public_jax_api():
    """`_backends_started` (jax.config's rule for jax_num_cpu_devices, no private module) flips when the first array
    exists and leaves the setting as it found it, on every supported jax."""
    code = """
        from jaxcnn.backends.cpu.xla_flags import _backends_started
        import jax
        before = jax.config.jax_num_cpu_devices
        assert _backends_started() is False
        assert jax.config.jax_num_cpu_devices == before
        jax.numpy.ones(2).block_until_ready()
        assert _backends_started() is True
        assert jax.config.jax_num_cpu_devices == before
        print("ok")
    """
    result = run_python(code, "")
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_eval_compiler_options_keep_the_values_of_xla_defaults():
    """An evaluation-shaped function (inference BatchNorm, ReLU, 2x2 max pool, mean) compiled with the eval options
    gives XLA's default compilation's values; on the CPU the options are the documented ones."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxcnn import backends
    from jaxcnn.backends.cpu.xla_flags import EVAL_COMPILER_OPTIONS

    options = backends.eval_compiler_options()
    assert options == (EVAL_COMPILER_OPTIONS if jax.default_backend() == "cpu" else None)

    def infer(x, mean, var, scale, bias):
        y = jnp.maximum((x - mean) * (jax.lax.rsqrt(var + 1e-5) * scale) + bias, 0.0)
        n, h, w, c = y.shape
        return y.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4)).mean(axis=(1, 2))

    rng = np.random.default_rng(0)
    args = (rng.standard_normal((8, 12, 12, 16)).astype(np.float32), rng.standard_normal(16).astype(np.float32),
            rng.uniform(0.5, 2.0, 16).astype(np.float32), rng.uniform(0.5, 1.5, 16).astype(np.float32),
            rng.standard_normal(16).astype(np.float32))
    got = jax.jit(infer, compiler_options=options)(*args)
    want = jax.jit(infer)(*args)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
