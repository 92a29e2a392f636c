"""The native path (FFI handler -> CANN ABI) driven on CPU against the host emulator.

Nothing here ran on Ascend hardware: the emulator stands in for CANN (see jax_wqmm.testing).
"""

import dataclasses
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

import jax_wqmm as wq
import jax_wqmm.testing as wqt
from jax_wqmm import hccl, native
import oracle
from cases import make_case
from test_shard_map import _nz_per_rank, _rank_slices, _weight_spec


@pytest.fixture(scope="module")
def emu():
    emulator = wqt.use_emulator()
    yield emulator
    wqt.use_default()
    wqt.destroy_groups()


@pytest.fixture(scope="module")
def mesh_tp(emu):
    mesh = jax.make_mesh((8,), ("tp",), axis_types=(AxisType.Explicit,))
    wqt.create_groups(mesh, "tp")
    return mesh


def _run(mesh, case, x2=None, specs=None, axis_name="tp", out_specs=P()):
    x1, x2_, s, o, b, x3 = case.args
    x2 = x2_ if x2 is None else x2
    present = [a is not None for a in (x1, x2, s, o, b, x3)]
    arrays = [a for a in (x1, x2, s, o, b, x3) if a is not None]
    specs = [sp for sp, p in zip(specs, present) if p]

    def f(*args):
        it = iter(args)
        a = [next(it) if p else None for p in present]
        return wq.weight_quant_matmul_all_reduce(*a, axis_name=axis_name, **case.kwargs)

    fn = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=tuple(specs), out_specs=out_specs))
    put = [jax.device_put(jnp.asarray(a), NamedSharding(mesh, sp)) for a, sp in zip(arrays, specs)]
    return fn, put


CONFIGS = [
    dict(weight_dtype="int8", granularity="per_channel", offset=True, bias=True, x3=True),
    dict(weight_dtype="int8", granularity="per_tensor", act="float16"),
    dict(weight_dtype="int8", granularity="per_group", group_size=32, offset=True, x3=True),
    dict(weight_dtype="int4", granularity="per_group", group_size=32, offset=True, bias=True),
    dict(weight_dtype="int4", granularity="per_channel", transpose=True, act="float16", bias=True),
    dict(weight_dtype="int8", granularity="per_channel", transpose=True, offset=True),
    dict(weight_dtype="int8", granularity="per_channel", fmt="FRACTAL_NZ", bias=True),
    dict(weight_dtype="int4", granularity="per_channel", fmt="FRACTAL_NZ", act="float16", offset=True),
    dict(weight_dtype="int4", granularity="per_group", group_size=32, transpose=True, offset=True, x3=True),
    dict(weight_dtype="int8", granularity="per_group", group_size=32, transpose=True, act="float16"),
    # FP8 / HiFloat8 weights: Ascend 950 only
    dict(weight_dtype="float8_e4m3fn", granularity="per_channel", bias=True, soc="Ascend950PR"),
    dict(weight_dtype="hifloat8", granularity="per_channel", x3=True, act="float16", soc="Ascend950PR"),
    dict(weight_dtype="int4", granularity="per_group", group_size=32, transpose=True, offset=True, n=64,
         soc="Ascend950PR"),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_tp8_native_equals_reference_and_oracle(mesh_tp, emu, cfg):
    cfg = dict(cfg)
    with emu.emulating(cfg.pop("soc", "Ascend910B4")):
        _tp8_native_equals_reference_and_oracle(mesh_tp, dict(dict(n=48), **cfg))


def _tp8_native_equals_reference_and_oracle(mesh_tp, cfg):
    case = make_case(np.random.default_rng(40), k=8 * 64, lead=(5,), **cfg)
    x2 = _nz_per_rank(case, 8) if case.kwargs["x2_format"] == "FRACTAL_NZ" else None
    qspec = P("tp", None) if case.group_size else P()
    specs = (P(None, "tp"), _weight_spec(case.kwargs), qspec, qspec, P(), P())
    fn, args = _run(mesh_tp, case, x2, specs)
    lowered = fn.lower(*args)
    text = lowered.as_text()
    assert text.count(f"stablehlo.custom_call @{wqt.HOST_TARGET}") == 1
    assert "all_reduce" not in text and "all-reduce" not in lowered.compile().as_text()
    y = fn(*args)
    expected, mag = oracle.wqmm(_rank_slices(case, 8), case.group_size, case.weight_dtype)
    oracle.assert_close(y, expected, mag, case.act, ranks=8)
    # ... and the reference lowering of the same call agrees within the same tolerance.
    wqt.use_reference()
    try:
        fn_ref, _ = _run(mesh_tp, case, x2, specs)
        y_ref = fn_ref(*args)
    finally:
        wqt.use_emulator()
    oracle.assert_close(y, np.asarray(y_ref, np.float64), mag, case.act, ranks=16)


def test_2d_mesh_each_device_finds_its_tp_group(emu):
    mesh = jax.make_mesh((2, 4), ("dp", "tp2"), axis_types=(AxisType.Explicit,) * 2)
    names = wqt.create_groups(mesh, "tp2")
    assert len(set(names.values())) == 2  # one group per dp index
    for row in mesh.devices:
        assert len({names[d] for d in row}) == 1
    case = make_case(np.random.default_rng(41), weight_dtype="int4", granularity="per_group",
                     group_size=32, offset=True, bias=True, x3=True, k=4 * 64, n=24, lead=(2, 3))
    specs = (P("dp", None, "tp2"), P("tp2", None), P("tp2", None), P("tp2", None), P(), P("dp"))
    fn, args = _run(mesh, case, None, specs, axis_name="tp2", out_specs=P("dp"))
    assert "all_reduce" not in fn.lower(*args).as_text()
    y = np.asarray(fn(*args), np.float64)
    for d in range(2):
        block = dict(case.oracle, x1=case.oracle["x1"][d:d + 1], x3=case.oracle["x3"][d:d + 1])
        sub = dataclasses.replace(case, oracle=block)
        expected, mag = oracle.wqmm(_rank_slices(sub, 4), 32, "int4")
        oracle.assert_close(y[d:d + 1], expected, mag, case.act, ranks=4)


def _small(mesh):
    case = make_case(np.random.default_rng(42), k=8 * 32, n=16, lead=(4,), offset=True, bias=True)
    return _run(mesh, case, None, (P(None, "tp"), P("tp", None), P(), P(), P(), P())) + (case,)


def test_emulator_error_names_stage_and_code(mesh_tp, emu):
    fn, args, _ = _small(mesh_tp)
    fn(*args).block_until_ready()
    with emu.failing("workspace", 161002):
        with pytest.raises(jax.errors.JaxRuntimeError,
                           match=r"aclnnWeightQuantMatmulAllReduceGetWorkspaceSize returned 161002 \(ACLNN_ERR_PARAM_INVALID\): injected failure"):
            fn(*args).block_until_ready()
    with emu.failing("run", 507015):
        with pytest.raises(jax.errors.JaxRuntimeError, match=r"aclnnWeightQuantMatmulAllReduce returned 507015"):
            fn(*args).block_until_ready()
    assert emu.live_tensors() == 0 and emu.live_executors() == 0


def test_thousand_calls_leave_no_live_descriptors(mesh_tp, emu):
    fn, args, _ = _small(mesh_tp)
    before = emu.live_tensors()
    for _ in range(125):  # 125 calls x 8 devices = 1,000 handler calls
        # One call in flight at a time: with many queued, jax 0.10's CPU runtime starves the
        # emulator's rendezvous of threads (slow, not wrong; see README, "emulator").
        fn(*args).block_until_ready()
    assert before == 0
    assert emu.live_tensors() == 0 and emu.live_executors() == 0


def test_missing_group_is_a_clear_error(emu):
    mesh = jax.make_mesh((8,), ("unregistered",), axis_types=(AxisType.Explicit,))
    case = make_case(np.random.default_rng(43), k=8 * 32, n=16)
    fn, args = _run(mesh, case, None, (P(None, "unregistered"), P("unregistered", None), P()),
                    axis_name="unregistered")
    with pytest.raises(jax.errors.JaxRuntimeError,
                       match="no HCCL group registered for mesh axis 'unregistered' on local device"):
        fn(*args).block_until_ready()


def test_axis_size_3_falls_back_and_warns(emu):
    mesh = Mesh(np.array(jax.devices()[:3]), ("tp3",))
    case = make_case(np.random.default_rng(44), k=3 * 32, n=16, bias=True)
    fn, args = _run(mesh, case, None, (P(None, "tp3"), P("tp3", None), P(), P(), P(), P()), axis_name="tp3")
    native._warned.clear()
    with pytest.warns(RuntimeWarning, match="spans 3 devices.*on Atlas A2 supports 1, 2, 4, 8 ranks"):
        text = fn.lower(*args).as_text()
    assert "custom_call" not in text and "all_reduce" in text
    expected, mag = oracle.wqmm(_rank_slices(case, 3), 0, "int8")
    oracle.assert_close(fn(*args), expected, mag, case.act, ranks=3)


def test_group_from_root_info_exchange(emu):
    """The multi-process path (HcclGetRootInfo + HcclCommInitRootInfo, one thread per local
    device) in one process: every rank joins the same communicator."""
    ext = native.extension()
    devices = jax.devices()[:4]
    root = ext.hccl_get_root_info(hccl.device_ordinal(devices[0]))
    results = hccl._init_root_info(ext, devices, devices, root)
    names = {name for _, (_, name) in results}
    assert len(names) == 1
    mesh = Mesh(np.array(devices), ("tp_root",))
    for d, (handle, name) in results:
        hccl.register_group("tp_root", d, name)
    case = make_case(np.random.default_rng(45), k=4 * 32, n=16)
    fn, args = _run(mesh, case, None, (P(None, "tp_root"), P("tp_root", None), P()), axis_name="tp_root")
    expected, mag = oracle.wqmm(_rank_slices(case, 4), 0, "int8")
    try:
        oracle.assert_close(fn(*args), expected, mag, case.act, ranks=4)
    finally:
        for _, (handle, _) in results:
            ext.hccl_comm_destroy(handle)


def test_import_never_needs_cann():
    code = textwrap.dedent("""
        import jax_wqmm, jax_wqmm.native as n
        assert n.register_npu_lowering() is False      # no 'npu' platform here
        try:
            n.load_cann()
        except n.CannLibraryError as e:
            print("clear error:", str(e).splitlines()[0])
    """)
    env = dict(os.environ, JAX_WQMM_CANN_LIB_DIR="/nonexistent", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "clear error: jax_wqmm could not load the CANN libraries" in out.stdout


def test_ffi_attributes_come_from_the_spec():
    case = make_case(np.random.default_rng(46), weight_dtype="int4", granularity="per_group",
                     group_size=32, offset=True, transpose=True, x3=True)
    spec = wq.make_spec(*case.args, axis_name=("dp", "tp"), **case.kwargs)
    assert spec.scale_transposed  # per-group with a transposed x2: the kernel's layout
    attrs = native.ffi_attributes(spec, scale_transposed=spec.scale_transposed)
    assert attrs["axis"] == "dp,tp" and attrs["x2_dtype"] == 29 and attrs["x2_format"] == 2
    assert attrs["transpose_x2"] is True and attrs["scale_transposed"] is True
    assert attrs["has_offset"] and attrs["has_x3"] and not attrs["has_bias"]
    assert (attrs["k"], attrs["n"], attrs["antiquant_group_size"]) == (96, 40, 32)
    assert isinstance(attrs["k"], np.int64) and isinstance(attrs["x2_dtype"], np.int32)
    nz = make_case(np.random.default_rng(46), weight_dtype="int8", fmt="FRACTAL_NZ", transpose=True)
    nz_spec = wq.make_spec(*nz.args, **nz.kwargs)
    assert native.ffi_attributes(nz_spec)["x2_format"] == 29 and not nz_spec.scale_transposed


@pytest.mark.slow
@pytest.mark.parametrize("soc,product", [("Ascend910B4", "atlas_a2"), ("Ascend950PR", "ascend950")])
def test_selftest_command_passes_on_the_emulator(tmp_path, soc, product):
    report = tmp_path / "selftest.json"
    out = subprocess.run([sys.executable, "-m", "jax_wqmm.selftest", "--max-single", "1", "--soc", soc,
                          "--json", str(report)],
                         capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "EMULATOR" in out.stdout and "nothing ran on Ascend hardware" in out.stdout
    assert f"SoC (aclrtGetSocName): {soc}" in out.stdout and f"({product})" in out.stdout
    assert "device/thread binding: 8/8 devices made current" in out.stdout
    assert " 0 failed" in out.stdout
    import json
    data = json.loads(report.read_text())
    assert data["product"] == product and data["hardware"] is False and data["failed"] == 0
    assert data["symbols"]["aclnnWeightQuantMatmulAllReduce"].endswith("libwqmm_cann_emulator.so")
    assert {r["case"].split("-")[0] for r in data["results"]} == (
        {"int8", "int4"} if product == "atlas_a2" else {"int8", "int4", "float8_e4m3fn", "hifloat8"})
    assert all(r["ok"] and r["max_ulp"] is not None for r in data["results"])


def test_switching_lowerings_takes_effect_for_compiled_functions(emu):
    """use_reference / use_default / use_emulator apply to a function already compiled for
    the same shapes (the caches that hold the old lowering are cleared)."""
    mesh = Mesh(np.array(jax.devices()[:2]), ("tp_switch",))
    wqt.create_groups(mesh, "tp_switch")
    case = make_case(np.random.default_rng(48), k=2 * 32, n=16)
    fn, args = _run(mesh, case, None, (P(None, "tp_switch"), P("tp_switch", None), P()), axis_name="tp_switch")
    try:
        runs = emu.calls()
        fn(*args).block_until_ready()
        assert emu.calls() == runs + 2  # the emulator ran on both devices
        wqt.use_reference()
        fn(*args).block_until_ready()
        wqt.use_default()
        fn(*args).block_until_ready()
        assert emu.calls() == runs + 2  # neither touched the emulator
        wqt.use_emulator()
        fn(*args).block_until_ready()
        assert emu.calls() == runs + 4
    finally:
        wqt.use_emulator()


def test_missing_rank_times_out_with_an_error_not_a_hang(emu):
    """A 4-rank communicator used by a 2-device mesh: ranks 2 and 3 never arrive."""
    ext = native.extension()
    four = ext.hccl_comm_init_all([0, 1, 2, 3])
    devices = jax.devices()[:2]
    for d in devices:
        hccl.register_group("tp_short", d, four[0][1])
    mesh = Mesh(np.array(devices), ("tp_short",))
    case = make_case(np.random.default_rng(47), k=2 * 32, n=16)
    fn, args = _run(mesh, case, None, (P(None, "tp_short"), P("tp_short", None), P()), axis_name="tp_short")
    old = emu.timeout_ms
    emu.set_timeout_ms(300)
    try:
        with pytest.raises(jax.errors.JaxRuntimeError, match=r"timed out after 300 ms") as info:
            fn(*args).block_until_ready()
        # Which ranks had arrived when a rank timed out depends on scheduling (on a loaded
        # machine rank 0 may time out before rank 1 arrives): assert only what must hold.
        m = re.search(r"all-reduce on group (\S+) timed out after 300 ms on rank (\d) ?; "
                      r"ranks that never arrived:((?: \d)+)", str(info.value))
        assert m, str(info.value)
        assert m.group(1) == four[0][1]
        reporter, missing = int(m.group(2)), {int(r) for r in m.group(3).split()}
        assert reporter in (0, 1) and {2, 3} <= missing <= {0, 1, 2, 3} - {reporter}
    finally:
        emu.set_timeout_ms(old)
        for h, _ in four:
            ext.hccl_comm_destroy(h)
    assert emu.live_tensors() == 0 and emu.live_executors() == 0


def test_root_info_goes_through_the_distributed_key_value_store(emu, monkeypatch):
    """create_groups' cross-process exchange: the group's first process publishes the HCCL root
    info under a key, the others read it (a dict stands in for jax.distributed's client)."""
    from jax._src import distributed

    store = {}

    class FakeClient:
        def key_value_set(self, key, value):
            store[key] = value

        def blocking_key_value_get(self, key, timeout_ms):
            return store[key]

    monkeypatch.setattr(distributed.global_state, "client", FakeClient())
    ext = native.extension()
    root = hccl._exchange_root_info(ext, "jax_wqmm/hccl/tp/0", is_root=True)
    assert list(store) == ["jax_wqmm/hccl/tp/0"]
    assert hccl._exchange_root_info(ext, "jax_wqmm/hccl/tp/0", is_root=False) == root
    assert len(root) == 4108  # sizeof(HcclRootInfo)


def test_create_groups_across_processes_needs_jax_distributed(emu, monkeypatch):
    from jax._src import distributed

    monkeypatch.setattr(distributed.global_state, "client", None)
    with pytest.raises(RuntimeError, match="jax.distributed.initialize"):
        hccl._exchange_root_info(native.extension(), "k", is_root=True)


# ----------------------------------------------------------------------------- across processes

def _two_processes(tmp_path, mode, timeout=300):
    import json
    from pathlib import Path

    from test_layers import _free_port

    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    here = Path(__file__).resolve().parent
    examples = here.parent / "examples"
    procs = [subprocess.Popen([sys.executable, str(here / "native_worker.py"), str(port), str(i), mode,
                               str(tmp_path), str(examples)], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    try:
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    results = {}
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, out[-4000:]
        f = tmp_path / f"result{i}.json"
        if f.exists():
            results[i] = json.loads(f.read_text())
    return results, outs


@pytest.mark.slow
def test_two_processes_native_path_end_to_end(tmp_path):
    """2 processes x 4 CPU devices, jax.distributed on 127.0.0.1, the emulator as the NPU:
    communicators across processes through the key-value store; tp=8 across both, (2, 4) with
    tp inside each process, (4, 2) with tp across them; the example layer on tp=8."""
    results, outs = _two_processes(tmp_path, "run")
    for pid in (0, 1):
        r = results[pid]
        for name in ("tp8", "dp2_tp4", "dp4_tp2"):
            assert r[name]["close"] is True, (pid, name, r[name])
            assert r[name]["custom_calls"] == 1 and not r[name]["all_reduce"], (name, r[name])
        assert len(r["tp8"]["groups"]) == 1 and len(r["dp2_tp4"]["groups"]) == 1
        assert len(r["dp4_tp2"]["groups"]) == 4  # this process's 4 devices in 4 cross-process groups
        assert r["layer_custom_calls"] == 2  # one fused call per row-parallel projection
        assert r["live_tensors"] == 0 and r["live_comms_before_exit"] == 4
        assert (tmp_path / f"comms{pid}.txt").read_text() == "0", "communicators left at exit"
    # the layer equals the single-process run of the same model on the default CPU lowering
    # (not the emulator that this module's fixture may have left set)
    from test_layers import ex as example  # the example module (test_layers puts it on the path)
    cfg = example.Config(hidden=256, heads=8, intermediate=512, batch=1, seq=8)
    mesh = Mesh(np.array(jax.devices()), ("tp",))
    with wqt.default_lowering():
        step, qs = example.make_step(mesh, cfg, example.quantize_params(example.init_params(jax.random.key(0), cfg), "int8"))
        x = example.inputs(cfg)
        y = np.asarray(step(qs, jax.device_put(jnp.asarray(x, jnp.bfloat16), NamedSharding(mesh, P()))), np.float32)
    for pid in (0, 1):
        got = np.load(tmp_path / f"layer{pid}.npy")
        np.testing.assert_allclose(got, y, rtol=2e-2, atol=2e-2 * np.abs(y).max())


@pytest.mark.slow
def test_a_dead_process_is_an_error_for_the_survivor_not_a_hang(tmp_path):
    results, outs = _two_processes(tmp_path, "fault")
    r = results[0]
    assert r["error"] is not None, outs[0][-2000:]
    m = re.search(r"all-reduce on group (emu_hccl_hub:\S+) (failed: the process of ranks(?: \d)+ is gone|timed out after \d+ ms); "
                  r"ranks that never arrived:((?: \d)+)", r["error"])
    assert m, r["error"]
    assert {4, 5, 6, 7} <= {int(v) for v in m.group(3).split()} <= {4, 5, 6, 7}
    assert r["seconds"] < 4 + 5 + 2  # within the timeout (4 s) and the client's margin, not a hang
    assert r["live_tensors"] == 0 and r["live_executors"] == 0
    # ... and a new run afterwards succeeds (new coordinator, new root info)
    results, _ = _two_processes(tmp_path, "run")
    assert results[0]["tp8"]["close"] is True and results[1]["tp8"]["close"] is True


def test_root_info_of_a_gone_hub_is_a_clear_error(emu):
    """Root info left over from an earlier run names a hub that is not there any more."""
    ext = native.extension()
    stale = b"hub:1:0123abcd".ljust(4108, b"\0")  # port 1: nothing listens
    with pytest.raises(RuntimeError, match="HcclCommInitRootInfo returned 9: .*is not there.*root info from an earlier run"):
        ext.hccl_comm_init_root_info(0, 2, stale, 0)
