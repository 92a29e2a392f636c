import os

# 8 virtual CPU devices for the shard_map tests; set before jax initializes its backends.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The CPU kernels' float sums start as NaN, not as whatever memory held: a kernel that leaves
# part of them unwritten fails the tests instead of passing by luck.
os.environ.setdefault("JAX_WQMM_CPU_POISON", "1")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
