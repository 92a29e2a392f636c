"""``python -m jax_wqmm.selftest``: checks the native path against the reference, end to end.

On a machine with Ascend NPUs (a PJRT plugin for the platform ``$JAX_WQMM_NPU_PLATFORM``,
default "npu", and a CANN install): finds CANN and the devices, runs the fused kernel against
the jnp reference over the supported matrix on every visible device alone and across all of
them, and prints a pass/fail report with the versions found. Without NPUs it runs the same
checks on CPU devices against the host emulator of the CANN ABI (and says so).
Exit status: 0 when every check passed.
"""

from __future__ import annotations

import argparse
import itertools
import platform as _platform
import sys
import time


def _setup_jax(cpu_devices: int):
    import jax
    jax.config.update("jax_num_cpu_devices", cpu_devices)
    return jax


def _cases():
    """The supported matrix (reduced to pairs that cover every option at least twice)."""
    for wd, gran, off, extras, tr, fmt, act in itertools.product(
            ("int8", "int4"), ("per_tensor", "per_channel", "per_group"), (False, True),
            (False, True), (False, True), ("ND", "FRACTAL_NZ"), ("bfloat16", "float16")):
        # keep a covering subset: every (wd, gran, fmt) with alternating other options
        if (off + extras + tr + (act == "float16")) % 2:
            continue
        yield dict(weight_dtype=wd, granularity=gran, offset=off, extras=extras,
                   transpose=tr, fmt=fmt, act=act)


def _make_operands(np, jnp, wq, case, tp, rng):
    k, n, m = 64 * tp, 48, 5
    dt = jnp.dtype(case["act"])
    w = rng.standard_normal((k, n)).astype(np.float32)
    g = 32 if case["granularity"] == "per_group" else None
    # per-rank quantization so that per-group scales shard along k with the weight
    parts = [wq.quantize_weight(w[r * 64:(r + 1) * 64], dtype=case["weight_dtype"],
                                granularity=case["granularity"], group_size=g,
                                symmetric=not case["offset"], scale_dtype=dt) for r in range(tp)]
    parts = [p.with_layout(transpose=case["transpose"], format=case["fmt"]) for p in parts]
    x2_axis = {("ND", False): 0, ("ND", True): 1, ("FRACTAL_NZ", False): 1, ("FRACTAL_NZ", True): 0}[
        (case["fmt"], case["transpose"])]
    # k is split over ranks: concatenate each rank's storage along its k dimension (NZ of a
    # transposed (n, k) matrix tiles k into columns and is only run with one rank).
    x2 = parts[0].data if tp == 1 else jnp.concatenate([p.data for p in parts], axis=x2_axis)
    # per-group scales split along k with the weight; a per-tensor / per-channel scale is one
    # for all ranks (rank 0's: the check compares two paths on the same operands)
    sharded_q = g is not None
    cat_q = lambda name: (jnp.concatenate([getattr(p, name) for p in parts]) if sharded_q
                          else getattr(parts[0], name))
    scale = cat_q("scale")
    offset = cat_q("offset") if case["offset"] else None
    x1 = jnp.asarray(rng.standard_normal((m, k)), dt)
    bias = jnp.asarray(rng.standard_normal((n,)), dt) if case["extras"] else None
    x3 = jnp.asarray(rng.standard_normal((m, n)), dt) if case["extras"] else None
    opts = dict(antiquant_group_size=g or 0, transpose_x2=case["transpose"], x2_format=case["fmt"])
    return (x1, x2, scale, offset, bias, x3), x2_axis, sharded_q, opts


def run(args) -> int:
    jax = _setup_jax(args.cpu_devices)
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    import jax_wqmm as wq
    from jax_wqmm import hccl, native, reference

    print("jax_wqmm selftest")
    import jaxlib

    print(f"  python {_platform.python_version()}, jax {jax.__version__}, jaxlib "
          f"{jaxlib.__version__}, jax_wqmm {wq.__version__}")
    npu_platform = args.platform or native.NPU_PLATFORM
    try:
        npu_devices = jax.devices(npu_platform)
    except RuntimeError:
        npu_devices = []
    if npu_devices and not args.emulator:
        mode = f"NPU ({npu_platform}): {len(npu_devices)} device(s)"
        native.load_cann()
        native.register_npu_lowering(npu_platform)
        devices = npu_devices
    else:
        from jax_wqmm import testing
        mode = (f"EMULATOR: no '{npu_platform}' devices here; the CANN ABI is emulated on the host "
                f"({testing.emulator_library_path().name}); nothing ran on Ascend hardware")
        testing.use_emulator()
        devices = jax.devices("cpu")
    status = native.cann_status()
    print(f"  mode: {mode}")
    for role, path in sorted(status["paths"].items()):
        print(f"  {role:9s} {path}")

    rng = np.random.default_rng(0)
    meshes = [("device %d alone" % d.id, [d]) for d in devices[: args.max_single]]
    across = max(s for s in (1, 2, 4, 8) if s <= len(devices))
    meshes.append((f"{across} devices (tp={across})", devices[:across]))
    results = []
    for label, devs in meshes:
        tp = len(devs)
        mesh = Mesh(np.array(devs), ("selftest_tp",))
        hccl.create_groups(mesh, "selftest_tp")
        for case in _cases():
            if case["fmt"] == "FRACTAL_NZ" and case["transpose"] and tp > 1:
                continue  # per-rank NZ storage of (n, k) is not one shardable array
            name = "-".join(str(v) for v in case.values())
            t0 = time.perf_counter()
            try:
                ops, x2_axis, sharded_q, opts = _make_operands(np, jnp, wq, case, tp, rng)
                x2_spec = [None] * ops[1].ndim
                x2_spec[x2_axis] = "selftest_tp"
                q_spec = P("selftest_tp", None) if sharded_q else P()
                specs = [P(None, "selftest_tp"), P(*x2_spec), q_spec, q_spec, P(), P()]
                present = [o is not None for o in ops]
                arrs = [o for o in ops if o is not None]
                sp = tuple(s for s, p in zip(specs, present) if p)

                def call(fn):
                    def f(*a):
                        it = iter(a)
                        full = [next(it) if p else None for p in present]
                        return fn(*full, axis_name="selftest_tp", **opts)
                    return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=sp, out_specs=P()))

                put = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(arrs, sp)]
                fused = call(wq.weight_quant_matmul_all_reduce)
                ref = call(reference.weight_quant_matmul_all_reduce_reference)
                text = fused.lower(*put).as_text()
                one_call = text.count("custom_call") == 1 and "all_reduce" not in text
                y, r = (np.asarray(v, np.float64) for v in (fused(*put), ref(*put)))
                u = {"bfloat16": 2.0**-8, "float16": 2.0**-11}[case["act"]]
                scale = np.abs(r).max() + 1.0
                err = np.abs(y - r).max() / scale
                ok = one_call and err <= 8 * (4 + tp) * u
                detail = f"rel err {err:.1e}" + ("" if one_call else "; HLO is not one custom call")
            except Exception as e:  # noqa: BLE001 - reported, not raised
                ok, detail = False, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            results.append((label, name, ok, detail, time.perf_counter() - t0))
            if args.verbose or not ok:
                print(f"  [{'PASS' if ok else 'FAIL'}] {label}: {name}: {detail}")
        hccl.destroy_groups()
        mine = [r for r in results if r[0] == label]
        print(f"  {label}: {sum(r[2] for r in mine)}/{len(mine)} passed "
              f"({sum(r[4] for r in mine):.1f} s)")

    passed = sum(r[2] for r in results)
    print(f"{passed} passed, {len(results) - passed} failed")
    return 0 if passed == len(results) else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jax_wqmm.selftest", description=__doc__.splitlines()[0])
    p.add_argument("--emulator", action="store_true", help="use the host emulator even if NPUs are present")
    p.add_argument("--platform", default=None, help="the NPU platform name (default $JAX_WQMM_NPU_PLATFORM or 'npu')")
    p.add_argument("--cpu-devices", type=int, default=8, help="virtual CPU devices for the emulator (default 8)")
    p.add_argument("--max-single", type=int, default=2, help="devices checked alone (default 2)")
    p.add_argument("-v", "--verbose", action="store_true")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
