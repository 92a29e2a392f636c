"""One process of the multi-process native-path tests: 4 CPU devices, jax.distributed over
127.0.0.1, the emulator of CANN as the NPU, communicators made across both processes through
create_groups (root info through jax.distributed's key-value store).

    python native_worker.py PORT PROCESS_ID MODE OUT_DIR EXAMPLES_DIR

MODE "run": the fused op on a tp=8 mesh across both processes, a (2, 4) mesh (tp inside each
process) and a (4, 2) mesh (tp across processes), and the example layer on tp=8; writes
OUT_DIR/result{pid}.json and the layer's output. MODE "fault": process 1 exits in the middle
(after one good call); process 0 records the error of the next call.
"""

import atexit
import json
import os
import sys
import time

RESULT = {}


def _write(out_dir, pid):
    with open(os.path.join(out_dir, f"result{pid}.json"), "w") as f:
        json.dump(RESULT, f)


def _live_comms_at_exit(out_dir, pid):
    """Registered before jax_wqmm is imported, so it runs after jax_wqmm.hccl's exit hook
    (atexit runs last-registered first): what that hook left alive."""
    import jax_wqmm.testing as wqt

    with open(os.path.join(out_dir, f"comms{pid}.txt"), "w") as f:
        f.write(str(wqt._emulator(os.fspath(wqt.emulator_library_path())).live_comms()))


def main(port: int, pid: int, mode: str, out_dir: str, examples: str):
    atexit.register(_live_comms_at_exit, out_dir, pid)
    import jax

    jax.config.update("jax_num_cpu_devices", 4)
    jax.config.update("jax_platforms", "cpu")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                               process_id=pid, initialization_timeout=120)
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, examples)
    import jax_wqmm as wq
    import jax_wqmm.testing as wqt
    import oracle
    from cases import make_case

    from jax.experimental import multihost_utils

    emu = wqt.use_emulator()
    devs = np.array(jax.devices())  # process 0: devices 0..3, process 1: 4..7
    assert jax.device_count() == 8 and jax.local_device_count() == 4

    def fused_call(mesh, case, axes):
        dp = [a for a in mesh.axis_names if a != "tp"]
        lead = P(dp[0] if dp else None, "tp")
        q = P("tp", None) if case.group_size else P()  # per-group scales split with k
        specs = (lead, P("tp", None), q, q, P(), P(dp[0]) if dp else P())
        x1, x2, s, o, b, x3 = case.args
        arrays = [a for a in (x1, x2, s, o, b, x3) if a is not None]
        specs = tuple(sp for a, sp in zip((x1, x2, s, o, b, x3), specs) if a is not None)
        f = jax.jit(jax.shard_map(
            lambda *a: wq.weight_quant_matmul_all_reduce(*a, axis_name="tp", **case.kwargs),
            mesh=mesh, in_specs=specs, out_specs=P(dp[0]) if dp else P()))
        put = [jax.make_array_from_callback(a.shape, NamedSharding(mesh, sp), lambda i, a=a: np.asarray(a)[i])
               for a, sp in zip(arrays, specs)]
        return f, put

    if mode == "fault":
        emu.set_timeout_ms(4000)
        mesh = Mesh(devs, ("tp",))
        wqt.create_groups(mesh, "tp")
        case = make_case(np.random.default_rng(1), k=8 * 32, n=16, lead=(4,))
        f, args = fused_call(mesh, case, ("tp",))
        jax.block_until_ready(f(*args))
        if pid == 1:
            os._exit(0)  # a process dies in the middle of the run
        time.sleep(1.0)
        t0 = time.time()
        try:
            jax.block_until_ready(f(*args))
            RESULT["error"] = None
        except Exception as e:  # noqa: BLE001 - recorded for the parent
            RESULT["error"] = str(e)
        RESULT["seconds"] = time.time() - t0
        RESULT["live_tensors"] = emu.live_tensors()
        RESULT["live_executors"] = emu.live_executors()
        _write(out_dir, pid)
        os._exit(0)  # the other process is gone: no shutdown barrier

    meshes = {"tp8": Mesh(devs, ("tp",)),
              "dp2_tp4": Mesh(devs.reshape(2, 4), ("dp", "tp")),        # tp inside each process
              "dp4_tp2": Mesh(devs.reshape(2, 4).T, ("dp", "tp"))}      # tp across processes
    for name, mesh in meshes.items():
        names = wqt.create_groups(mesh, "tp")
        tp = mesh.shape["tp"]
        dp = mesh.shape.get("dp", 1)
        case = make_case(np.random.default_rng(7), weight_dtype="int4", granularity="per_group",
                         group_size=32, offset=True, bias=True, x3=True, k=tp * 64, n=24, lead=(dp * 2,))
        f, args = fused_call(mesh, case, ("tp",))
        text = f.lower(*args).as_text()
        got = np.asarray(multihost_utils.process_allgather(f(*args), tiled=True), np.float64)
        # the oracle, tp group by tp group (dp row blocks of 2): every rank adds bias and x3
        o = case.oracle
        want, mags = [], []
        for d in range(dp):
            sl = slice(2 * d, 2 * d + 2)
            ranks = []
            for t in range(tp):
                ks = slice(t * 64, (t + 1) * 64)
                gs = slice(t * 2, (t + 1) * 2)
                ranks.append(dict(x1=o["x1"][sl, ks], codes=o["codes"][ks], scale=o["scale"][gs],
                                  offset=o["offset"][gs], bias=o["bias"], x3=o["x3"][sl]))
            w, m = oracle.wqmm(ranks, 32, "int4")
            want.append(w)
            mags.append(m)
        want, mag = np.concatenate(want), np.concatenate(mags)
        ok = True
        try:
            oracle.assert_close(got, want, mag, "bfloat16", ranks=tp)
        except AssertionError as e:
            ok = str(e)[:500]
        RESULT[name] = dict(groups=sorted(set(names.values())), custom_calls=text.count(f"@{wqt.HOST_TARGET}"),
                            all_reduce="all_reduce" in text, close=ok)
        wqt.destroy_groups()

    # the example layer on the native path across both processes
    import llama_tp as ex

    mesh = meshes["tp8"]
    wqt.create_groups(mesh, "tp")
    cfg = ex.Config(hidden=256, heads=8, intermediate=512, batch=1, seq=8)
    step, qs = ex.make_step(mesh, cfg, ex.quantize_params(ex.init_params(jax.random.key(0), cfg), "int8"))
    x = ex.inputs(cfg)
    xs = jax.make_array_from_callback(x.shape, NamedSharding(mesh, P()),
                                      lambda idx: x.astype(jnp.bfloat16)[idx])
    RESULT["layer_custom_calls"] = step.lower(qs, xs).as_text().count(f"@{wqt.HOST_TARGET}")
    y = jax.block_until_ready(step(qs, xs))  # every local device's call, not only the first
    np.save(os.path.join(out_dir, f"layer{pid}.npy"), np.asarray(y.addressable_shards[0].data, np.float32))
    RESULT["live_tensors"] = emu.live_tensors()
    RESULT["live_comms_before_exit"] = emu.live_comms()  # the layer's 8-rank groups: 4 here
    _write(out_dir, pid)
    multihost_utils.sync_global_devices("done")  # no process leaves while the other computes
    # no destroy_groups: jax_wqmm.hccl's exit hook destroys the communicators


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
