"""Weight-only quantized matmul on this machine's CPU: jax_wqmm against the alternatives.

Columns, all measured in the same run (medians over repeated calls of jitted functions):
  jax_wqmm      wq.weight_quant_matmul_all_reduce (the default CPU lowering)
  reference     the same call lowered with the jnp reference (jax_wqmm.testing.use_reference)
  naive         dequantize the whole weight to the activation dtype in XLA, then x @ w
  qwix          qwix.dot_general on a qwix QArray (the JAX peer; `pip install .[bench]`)
  float         unquantized x @ w with w in the activation dtype (bfloat16)
  floor         the memory-bandwidth floor: the quantized weight's bytes / this machine's
                streaming-read bandwidth (measured here, see --bw-mib)
  compute       the compute floor: m*k*n multiply-adds / the peak rate of every core on the
                kernel's widest instruction (jax_wqmm.cpu_kernel.peak_mac_rate, measured here)
Each column's calls cycle through copies of its weights (--rotate-mib in all, default 128 MiB,
beyond this machine's 32 MiB L3), so weights stream from memory as in a model. Ratios are
jax_wqmm's time over the other column's (below 1: jax_wqmm is faster), except
"ref/" (reference over jax_wqmm: the speed-up). "temp" is the peak temporary memory of
jax_wqmm's compiled module (XLA memory analysis). The run ends with the fast-CPU-kernel
targets checked against these numbers.

    python benchmarks/matmul_bench.py [--quick] [--png PATH]   (the plot only with --png)
    python benchmarks/matmul_bench.py --sweep [--png PATH]     (m = 1..128 at k = n = 4096)

The sweep times jax_wqmm and XLA's bf16 dot over bf16 weights for m = 1, 2, 4, ..., 128 and
prints each time over max(bandwidth floor, compute floor), where the compute floor uses the best
multiply-add rate any code reached in the run: the kernel's own probe, or XLA's bf16 dot at
m = 512.
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
import jax_wqmm.testing as wqt
from jax_wqmm import cpu_kernel

SHAPES = [(1, 4096, 4096), (16, 4096, 4096), (512, 4096, 4096), (2048, 4096, 4096), (16, 8192, 8192)]
MODES = {"int8/ch": dict(dtype="int8", granularity="per_channel"),
         "int4/g128": dict(dtype="int4", granularity="per_group", group_size=128)}


def median_seconds(f, *calls, budget: float = 2.0, max_reps: int = 50, warmup: float = 0.3) -> float:
    """Median seconds of f(*args), args cycling through `calls` (argument tuples)."""
    def call(i):
        f(*calls[i % len(calls)]).block_until_ready()

    for i in range(len(calls)):                        # compile (and first touch of each copy)
        call(i)
    t0 = time.perf_counter()
    done = 0
    while done < 2 or time.perf_counter() - t0 < warmup:  # steady state: caches, pools, clocks
        call(done)
        done += 1
    once = (time.perf_counter() - t0) / done
    reps = int(max(3, min(max_reps, budget / max(once, 1e-6))))
    ts = []
    for i in range(reps):
        t = time.perf_counter()
        call(i)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def copies(tree, count: int) -> list:
    """`count` copies of a pytree of arrays, each in buffers of its own."""
    return [tree] + [jax.tree.map(lambda a: jnp.array(a, copy=True), tree) for _ in range(count - 1)]


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
    t = median_seconds(f, (x,), budget=1.0)
    return max(best, x.nbytes / t)


def cpu_name() -> str:
    """The CPU's model name (and family, which tells Zen 4 from Zen 5) from /proc/cpuinfo."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or "unknown CPU"
    family = fields.get("cpu family")
    return f"{name} (family {family})" if family else name


def temp_bytes(f, *args) -> int:
    try:
        return int(jax.jit(f).lower(*args).compile().memory_analysis().temp_size_in_bytes)
    except Exception:  # noqa: BLE001 - not every backend reports it
        return -1


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="decode shapes only")
    ap.add_argument("--sweep", action="store_true", help="the m sweep (see the module docstring)")
    ap.add_argument("--png", default=None,
                    help="write the plot here (the README's picture is benchmarks/matmul_bench.png)")
    ap.add_argument("--bw-mib", type=int, default=512, help="array size for the bandwidth probe")
    ap.add_argument("--rotate-mib", type=int, default=128,
                    help="weight copies the calls cycle through, in MiB (beyond the last-level cache)")
    args = ap.parse_args()
    try:
        import qwix
    except ImportError:
        qwix = None

    bw = stream_bandwidth(args.bw_mib)
    peak = cpu_kernel.peak_mac_rate(0.5)
    print(f"machine: {cpu_name()}, {platform.machine()}, {os.cpu_count()} cores; "
          f"jax {jax.__version__}; streaming read {bw / 1e9:.1f} GB/s; kernel ISA {cpu_kernel.isa()}, "
          f"peak {peak / 1e9:.0f} GMAC/s; qwix {getattr(qwix, '__version__', 'not installed')}")
    act = jnp.bfloat16
    if args.sweep:
        return sweep(args, bw, peak)
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
            # Calls cycle through weight copies that together exceed the caches (--rotate-mib),
            # so a weight comes from memory as in a model, not from a warm L3.
            weight_bytes = k * n // (2 if kw["dtype"] == "int4" else 1)
            count = max(1, -(-args.rotate_mib * 2**20 // weight_bytes))
            quantized = [(x, d, s) for d, s in copies((qw.data, qw.scale), count)]
            r["jax_wqmm"] = median_seconds(fused, *quantized)
            wqt.use_reference()
            try:  # a fresh jit: lowered now with the reference
                ref = jax.jit(lambda x, d, s, g=g: wq.weight_quant_matmul_all_reduce(x, d, s, antiquant_group_size=g))
                r["reference"] = median_seconds(ref, *quantized)
            finally:
                wqt.use_default()
            r["naive"] = median_seconds(naive, *quantized)
            r["float"] = median_seconds(dense, *[(x, c) for c in copies(w_act, max(1, count // 2))])
            r["temp"] = temp_bytes(fused, x, qw.data, qw.scale)
            if qwix is not None:
                tiled = {0: 128} if g else None
                qa = qwix.quantize(w_act, jnp.int8 if kw["dtype"] == "int8" else jnp.int4,
                                   channelwise_axes=[1], tiled_axes=tiled)
                qdot = jax.jit(lambda x, qa: qwix.dot_general(x, qa, (((1,), (0,)), ((), ()))))
                r["qwix"] = median_seconds(qdot, *[(x, c) for c in copies(qa, count)])
            del quantized
            r["floor"] = weight_bytes / bw
            r["compute"] = m * k * n / peak if peak else None
            rows.append(r)
            print(_row(r), flush=True)
    print()
    print(_table(rows))
    print()
    print(_targets(rows))
    if args.png:
        _plot(rows, args.png)
        print(f"\nplot: {args.png}")


SWEEP_M = (1, 2, 4, 8, 16, 32, 64, 128)


def sweep(args, bw: float, peak: float) -> None:
    """m = 1..128 at k = n = 4096: jax_wqmm and XLA's bf16 dot over max(floors)."""
    act, k, n = jnp.bfloat16, 4096, 4096
    w = jax.random.normal(jax.random.key(0), (k, n), jnp.float32) / np.sqrt(k)
    w_act = w.astype(act)
    dense = jax.jit(lambda x, w: jnp.dot(x, w))
    x512 = jax.random.normal(jax.random.key(1), (512, k), jnp.float32).astype(act)
    xla_rate = 512 * k * n / median_seconds(dense, *[(x512, c) for c in copies(w_act, 4)])
    best = max(peak, xla_rate)
    print(f"best multiply-add rate: {best / 1e9:.0f} GMAC/s (kernel probe {peak / 1e9:.0f}, "
          f"XLA's bf16 dot at m=512 {xla_rate / 1e9:.0f})")
    print(f"{'m':>4s} {'weights':>9s} {'jax_wqmm':>9s} {'xla bf16':>9s} {'bw floor':>9s} {'cmp floor':>9s}"
          f" {'/floor':>7s} {'/xla':>6s}")
    rows = []
    for mode, kw in MODES.items():
        qw = wq.quantize_weight(w, scale_dtype=act, **kw)
        g = qw.group_size
        fused = jax.jit(lambda x, d, s, g=g: wq.weight_quant_matmul_all_reduce(x, d, s, antiquant_group_size=g))
        weight_bytes = k * n // (2 if kw["dtype"] == "int4" else 1)
        count = max(1, -(-args.rotate_mib * 2**20 // weight_bytes))
        wcopies = copies((qw.data, qw.scale), count)
        dcopies = copies(w_act, max(1, count // 2))
        for m in SWEEP_M:
            x = jax.random.normal(jax.random.key(m), (m, k), jnp.float32).astype(act)
            t = median_seconds(fused, *[(x, d, s) for d, s in wcopies])
            tx = median_seconds(dense, *[(x, c) for c in dcopies])
            floor = max(weight_bytes / bw, m * k * n / best)
            rows.append(dict(m=m, mode=mode, t=t, xla=tx, floor=floor))
            print(f"{m:4d} {mode:>9s} {_fmt_ms(t)} {_fmt_ms(tx)} {_fmt_ms(weight_bytes / bw)} "
                  f"{_fmt_ms(m * k * n / best)} {t / floor:7.2f} {t / tx:6.2f}", flush=True)
    if args.png:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib not installed: no plot (pip install .[bench])")
            return
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for mode in MODES:
            rs = [r for r in rows if r["mode"] == mode]
            ax.plot([r["m"] for r in rs], [r["t"] / r["floor"] for r in rs], "o-", label=f"jax_wqmm {mode}")
            ax.plot([r["m"] for r in rs], [r["xla"] / r["floor"] for r in rs], "x--",
                    label=f"XLA bf16 dot (bf16 weights), vs {mode} floor")
        ax.axhline(1.5, color="gray", lw=0.8, ls=":")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("m (rows of x), k = n = 4096")
        ax.set_ylabel("time / max(bandwidth floor, compute floor)")
        ax.set_title(f"{cpu_name()}, jax {jax.__version__}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.png, dpi=110)
        print(f"plot: {args.png}")


def _fmt_ms(t):
    return "-" if t is None else f"{t * 1e3:9.2f}"


HEADER = (f"{'m,k,n':>16s} {'weights':>9s} {'jax_wqmm':>9s} {'reference':>9s} {'naive':>9s} {'qwix':>9s} "
          f"{'float':>9s} {'floor':>9s} {'compute':>9s}   {'ref/':>6s} {'/naive':>6s} {'/qwix':>6s} "
          f"{'/float':>6s} {'/floor':>6s} {'temp MiB':>8s}")


def _row(r):
    q = r.get("qwix")
    m, k, n = r["shape"]
    return (f"{f'{m},{k},{n}':>16s} {r['mode']:>9s} {_fmt_ms(r['jax_wqmm'])} {_fmt_ms(r['reference'])} "
            f"{_fmt_ms(r['naive'])} {_fmt_ms(q)} {_fmt_ms(r['float'])} {_fmt_ms(r['floor'])} "
            f"{_fmt_ms(r['compute'])}   {r['reference'] / r['jax_wqmm']:6.1f} "
            f"{r['jax_wqmm'] / r['naive']:6.2f} {('%6.2f' % (r['jax_wqmm'] / q)) if q else '     -'} "
            f"{r['jax_wqmm'] / r['float']:6.2f} {r['jax_wqmm'] / r['floor']:6.1f} {r['temp'] / 2**20:8.1f}")


def _targets(rows):
    """The fast-CPU-kernel targets, checked against this run. A floor target that the compute
    floor alone rules out (compute > 1.5 x floor) says so."""
    by = {(r["shape"], r["mode"]): r for r in rows}
    lines, d = ["targets (this run):"], (4096, 4096)

    def check(name, ok, detail):
        lines.append(f"  {'MET    ' if ok else 'NOT MET'} {name}: {detail}")

    for m, mode in ((1, "int8/ch"), (16, "int8/ch"), (1, "int4/g128"), (16, "int4/g128")):
        r = by.get(((m, *d), mode))
        if r is None:
            continue
        ratio = r["jax_wqmm"] / r["floor"]
        detail = f"{ratio:.2f}x the bandwidth floor"
        if r["compute"] and r["compute"] > 1.5 * r["floor"]:
            detail += (f"; out of reach here: the compute floor alone is {r['compute'] / r['floor']:.2f}x "
                       f"(jax_wqmm at {r['jax_wqmm'] / r['compute']:.2f}x the compute floor)")
        check(f"m={m} {mode} within 1.5x of the bandwidth floor", ratio <= 1.5, detail)
        if mode == "int8/ch":
            speedup = r["reference"] / r["jax_wqmm"]
            check(f"m={m} {mode} >= 5x faster than the reference", speedup >= 5, f"{speedup:.1f}x")
    for mode in MODES:
        r = by.get(((512, *d), mode))
        if r is None:
            continue
        check(f"m=512 {mode} faster than convert-then-multiply", r["jax_wqmm"] < r["naive"],
              f"{r['jax_wqmm'] / r['naive']:.2f}x naive's time")
        check(f"m=512 {mode} within 1.3x of the bf16 matmul", r["jax_wqmm"] <= 1.3 * r["float"],
              f"{r['jax_wqmm'] / r['float']:.2f}x")
    return "\n".join(lines)


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
    cols = [c for c in ("jax_wqmm", "reference", "naive", "qwix", "float", "floor", "compute")
            if any(r.get(c) is not None for r in rows)]
    labels = [f"{r['shape'][0]}x{r['shape'][1]}x{r['shape'][2]}\n{r['mode']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(rows)), 5.5))
    width = 0.8 / len(cols)
    for i, c in enumerate(cols):
        ax.bar(np.arange(len(rows)) + i * width, [(r.get(c) or np.nan) * 1e3 for r in rows], width, label=c)
    ax.set_xticks(np.arange(len(rows)) + 0.4 - width / 2, labels, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("ms per call (median, log scale)")
    ax.set_title(f"weight-only quantized matmul, bf16 activations, jax {jax.__version__}, CPU")
    ax.legend(ncol=len(cols), fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
