"""A Llama-style decoder layer with Megatron tensor parallelism over the fused operator.

RMSNorm -> attention (RoPE, causal mask) -> residual; RMSNorm -> SwiGLU MLP -> residual.
Under jax.jit + jax.shard_map over a 'tp' mesh axis:
  - q/k/v, gate and up projections are column-parallel (each rank: its heads / its slice of
    the intermediate features; quantized weights; no communication);
  - the output and down projections are row-parallel through weight_quant_matmul_all_reduce:
    one fused matmul + all-reduce each, with the bias and the residual added once (the
    operator adds bias and x3 on every rank, so row_parallel_linear passes them on rank 0).

The same layer is also written a second way, as plain ``jax.jit`` over global arrays whose
weights are placed with ``NamedSharding`` (no shard_map in the model code, as MaxText-style
code does): ``wq.quant_matmul`` on row-sharded weights partitions into the same per-device
fused calls. Both forms print the same numbers.

Runs on CPU with 8 virtual devices; prints the error against an unsharded float32 model, the
time per step and the weight bytes saved, for int8 per-channel and int4 per-group (128) weights.

    python examples/llama_tp.py [--tp 8] [--hidden 2048] [--seq 64] [--steps 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

import jax_wqmm as wq
from jax_wqmm import layers

COLUMN = ("wq", "wk", "wv", "w_gate", "w_up")
ROW = ("wo", "w_down")


@dataclasses.dataclass(frozen=True)
class Config:
    hidden: int = 2048
    heads: int = 16
    intermediate: int = 4096
    batch: int = 2
    seq: int = 64
    eps: float = 1e-6
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def init_params(key, cfg: Config) -> dict:
    """float32 weights (k, n) with biases on every projection (Qwen-style)."""
    shapes = {"wq": (cfg.hidden, cfg.hidden), "wk": (cfg.hidden, cfg.hidden), "wv": (cfg.hidden, cfg.hidden),
              "wo": (cfg.hidden, cfg.hidden), "w_gate": (cfg.hidden, cfg.intermediate),
              "w_up": (cfg.hidden, cfg.intermediate), "w_down": (cfg.intermediate, cfg.hidden)}
    keys = jax.random.split(key, 2 * len(shapes) + 2)
    p = {}
    for i, (name, (k, n)) in enumerate(shapes.items()):
        p[name] = jax.random.normal(keys[2 * i], (k, n), jnp.float32) / np.sqrt(k)
        p["b" + name[1:]] = 0.1 * jax.random.normal(keys[2 * i + 1], (n,), jnp.float32)
    p["norm_attn"] = 1.0 + 0.1 * jax.random.normal(keys[-2], (cfg.hidden,))
    p["norm_mlp"] = 1.0 + 0.1 * jax.random.normal(keys[-1], (cfg.hidden,))
    return p


def quantize_params(p: dict, mode: str, dtype=jnp.bfloat16) -> dict:
    """Quantized copies of the projection weights: "int8" per-channel or "int4" per-group 128;
    biases and norms in the activation dtype."""
    kw = dict(dtype="int8", granularity="per_channel") if mode == "int8" else \
        dict(dtype="int4", granularity="per_group", group_size=128)
    q = {}
    for name, v in p.items():
        if name in COLUMN + ROW:
            q[name] = wq.quantize_weight(v, scale_dtype=dtype, **kw)
        else:
            q[name] = v.astype(dtype)
    return q


def rms_norm(x, w, eps):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * w.astype(jnp.float32)).astype(x.dtype)


def rope(x, theta):
    """Rotary embedding over the last dim of (b, s, h, d)."""
    b, s, h, d = x.shape
    inv = 1.0 / theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d)
    ang = jnp.arange(s, dtype=jnp.float32)[:, None] * inv[None, :]      # (s, d/2)
    cos, sin = jnp.cos(ang)[None, :, None, :], jnp.sin(ang)[None, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., : d // 2], x32[..., d // 2:]
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).astype(x.dtype)


def attention(q, k, v, cfg):
    """Causal attention over (b, s, h, d) with float32 softmax."""
    s = q.shape[1]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32))
    logits = logits / np.sqrt(cfg.head_dim)
    mask = jnp.tril(jnp.ones((s, s), bool))
    logits = jnp.where(mask, logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v.astype(jnp.float32)).astype(q.dtype)


def decoder_layer_f32(p: dict, x, cfg: Config):
    """The unsharded float32 model (the accuracy baseline)."""
    b, s, _ = x.shape
    heads = lambda t: t.reshape(b, s, cfg.heads, cfg.head_dim)
    h = rms_norm(x, p["norm_attn"], cfg.eps)
    q, k, v = (heads(h @ p[w] + p["b" + w[1:]]) for w in ("wq", "wk", "wv"))
    a = attention(rope(q, cfg.rope_theta), rope(k, cfg.rope_theta), v, cfg).reshape(b, s, -1)
    x = x + a @ p["wo"] + p["bo"]
    h = rms_norm(x, p["norm_mlp"], cfg.eps)
    g = jax.nn.silu(h @ p["w_gate"] + p["b_gate"]) * (h @ p["w_up"] + p["b_up"])
    return x + g @ p["w_down"] + p["b_down"]


def decoder_layer_tp(q: dict, x, cfg: Config, axis: str = "tp"):
    """One rank's share, inside shard_map over ``axis``: x is replicated, q holds this rank's
    column / row slices. Returns the full, replicated output."""
    b, s, _ = x.shape
    heads = lambda t: t.reshape(b, s, -1, cfg.head_dim)                # this rank's heads
    h = rms_norm(x, q["norm_attn"], cfg.eps)
    qh, kh, vh = (heads(layers.column_parallel_linear(h, q[w], bias=q["b" + w[1:]]))
                  for w in ("wq", "wk", "wv"))
    a = attention(rope(qh, cfg.rope_theta), rope(kh, cfg.rope_theta), vh, cfg).reshape(b, s, -1)
    x = layers.row_parallel_linear(a, q["wo"], axis_name=axis, bias=q["bo"], residual=x)
    h = rms_norm(x, q["norm_mlp"], cfg.eps)
    g = jax.nn.silu(layers.column_parallel_linear(h, q["w_gate"], bias=q["b_gate"])) * \
        layers.column_parallel_linear(h, q["w_up"], bias=q["b_up"])
    return layers.row_parallel_linear(g, q["w_down"], axis_name=axis, bias=q["b_down"], residual=x)


def decoder_layer_auto(q: dict, x, cfg: Config):
    """The same layer on global arrays (plain jit; the weights' shardings decide): the row-
    parallel projections are ``quant_matmul`` over weights whose rows (k) are sharded, which
    partitions into one fused matmul + all-reduce per device, bias and residual added once."""
    b, s, _ = x.shape
    heads = lambda t: t.reshape(b, s, cfg.heads, cfg.head_dim)
    h = rms_norm(x, q["norm_attn"], cfg.eps)
    qh, kh, vh = (heads(wq.quant_matmul(h, q[w], bias=q["b" + w[1:]])) for w in ("wq", "wk", "wv"))
    a = attention(rope(qh, cfg.rope_theta), rope(kh, cfg.rope_theta), vh, cfg).reshape(b, s, -1)
    x = wq.quant_matmul(a, q["wo"], bias=q["bo"], x3=x)
    h = rms_norm(x, q["norm_mlp"], cfg.eps)
    g = jax.nn.silu(wq.quant_matmul(h, q["w_gate"], bias=q["b_gate"])) * wq.quant_matmul(h, q["w_up"], bias=q["b_up"])
    return wq.quant_matmul(g, q["w_down"], bias=q["b_down"], x3=x)


def param_specs(q: dict, axis: str = "tp") -> dict:
    specs = {}
    for name, v in q.items():
        if name in COLUMN:
            specs[name] = layers.column_parallel_specs(v, axis)
        elif name in ROW:
            specs[name] = layers.row_parallel_specs(v, axis)
        elif name in ("bq", "bk", "bv", "b_gate", "b_up"):
            specs[name] = P(axis)
        else:
            specs[name] = P()
    return specs


def make_step(mesh, cfg: Config, q: dict, axis: str = "tp"):
    """The jitted tensor-parallel layer and the sharded parameters."""
    specs = param_specs(q, axis)
    shard = lambda v, sp: jax.make_array_from_callback(np.shape(v), NamedSharding(mesh, sp),
                                                       lambda idx, v=v: np.asarray(v)[idx])
    q_sharded = jax.tree.map(shard, q, specs)
    step = jax.jit(jax.shard_map(lambda q, x: decoder_layer_tp(q, x, cfg, axis), mesh=mesh,
                                 in_specs=(specs, P()), out_specs=P()))
    return step, q_sharded


def make_auto_step(mesh, cfg: Config, q: dict, axis: str = "tp"):
    """The auto-sharded form: the same parameters placed with the same specs, plain jit."""
    specs = param_specs(q, axis)
    q_sharded = jax.tree.map(lambda v, sp: jax.device_put(v, NamedSharding(mesh, sp)), q, specs)
    return jax.jit(lambda q, x: decoder_layer_auto(q, x, cfg)), q_sharded


def inputs(cfg: Config, seed: int = 1):
    return np.asarray(jax.random.normal(jax.random.key(seed), (cfg.batch, cfg.seq, cfg.hidden)), np.float32)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tp", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--intermediate", type=int, default=4096)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    jax.config.update("jax_num_cpu_devices", args.tp)
    cfg = Config(hidden=args.hidden, heads=args.heads, intermediate=args.intermediate,
                 batch=args.batch, seq=args.seq)
    mesh = jax.make_mesh((args.tp,), ("tp",))
    auto_mesh = jax.make_mesh((args.tp,), ("tp",), axis_types=(jax.sharding.AxisType.Auto,))
    p = init_params(jax.random.key(0), cfg)
    x = inputs(cfg)
    want = np.asarray(jax.jit(decoder_layer_f32, static_argnums=2)(p, jnp.asarray(x), cfg), np.float64)
    dense_bytes = sum(p[n].size * 2 for n in COLUMN + ROW)                 # bf16 weights
    print(f"Llama-style layer: hidden={cfg.hidden} heads={cfg.heads} intermediate={cfg.intermediate} "
          f"batch={cfg.batch} seq={cfg.seq}, tp={args.tp} on {jax.devices()[0].platform}")
    for mode in ("int8", "int4"):
        q = quantize_params(p, mode)
        step, qs = make_step(mesh, cfg, q)
        xs = jax.device_put(jnp.asarray(x, jnp.bfloat16), NamedSharding(mesh, P()))
        y = step(qs, xs).block_until_ready()
        times = []
        for _ in range(args.steps):
            t = time.perf_counter()
            step(qs, xs).block_until_ready()
            times.append(time.perf_counter() - t)
        got = np.asarray(y, np.float64)
        # The same unsharded float32 model on the dequantized weights: isolates the tensor-
        # parallel, fused path (bf16 rounding only) from the quantization error.
        p_hat = dict(p, **{n: wq.dequantize_weight(q[n]) for n in COLUMN + ROW})
        same = np.asarray(jax.jit(decoder_layer_f32, static_argnums=2)(p_hat, jnp.asarray(x), cfg), np.float64)
        rel = lambda a, b: np.linalg.norm(a - b) / np.linalg.norm(b - x)   # of the layer's update
        qbytes = sum(q[n].nbytes for n in COLUMN + ROW)
        label = "int8 per-channel" if mode == "int8" else "int4 per-group(128)"
        print(f"  {label}: error of the layer's update vs the float32 model {rel(got, want):.2%} "
              f"(vs the same dequantized weights unsharded: {rel(got, same):.2%})")
        print(f"  {'':{len(label)}}  {statistics.median(times) * 1e3:.1f} ms/step; weights "
              f"{qbytes / 2**20:.1f} MiB vs {dense_bytes / 2**20:.1f} MiB bf16 ({1 - qbytes / dense_bytes:.0%} saved)")
        assert rel(got, same) < 0.03, "tensor-parallel result differs from the unsharded model"
        assert rel(got, want) < (0.05 if mode == "int8" else 0.35)
        auto, qa = make_auto_step(auto_mesh, cfg, q)
        xa = jax.device_put(jnp.asarray(x, jnp.bfloat16), NamedSharding(auto_mesh, P()))
        ya = np.asarray(auto(qa, xa).block_until_ready(), np.float64)
        times = []
        for _ in range(args.steps):
            t = time.perf_counter()
            auto(qa, xa).block_until_ready()
            times.append(time.perf_counter() - t)
        print(f"  {'':{len(label)}}  auto-sharded form (plain jit): {statistics.median(times) * 1e3:.1f} ms/step; "
              f"error vs the float32 model {rel(ya, want):.2%}; vs the shard_map form {rel(ya, got):.2%}")
        assert rel(ya, got) < 0.01, "the auto-sharded form differs from the shard_map form"

if __name__ == "__main__":
    main()
