"""Per-call host overhead of the native path against a no-op FFI target with the same operands.

Tiny shapes, so that the time is the host work: descriptor creation, the two aclnn stages and
the group lookup. Each path runs as a chain of R dependent calls inside one jitted program
(each call's output is the next call's x3), so the per-call cost is
(time(R = 1 + chain) - time(R = 1)) / chain, free of jit dispatch. Here the native path runs against the host emulator of the CANN ABI, which
also computes the (tiny) op and does the all-reduce rendezvous: the difference to the no-op
target is an upper bound of the handler's own overhead. Prints medians in microseconds and
the ratio, all measured in this run.

    python benchmarks/host_overhead.py [--devices 8] [--calls 300]
"""

import argparse
import statistics
import time

import jax


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--calls", type=int, default=100, help="timed runs per program (median)")
    p.add_argument("--chain", type=int, default=40, help="dependent op calls per program")
    args = p.parse_args()
    jax.config.update("jax_num_cpu_devices", args.devices)
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    import jax_wqmm as wq
    import jax_wqmm.testing as wqt
    from jax_wqmm import native

    mesh = Mesh(np.array(jax.devices()[: args.devices]), ("tp",))
    emu = wqt.use_emulator()
    wqt.create_groups(mesh, "tp")
    k, n, m = 32 * args.devices, 16, 1
    x = jnp.ones((m, k), jnp.bfloat16)
    q = jnp.ones((k, n), jnp.int8)
    s = jnp.ones((n,), jnp.bfloat16)
    b = jnp.ones((n,), jnp.bfloat16)
    specs = (P(None, "tp"), P("tp", None), P(), P())
    put = [jax.device_put(a, NamedSharding(mesh, sp)) for a, sp in zip((x, q, s, b), specs)]

    def fused(x, q, s, b, x3):
        return wq.weight_quant_matmul_all_reduce(x, q, s, bias=b, x3=x3, axis_name="tp")

    def noop(x, q, s, b, x3):
        spec = wq.make_spec(x, q, s, None, b, x3, axis_name="tp")
        out = jax.typeof(x).update(shape=spec.out_shape)
        return jax.ffi.ffi_call(wqt.NOOP_TARGET, out, has_side_effect=True)(
            x, q, s, b, x3, **native.ffi_attributes(spec))

    def program(op, calls):
        def body(x, q, s, b):
            y = jnp.zeros((m, n), x.dtype)
            for _ in range(calls):
                y = op(x, q, s, b, y)
            return y
        f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=P(), check_vma=False))
        f(*put).block_until_ready()
        return f

    def median_time(f):
        ts = []
        for _ in range(args.calls):
            t = time.perf_counter()
            f(*put).block_until_ready()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)

    def timed(op):
        """Per-call microseconds of ``op`` inside a compiled program."""
        one, many = program(op, 1), program(op, 1 + args.chain)
        return (median_time(many) - median_time(one)) / args.chain * 1e6

    t_noop = timed(noop)
    t_native = timed(fused)
    wqt.use_reference()
    t_ref = timed(fused)
    assert emu.live_tensors() == 0
    print(f"jax {jax.__version__}, {args.devices} CPU devices, m={m} k={k} n={n}, "
          f"chains of {args.chain} dependent calls, medians of {args.calls} runs")
    print(f"{'path':42s} {'us/call':>9s} {'vs no-op':>9s}")
    for name, t in (("no-op FFI target (same operands)", t_noop),
                    ("native handler -> emulated aclnn (fused)", t_native),
                    ("reference lowering (dot + XLA all-reduce)", t_ref)):
        print(f"{name:42s} {t:9.1f} {t / t_noop:8.2f}x")
    print(f"handler + emulator cost over the no-op: {t_native - t_noop:.1f} us per call "
          f"({(t_native - t_noop) / args.devices:.1f} us per device)")


if __name__ == "__main__":
    main()
