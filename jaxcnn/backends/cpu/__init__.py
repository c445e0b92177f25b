"""jaxcnn's CPU backend: the kernels behind `jaxcnn.backends` on the CPU. Internal: import `jaxcnn.backends`.

- `kernels`: builds the native library (``csrc/``: oneDNN convolutions, BatchNorm and sgemm; AVX-512 max pooling
  and SGD update) on first use, registers it with XLA FFI, and defines the primitives that call it.
- `conv`, `dense`, `norm`, `pool`: each layer's dispatch to those kernels, with derivative rules, and the XLA
  formulations used where a kernel does not apply.
- `reductions`, `materialize`: per-channel sums and a fusion barrier that XLA's CPU code generation runs faster.
- `sgd`: optax's SGD chain with its update as one native pass.
- `xla_flags`, `host_malloc`: process settings that must be made before JAX starts its CPU backend.
"""
