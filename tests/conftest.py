import os

# 8 virtual CPU devices for the shard_map tests; set before jax initializes its backends.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
