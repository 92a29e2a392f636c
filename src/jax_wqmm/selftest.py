"""``python -m jax_wqmm.selftest``: checks the native path against the reference, end to end.

On a machine with Ascend NPUs (a PJRT plugin for the platform ``$JAX_WQMM_NPU_PLATFORM``,
default "npu", and a CANN install): finds CANN and the devices, runs the fused kernel against
the jnp reference over the matrix the device's product supports, on single devices and across
1/2/4/8 of them, and prints a report: the product and device kind, the file behind every CANN
symbol, the device/thread binding it checked, and per matrix entry pass/fail with the largest
error in units of the output dtype's rounding (ulps). ``--json PATH`` writes the same report
as JSON, to attach to an issue. Without NPUs it runs the same checks on CPU devices against
the host emulator of the CANN ABI (and says so). Exit status: 0 when every check passed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform as _platform
import sys
import threading
import time


def _setup_jax(cpu_devices: int):
    import jax
    jax.config.update("jax_num_cpu_devices", cpu_devices)
    return jax


def _cases(product: str):
    """A covering subset of the matrix ``product``'s kernel takes (spec.PRODUCTS)."""
    from jax_wqmm.spec import PRODUCTS

    p = PRODUCTS[product]
    for wd, gran, off, extras, tr, fmt, act in itertools.product(
            p.weight_dtypes, ("per_tensor", "per_channel", "per_group"), (False, True),
            (False, True), (False, True), ("ND", "FRACTAL_NZ"), ("bfloat16", "float16")):
        if gran not in p.granularities[wd] or (off and wd not in ("int8", "int4")):
            continue
        if fmt == "FRACTAL_NZ" and gran not in p.nz_granularities.get(wd, ()):
            continue
        # keep a covering subset: every (wd, gran, fmt) with alternating other options
        if (off + extras + tr + (act == "float16")) % 2 and wd in ("int8", "int4"):
            continue
        yield dict(weight_dtype=wd, granularity=gran, offset=off, extras=extras,
                   transpose=tr, fmt=fmt, act=act)


def _ulp_error(np, y, r, act: str) -> float:
    """max |y - r| in units of ``act``'s rounding (one ulp) at the output's scale, max |r|
    (elementwise ulps are meaningless where sums cancel to near zero)."""
    bits = {"bfloat16": 8, "float16": 11}[act]
    mag = max(float(np.max(np.abs(r))) if r.size else 0.0, 2.0**-14)
    ulp = 2.0 ** (np.floor(np.log2(mag)) - (bits - 1))
    return float(np.max(np.abs(y - r)) / ulp) if y.size else 0.0


def _check_binding(ext, ordinals) -> list[dict]:
    """Each device made current on a fresh thread, as the handler does (aclrtSetDevice)."""
    out = []
    for o in ordinals:
        box = {}

        def bind(o=o):
            try:
                box["current"] = ext.bind_device(o)
            except Exception as e:  # noqa: BLE001 - reported
                box["error"] = str(e)

        t = threading.Thread(target=bind)
        t.start()
        t.join()
        out.append(dict(device=o, ok=box.get("current") == o, current=box.get("current"),
                        error=box.get("error")))
    return out


def _make_operands(np, jnp, wq, case, tp, rng):
    k, n, m = 64 * tp, 64, 5  # n, k: multiples of 64 (Ascend 950 per-group int4)
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
    opts = dict(antiquant_group_size=g or 0, transpose_x2=case["transpose"], x2_format=case["fmt"],
                x2_dtype="hifloat8" if case["weight_dtype"] == "hifloat8" else None)
    return (x1, x2, scale, offset, bias, x3), x2_axis, sharded_q, opts


def run(args) -> int:
    jax = _setup_jax(args.cpu_devices)
    import jax.numpy as jnp
    import jaxlib
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    import jax_wqmm as wq
    from jax_wqmm import hccl, native, reference
    from jax_wqmm.spec import PRODUCTS

    report: dict = dict(python=_platform.python_version(), jax=jax.__version__,
                        jaxlib=jaxlib.__version__, jax_wqmm=wq.__version__)
    print("jax_wqmm selftest")
    print(f"  python {report['python']}, jax {report['jax']}, jaxlib {report['jaxlib']}, "
          f"jax_wqmm {report['jax_wqmm']}")
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
        hardware = True
    else:
        from jax_wqmm import testing
        mode = (f"EMULATOR: no '{npu_platform}' devices here; the CANN ABI is emulated on the host "
                f"({testing.emulator_library_path().name}); nothing ran on Ascend hardware")
        emu = testing.use_emulator()
        if args.soc:
            emu.set_soc(args.soc)
        devices = jax.devices("cpu")
        hardware = False
    status = native.cann_status()
    product = native.npu_product(npu_platform if hardware else "cpu")
    kinds = sorted({d.device_kind for d in devices})
    report.update(mode=mode, hardware=hardware, device_kind=kinds, soc=status["soc"],
                  product=product, symbols=status["symbols"], libraries=status["paths"])
    print(f"  mode: {mode}")
    print(f"  device kind: {', '.join(kinds)}; SoC (aclrtGetSocName): {status['soc'] or '(not reported)'}")
    print(f"  product: {PRODUCTS[product].title} ({product}); {PRODUCTS[product].deterministic}")
    for sym, path in sorted(status["symbols"].items()):
        print(f"  {sym:48s} {path}")

    ordinals = [hccl.device_ordinal(d) for d in devices]
    binding = _check_binding(native.extension(), ordinals)
    report["binding"] = binding
    bad = [b for b in binding if not b["ok"]]
    print(f"  device/thread binding: {len(binding) - len(bad)}/{len(binding)} devices made current "
          "on a fresh thread (aclrtSetDevice, then aclrtGetDevice agrees)"
          + "".join(f"\n    [FAIL] device {b['device']}: {b['error'] or b['current']}" for b in bad))

    rng = np.random.default_rng(0)
    meshes = [("device %d alone" % d.id, [d]) for d in devices[: args.max_single]]
    sizes = [s for s in sorted(PRODUCTS[product].world_sizes) if 1 < s <= len(devices)]
    meshes += [(f"{s} devices (tp={s})", devices[:s]) for s in sizes[-args.max_meshes:]]
    results = []
    for label, devs in meshes:
        tp = len(devs)
        mesh = Mesh(np.array(devs), ("selftest_tp",))
        hccl.create_groups(mesh, "selftest_tp")
        for case in _cases(product):
            if case["fmt"] == "FRACTAL_NZ" and case["transpose"] and tp > 1:
                continue  # per-rank NZ storage of (n, k) is not one shardable array
            name = "-".join(str(v) for v in case.values())
            t0 = time.perf_counter()
            ulps = err = None
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
                err = float(np.abs(y - r).max() / (np.abs(r).max() + 1.0))
                ulps = _ulp_error(np, y, r, case["act"])
                ok = one_call and err <= 8 * (4 + tp) * u
                detail = f"max error {ulps:.1f} ulp (rel {err:.1e})" + ("" if one_call else "; HLO is not one custom call")
            except Exception as e:  # noqa: BLE001 - reported, not raised
                ok, detail = False, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            results.append(dict(mesh=label, case=name, ok=bool(ok), detail=detail, max_ulp=ulps,
                                rel_error=err, seconds=round(time.perf_counter() - t0, 3)))
            if args.verbose or not ok:
                print(f"  [{'PASS' if ok else 'FAIL'}] {label}: {name}: {detail}")
        hccl.destroy_groups()
        mine = [r for r in results if r["mesh"] == label]
        worst = max((r["max_ulp"] or 0.0 for r in mine), default=0.0)
        print(f"  {label}: {sum(r['ok'] for r in mine)}/{len(mine)} passed, worst {worst:.1f} ulp "
              f"({sum(r['seconds'] for r in mine):.1f} s)")

    passed = sum(r["ok"] for r in results) + sum(b["ok"] for b in binding)
    failed = len(results) + len(binding) - passed
    report.update(results=results, passed=passed, failed=failed)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"  report written to {args.json}")
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jax_wqmm.selftest", description=__doc__.splitlines()[0])
    p.add_argument("--emulator", action="store_true", help="use the host emulator even if NPUs are present")
    p.add_argument("--platform", default=None, help="the NPU platform name (default $JAX_WQMM_NPU_PLATFORM or 'npu')")
    p.add_argument("--cpu-devices", type=int, default=8, help="virtual CPU devices for the emulator (default 8)")
    p.add_argument("--max-single", type=int, default=2, help="devices checked alone (default 2)")
    p.add_argument("--max-meshes", type=int, default=1,
                   help="how many multi-device world sizes to check, largest first (default 1: "
                        "the largest the product supports with the devices here)")
    p.add_argument("--soc", default=None, help="emulator only: the SoC to emulate (e.g. Ascend950PR)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the report as JSON to PATH")
    p.add_argument("-v", "--verbose", action="store_true")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
