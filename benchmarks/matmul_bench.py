"""Weight-only quantized matmul on this machine's CPU: jax_wqmm against the alternatives.

Columns, all measured in the same run (medians over repeated calls of jitted functions):
  jax_wqmm      wq.weight_quant_matmul_all_reduce (the default CPU lowering)
  naive         dequantize the whole weight to the activation dtype in XLA, then x @ w
  qwix          qwix.dot_general on a qwix QArray (the JAX peer; `pip install .[bench]`)
  float         unquantized x @ w with w in the activation dtype (bfloat16)
  floor         the memory-bandwidth floor: the quantized weight's bytes / this machine's
                streaming-read bandwidth (measured here, see --bw-mib)
Ratios are jax_wqmm's time over the other column's (below 1: jax_wqmm is faster). "temp" is
the peak temporary memory of jax_wqmm's compiled module (XLA memory analysis).

    python benchmarks/matmul_bench.py [--quick] [--png benchmarks/matmul_bench.png]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import jax_wqmm as wq

SHAPES = [(1, 4096, 4096), (16, 4096, 4096), (512, 4096, 4096), (2048, 4096, 4096), (16, 8192, 8192)]
MODES = {"int8/ch": dict(dtype="int8", granularity="per_channel"),
         "int4/g128": dict(dtype="int4", granularity="per_group", group_size=128)}


def median_seconds(f, *args, budget: float = 2.0, max_reps: int = 50) -> float:
    f(*args).block_until_ready()                      # compile + warm up
    t0 = time.perf_counter()
    f(*args).block_until_ready()
    once = time.perf_counter() - t0
    reps = int(max(3, min(max_reps, budget / max(once, 1e-6))))
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        f(*args).block_until_ready()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def stream_bandwidth(mib: int) -> float:
    """Bytes per second of a streaming read (the best of NumPy's and XLA's reductions)."""
    a = np.ones(mib * 2**20 // 8, np.float64)
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        a.sum()
        best = max(best, a.nbytes / (time.perf_counter() - t))
    x = jnp.ones(mib * 2**20 // 4, jnp.float32)
    f = jax.jit(jnp.sum)
    t = median_seconds(f, x, budget=1.0)
    return max(best, x.nbytes / t)


def temp_bytes(f, *args) -> int:
    try:
        return int(jax.jit(f).lower(*args).compile().memory_analysis().temp_size_in_bytes)
    except Exception:  # noqa: BLE001 - not every backend reports it
        return -1


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="decode shapes only")
    ap.add_argument("--png", default=os.path.join(os.path.dirname(__file__), "matmul_bench.png"))
    ap.add_argument("--bw-mib", type=int, default=512, help="array size for the bandwidth probe")
    args = ap.parse_args()
    try:
        import qwix
    except ImportError:
        qwix = None

    bw = stream_bandwidth(args.bw_mib)
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, {platform.processor() or ''}; "
          f"jax {jax.__version__}; streaming read {bw / 1e9:.1f} GB/s; qwix "
          f"{getattr(qwix, '__version__', 'not installed')}")
    act = jnp.bfloat16
    rows = []
    shapes = [s for s in SHAPES if s[0] <= 16] if args.quick else SHAPES
    for (m, k, n) in shapes:
        key = jax.random.key(m + k)
        w = jax.random.normal(key, (k, n), jnp.float32) / np.sqrt(k)
        x = jax.random.normal(jax.random.key(1), (m, k), jnp.float32).astype(act)
        w_act = w.astype(act)
        for mode, kw in MODES.items():
            qw = wq.quantize_weight(w, scale_dtype=act, **kw)
            g = qw.group_size
            fused = jax.jit(lambda x, d, s, g=g: wq.weight_quant_matmul_all_reduce(x, d, s, antiquant_group_size=g))
            spec = wq.make_spec(x, qw.data, qw.scale, antiquant_group_size=g)
            naive = jax.jit(lambda x, d, s, spec=spec: jnp.dot(x, wq.reference.dequantize(d, s, None, spec)))
            dense = jax.jit(lambda x, w: jnp.dot(x, w))
            r = {"shape": (m, k, n), "mode": mode}
            r["jax_wqmm"] = median_seconds(fused, x, qw.data, qw.scale)
            r["naive"] = median_seconds(naive, x, qw.data, qw.scale)
            r["float"] = median_seconds(dense, x, w_act)
            r["temp"] = temp_bytes(fused, x, qw.data, qw.scale)
            if qwix is not None:
                tiled = {0: 128} if g else None
                qa = qwix.quantize(w_act, jnp.int8 if kw["dtype"] == "int8" else jnp.int4,
                                   channelwise_axes=[1], tiled_axes=tiled)
                qdot = jax.jit(lambda x, qa: qwix.dot_general(x, qa, (((1,), (0,)), ((), ()))))
                r["qwix"] = median_seconds(qdot, x, qa)
            weight_bytes = k * n // (2 if kw["dtype"] == "int4" else 1)
            r["floor"] = weight_bytes / bw
            rows.append(r)
            print(_row(r), flush=True)
    print()
    print(_table(rows))
    _plot(rows, args.png)
    print(f"\nplot: {args.png}")


def _fmt_ms(t):
    return "-" if t is None else f"{t * 1e3:9.2f}"


HEADER = (f"{'m,k,n':>16s} {'weights':>9s} {'jax_wqmm':>9s} {'naive':>9s} {'qwix':>9s} {'float':>9s} "
          f"{'floor':>9s}   {'/naive':>6s} {'/qwix':>6s} {'/floor':>6s} {'temp MiB':>8s}")


def _row(r):
    q = r.get("qwix")
    m, k, n = r["shape"]
    return (f"{f'{m},{k},{n}':>16s} {r['mode']:>9s} {_fmt_ms(r['jax_wqmm'])} {_fmt_ms(r['naive'])} "
            f"{_fmt_ms(q)} {_fmt_ms(r['float'])} {_fmt_ms(r['floor'])}   "
            f"{r['jax_wqmm'] / r['naive']:6.2f} {('%6.2f' % (r['jax_wqmm'] / q)) if q else '     -'} "
            f"{r['jax_wqmm'] / r['floor']:6.1f} {r['temp'] / 2**20:8.1f}")


def _table(rows):
    return "times in ms (median)\n" + HEADER + "\n" + "\n".join(_row(r) for r in rows)


def _plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install .[bench])")
        return
    cols = [c for c in ("jax_wqmm", "naive", "qwix", "float", "floor") if any(c in r for r in rows)]
    labels = [f"{r['shape'][0]}x{r['shape'][1]}x{r['shape'][2]}\n{r['mode']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(rows)), 5))
    width = 0.8 / len(cols)
    for i, c in enumerate(cols):
        ax.bar(np.arange(len(rows)) + i * width, [r.get(c, np.nan) * 1e3 for r in rows], width, label=c)
    ax.set_xticks(np.arange(len(rows)) + 0.4 - width / 2, labels, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("ms per call (median, log scale)")
    ax.set_title(f"weight-only quantized matmul, bf16 activations, jax {jax.__version__}, CPU")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
