"""The emulator checks what CANN checks, and the JAX side never sends what CANN rejects.

Each row: one rule ported from CANN's op_api / tiling (see ffi/emulator/cann_emulator.cc), a
direct call into the emulator that breaks it (the status and message it must return), and the
same mistake made through jax_wqmm, which must raise ConstraintError before anything runs, or
"structural": jax_wqmm builds that descriptor itself from the validated spec (the end-to-end
tests in test_native.py pass against this emulator, which would reject a wrong one).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_wqmm as wq
import jax_wqmm.testing as wqt
from jax.sharding import PartitionSpec as P

from jax_wqmm import native
from cases import make_case
from emu_direct import NZ, Direct, T

NULLPTR, INVALID, TILING = 161001, 161002, 561002
M, K, N = 4, 64, 64


@pytest.fixture(scope="module")
def direct():
    emu = wqt.use_emulator()
    d = Direct()
    d.set_device(0)
    d.group_name = d.group((0,))
    yield d, emu
    emu.set_soc("Ascend910B4")
    wqt.use_default()


def base(**over):
    call = dict(x1=T((M, K)), x2=T((K, N), "int8"), scale=T((N,)), out=T((M, N)))
    call.update(over)
    return call


def sds(shape, dtype):
    return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))


def jax_base(**over):
    """The same call through jax_wqmm's validation: (positional, keyword) for make_spec."""
    args = dict(x1=sds((M, K), jnp.bfloat16), x2=sds((K, N), jnp.int8), antiquant_scale=sds((N,), jnp.bfloat16),
                antiquant_offset=None, bias=None, x3=None)
    opts = {}
    for key, v in over.items():
        (args if key in args else opts)[key] = v
    return args, opts


BF, F16, F32 = jnp.bfloat16, jnp.float16, jnp.float32

# (id, soc, direct-call overrides, status, message fragment, jax overrides | "structural: why")
ROWS = [
    # ---- op_api CheckNotNull: 161001
    ("x1_null", None, dict(x1=None), NULLPTR, "x1 is nullptr", dict(x1=None)),
    ("scale_null", None, dict(scale=None), NULLPTR, "antiquantScale is nullptr", dict(antiquant_scale=None)),
    ("output_null", None, dict(out=None), NULLPTR, "output is nullptr", "structural: the handler always passes the output"),
    # ---- op_api CheckDtypeValid: 161002
    ("x1_float32", None, dict(x1=T((M, K), "float32"), scale=T((N,), "float32"), out=T((M, N), "float32")),
     INVALID, "x1 dtype FLOAT is not supported", dict(x1=sds((M, K), F32), antiquant_scale=sds((N,), F32))),
    ("fp8_on_a2", None, dict(x2=T((K, N), "float8_e4m3fn")), INVALID, "x2 dtype FLOAT8_E4M3FN is not supported",
     dict(x2=sds((K, N), jnp.float8_e4m3fn), product="atlas_a2")),
    ("e5m2_on_950", "Ascend950PR", dict(x2=T((K, N), "float8_e5m2")), INVALID, "x2 dtype FLOAT8_E5M2",
     dict(x2=sds((K, N), jnp.float8_e5m2))),
    ("scale_dtype", None, dict(scale=T((N,), "float16")), INVALID, "antiquantScale dtype must equal x1's",
     dict(antiquant_scale=sds((N,), F16))),
    ("output_dtype", None, dict(out=T((M, N), "float16")), INVALID, "output dtype must equal x1's",
     "structural: the output has x1's dtype by the spec"),
    ("bias_float32", None, dict(bias=T((N,), "float32")), INVALID, "bias dtype FLOAT must equal x1's",
     dict(bias=sds((N,), F32))),
    ("bias_float32_fp8_950", "Ascend950PR", dict(x2=T((K, N), "float8_e4m3fn"), bias=T((N,), "float32")),
     INVALID, "bias dtype FLOAT must equal x1's", dict(x2=sds((K, N), jnp.float8_e4m3fn), bias=sds((N,), F32))),
    ("offset_dtype", None, dict(offset=T((N,), "float16")), INVALID, "antiquantOffset dtype must equal",
     dict(antiquant_offset=sds((N,), F16))),
    ("x3_float32", None, dict(x3=T((M, N), "float32")), INVALID, "x3 dtype FLOAT must equal x1's",
     dict(x3=sds((M, N), F32))),
    # ---- op_api CheckAttr
    ("reduce_op", None, dict(reduce_op="max"), INVALID, "reduceOp must be sum", dict(reduce_op="max")),
    ("stream_mode", None, dict(stream_mode=0), INVALID, "streamMode must be 1", dict(stream_mode=0)),
    ("group_size_48", None, dict(group_size=48, scale=T((2, N))), INVALID, "antiquantGroupSize 48",
     dict(antiquant_group_size=48, antiquant_scale=sds((2, N), BF))),
    # ---- op_api CheckShape
    ("x1_1d", None, dict(x1=T((K,))), INVALID, "x1 must be 2-D or 3-D", dict(x1=sds((K,), BF))),
    ("x2_3d", None, dict(x2=T((1, K, N), "int8")), INVALID, "x2 view must be 2-D", dict(x2=sds((1, K, N), jnp.int8))),
    ("k_mismatch", None, dict(x2=T((K + 32, N), "int8")), INVALID, "x2 k 96 != x1 k 64",
     dict(x2=sds((K + 32, N), jnp.int8))),
    ("output_shape", None, dict(out=T((M, N + 1))), INVALID, "output shape", "structural: the output shape comes from the spec"),
    ("m_zero", None, dict(x1=T((0, K)), out=T((0, N))), INVALID, "output is empty", dict(x1=sds((0, K), BF))),
    ("bias_2d", None, dict(bias=T((1, N))), INVALID, "bias shape (1, 64) != (n,)", dict(bias=sds((1, N), BF))),
    ("x3_shape", None, dict(x3=T((M, N + 1))), INVALID, "x3 shape", dict(x3=sds((M, N + 1), BF))),
    ("scale_shape", None, dict(scale=T((2, N))), INVALID, "antiquantScale shape (2, 64) is not allowed",
     dict(antiquant_scale=sds((2, N), BF))),
    ("group_scale_shape", None, dict(group_size=32, scale=T((3, N))), INVALID, "antiquantScale shape (3, 64)",
     dict(antiquant_group_size=32, antiquant_scale=sds((3, N), BF))),
    ("offset_shape", None, dict(offset=T((1, N))), INVALID, "antiquantOffset shape must equal",
     dict(antiquant_offset=sds((1, N), BF))),
    # ---- Atlas A2: contiguous or transposed x2 / scale / offset
    ("x2_strided", None, dict(x2=T((K, N), "int8", strides=(2 * N, 1), storage=(K, 2 * N))), INVALID,
     "x2 must be contiguous or transposed", "structural: x2 is contiguous or (1, k)-strided by the spec"),
    ("scale_strided", None, dict(scale=T((N,), strides=(2,), storage=(2 * N,))), INVALID,
     "antiquantScale must be contiguous or transposed", "structural: scales are dense XLA buffers"),
    # ---- Atlas A2 / 950: per-group scale and offset transposed together with x2
    ("group_scale_not_transposed", None,
     dict(x2=T((K, N), "int8").transposed(), group_size=32, scale=T((2, N))), INVALID,
     "antiquantScale must be transposed with x2",
     "structural: spec.scale_transposed -> column-major operand layout (test_native)"),
    ("group_offset_not_transposed", None,
     dict(x2=T((K, N), "int8").transposed(), group_size=32, scale=T((2, N)).transposed(), offset=T((2, N))),
     INVALID, "antiquantOffset must be transposed with x2",
     "structural: spec.scale_transposed -> column-major operand layout (test_native)"),
    ("group_scale_transposed_without_x2", "Ascend950PR",
     dict(group_size=32, scale=T((2, N)).transposed()), INVALID, "antiquantScale must be contiguous",
     "structural: scales are row-major unless x2 is transposed"),
    # ---- tiling: 561002
    ("world_size_3", None, dict(group="@3"), TILING, "rank size 3 is not supported",
     "structural: the native lowering falls back to the reference outside the product's world sizes"),
    ("comm_turn", None, dict(comm_turn=1), TILING, "commTurn must be 0", dict(comm_turn=1)),
    ("nz_per_group", None,
     dict(x2=T((K, N), "int8", storage=(2, 4, 16, 32), fmt=NZ), group_size=32, scale=T((2, N))),
     TILING, "a FRACTAL_NZ x2 needs a per-channel antiquantScale",
     dict(x2=sds((2, 4, 16, 32), jnp.int8), x2_format="FRACTAL_NZ", antiquant_group_size=32,
          antiquant_scale=sds((2, N), BF))),
    ("nz_storage", None, dict(x2=T((K, N), "int8", storage=(2, 3, 16, 32), fmt=NZ)), TILING,
     "FRACTAL_NZ x2 storage (2, 3, 16, 32) != (2, 4, 16, 32)",
     dict(x2=sds((2, 3, 16, 32), jnp.int8), x2_format="FRACTAL_NZ")),
    ("fp8_per_tensor_950", "Ascend950PR", dict(x2=T((K, N), "float8_e4m3fn"), scale=T((1,))), TILING,
     "needs a per-channel antiquantScale", dict(x2=sds((K, N), jnp.float8_e4m3fn), antiquant_scale=sds((1,), BF))),
    ("hif8_offset_950", "Ascend950PR", dict(x2=T((K, N), "hifloat8"), offset=T((N,))), TILING,
     "takes no antiquantOffset",
     dict(x2=sds((K, N), jnp.uint8), x2_dtype="hifloat8", antiquant_offset=sds((N,), BF))),
    ("fp8_nz_950", "Ascend950PR", dict(x2=T((K, N), "float8_e4m3fn", storage=(2, 4, 16, 32), fmt=NZ)), TILING,
     "a FRACTAL_NZ x2 must be INT8 or INT4",
     dict(x2=sds((2, 4, 16, 32), jnp.float8_e4m3fn), x2_format="FRACTAL_NZ")),
    ("int4_group_alignment_950", "Ascend950PR",
     dict(x2=T((K, 96), "int4"), group_size=32, scale=T((2, 96)), out=T((M, 96))), TILING,
     "per-group n and k must be multiples of 64",
     dict(x2=sds((K, 96), jnp.int4), antiquant_group_size=32, antiquant_scale=sds((2, 96), BF),
          product="ascend950")),
    ("unknown_group", None, dict(group="nope"), TILING, "group 'nope' is not known on device 0",
     "structural: the handler looks the group up per (axis, device) and fails before any CANN call"),
    ("no_kernel_on_a3", "Ascend910_9391", dict(), TILING, "no weight-quant MatmulAllReduce tiling for this SoC",
     "native lowering: ConstraintError naming Atlas A3 (test_native)"),
]


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_emulator_rejects_a_bad_direct_call(direct, row):
    d, emu = direct
    name, soc, over, status, fragment, _ = row
    call = base(**over)
    group = call.pop("group", d.group_name)
    if group == "@3":
        group = d.group((0, 1, 2))
    with emu.emulating(soc or "Ascend910B4"):
        st, msg = d.call(group=group, **call)
    assert (st, fragment in msg) == (status, True), (st, msg)
    assert emu.live_tensors() == 0 and emu.live_executors() == 0


@pytest.mark.parametrize("soc", ["Ascend910B4", "Ascend950PR"])
def test_the_base_direct_call_passes(direct, soc):
    d, emu = direct
    with emu.emulating(soc):
        assert d.call(group=d.group_name, **base()) == (0, "")
        # per-group with x2, scale and offset transposed together: the kernel's layout
        tr = dict(x2=T((K, N), "int8").transposed(), group_size=32, scale=T((2, N)).transposed(),
                  offset=T((2, N)).transposed())
        assert d.call(group=d.group_name, **base(**tr)) == (0, "")
        # k = 0: output = bias + x3
        k0 = dict(x1=T((M, 0)), x2=T((0, N), "int8"), bias=T((N,)), x3=T((M, N)))
        assert d.call(group=d.group_name, **base(**k0)) == (0, "")


@pytest.mark.parametrize("row", [r for r in ROWS if not isinstance(r[5], str)], ids=lambda r: r[0])
def test_jax_never_sends_it(row):
    name, soc, _, _, _, over = row
    args, opts = jax_base(**over)
    with pytest.raises(wq.ConstraintError):
        wq.make_spec(*args.values(), **opts)


def test_every_row_names_why_jax_never_sends_it():
    for row in ROWS:
        assert isinstance(row[5], dict) or row[5].startswith(("structural:", "native lowering:")), row[0]


@pytest.fixture
def one_device():
    """A one-device mesh with an (emulated) HCCL group over its axis "one"."""
    mesh = jax.make_mesh((1,), ("one",), devices=jax.devices()[:1])
    wqt.create_groups(mesh, "one")
    yield mesh
    wqt.destroy_groups()


def _fused_on(mesh, case):
    """jit(shard_map(the fused call over axis "one")) and its arguments."""
    f = jax.jit(jax.shard_map(lambda *a: wq.weight_quant_matmul_all_reduce(*a, axis_name="one", **case.kwargs),
                              mesh=mesh, in_specs=P(), out_specs=P()))
    return f, [jnp.asarray(a) for a in case.args if a is not None]


def test_transposed_per_group_scale_reaches_the_kernel_column_major(direct, one_device):
    """The lowering asks XLA for the scale and offset in column-major layout (the (G, n) view
    over (n, G) storage), and the handler describes them with strides (1, G)."""
    import oracle

    case = make_case(np.random.default_rng(7), weight_dtype="int8", granularity="per_group",
                     group_size=32, offset=True, transpose=True, k=64, n=48, lead=(3,))
    f, args = _fused_on(one_device, case)
    call = [line for line in f.lower(*args).as_text().splitlines() if f"@{wqt.HOST_TARGET}" in line][0]
    assert "operand_layouts = [dense<[1, 0]>" in call and ", dense<[0, 1]> : tensor<2xindex>, dense<[0, 1]>" in call, call
    expected, mag = oracle.wqmm([case.oracle], 32, "int8")
    oracle.assert_close(f(*args), expected, mag, case.act)


def test_a_product_without_a_kernel_is_a_constraint_error_at_lowering(direct, one_device):
    d, emu = direct
    f, args = _fused_on(one_device, make_case(np.random.default_rng(8), k=64, n=48, lead=(2,)))
    with emu.emulating("Ascend910_9391"):
        with pytest.raises(wq.ConstraintError, match="Atlas A3 has no kernel of aclnnWeightQuantMatmulAllReduce"):
            f.lower(*args)
    with emu.emulating("Ascend950PR"):
        g, bad = _fused_on(one_device, make_case(np.random.default_rng(9), weight_dtype="int4", granularity="per_group",
                                                 group_size=32, k=64, n=48, lead=(2,)))
        with pytest.raises(wq.ConstraintError, match="n=48: per-group int4 weights need n and k multiples of 64 on Ascend 950"):
            g.lower(*bad)
    assert native.npu_product("cpu") == "atlas_a2"  # the emulator's default SoC, Ascend910B4


def test_a_group_resolves_only_on_its_devices_current_thread(direct):
    """HCCL looks the group name up in the table of the calling thread's current device."""
    d, emu = direct
    try:
        d.set_device(5)
        st, msg = d.call(group=d.group_name, **base())
        assert st == TILING and f"group '{d.group_name}' is not known on device 5" in msg
    finally:
        d.set_device(0)
    assert d.call(group=d.group_name, **base()) == (0, "")


def test_root_info_needs_a_current_device(direct):
    import ctypes
    import threading

    d, _ = direct
    out = {}

    def fresh_thread():  # no aclrtSetDevice on this thread yet
        info = ctypes.create_string_buffer(4108)
        out["without"] = d.lib.HcclGetRootInfo(info)
        out["message"] = (d.lib.aclGetRecentErrMsg() or b"").decode()
        d.set_device(3)
        out["with"] = d.lib.HcclGetRootInfo(info)

    t = threading.Thread(target=fresh_thread)
    t.start()
    t.join()
    assert out["without"] != 0 and "no current device" in out["message"]
    assert out["with"] == 0


def test_unknown_device_kind_warns_and_uses_the_a2_rules(direct, recwarn):
    d, emu = direct
    native._warned.clear()
    with emu.emulating("MysteryChip"):
        with pytest.warns(RuntimeWarning, match=r"no known Ascend product in the device kind / SoC name \['cpu', 'MysteryChip'\]; checking calls against the Atlas A2 rules"):
            assert native.npu_product("cpu") == "atlas_a2"
    with wq.target_product("ascend950"):  # the setting wins over the device
        assert native.npu_product("cpu") == "ascend950"
