"""Quickstart: quantize a weight, shard it over 8 devices, run the fused matmul + all-reduce.

Runs on CPU (8 virtual devices) with the default CPU lowering; on an Ascend NPU the same code
lowers to aclnnWeightQuantMatmulAllReduce once the native path is registered.
"""

import jax

jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

import jax_wqmm as wq

k, n, m = 2048, 256, 4  # per device k = 256: the group size must stay below the local k
w = jax.random.normal(jax.random.key(0), (k, n)) / np.sqrt(k)
x = jax.random.normal(jax.random.key(1), (m, k)).astype(jnp.bfloat16)
qw = wq.quantize_weight(w, dtype="int4", granularity="per_group", group_size=128)  # (k, n) int4

mesh = jax.make_mesh((8,), ("tp",))
in_specs = (P(None, "tp"), P("tp", None), P("tp", None))  # k is split across 'tp'
put = lambda a, s: jax.device_put(a, NamedSharding(mesh, s))


@jax.jit
def row_parallel(x, q, scale):
    def local(x, q, scale):  # each device: its k-slice; the sum over 'tp' is part of the op
        return wq.weight_quant_matmul_all_reduce(x, q, scale, axis_name="tp", antiquant_group_size=128)
    return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=P())(x, q, scale)


y = row_parallel(*(put(a, s) for a, s in zip((x, qw.data, qw.scale), in_specs)))
w_hat = wq.dequantize_weight(qw)                       # what the int4 weight stands for
want = x.astype(jnp.float32) @ w_hat
rel = lambda a, b: float(jnp.linalg.norm(a.astype(jnp.float32) - b) / jnp.linalg.norm(b))
print(f"y: {y.shape} {y.dtype} on {len(jax.devices())} devices")
print(f"fused vs unsharded dequantized matmul: {rel(y, want):.2e} (bf16 rounding)")
print(f"int4 quantization error vs float32 weights: {rel(y, x.astype(jnp.float32) @ w):.1%}")
print(f"weight: {qw.nbytes / 1024:.0f} KiB int4 vs {w.size * 2 / 1024:.0f} KiB bf16")
assert rel(y, want) < 1e-2
