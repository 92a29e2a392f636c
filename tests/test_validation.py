"""One test per rule of the operator: ConstraintError names the argument, the value and the rule."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jax_wqmm as wq

BF = jnp.bfloat16
K, N, M = 64, 48, 4


def z(shape, dtype=BF):
    return jnp.zeros(shape, dtype)


def base(**over):
    """A valid call; ``over`` replaces arguments (positional names) or options."""
    args = dict(x1=z((M, K)), x2=z((K, N), jnp.int8), antiquant_scale=z((N,)),
                antiquant_offset=None, bias=None, x3=None)
    opts = {}
    for key, v in over.items():
        (args if key in args else opts)[key] = v
    return (args["x1"], args["x2"], args["antiquant_scale"], args["antiquant_offset"],
            args["bias"], args["x3"]), opts


def rejects(argument: str, rule_fragment: str, **over):
    args, opts = base(**over)
    with pytest.raises(wq.ConstraintError) as info:
        wq.weight_quant_matmul_all_reduce(*args, **opts)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.argument == argument, str(err)
    assert str(err).startswith(f"{argument}="), str(err)
    assert rule_fragment in str(err), str(err)
    return err


def test_valid_base_call_passes():
    args, opts = base()
    assert wq.weight_quant_matmul_all_reduce(*args, **opts).shape == (M, N)


# ----------------------------------------------------------------------------- options

def test_reduce_op_only_sum():
    rejects("reduce_op", "only 'sum' is supported", reduce_op="max")


def test_comm_turn_only_0():
    rejects("comm_turn", "only 0 is supported", comm_turn=2)


def test_stream_mode_only_1():
    rejects("stream_mode", "only 1", stream_mode=0)


def test_x2_format_nd_or_nz():
    rejects("x2_format", "must be 'ND' or 'FRACTAL_NZ'", x2_format="NCHW")


def test_transpose_x2_bool():
    rejects("transpose_x2", "must be a bool", transpose_x2="yes")


@pytest.mark.parametrize("name,fragment", [
    (3, "must be None, a mesh axis name or a non-empty tuple"),
    ((), "must be None, a mesh axis name or a non-empty tuple"),
    (("tp", ""), "non-empty str"),
    (("tp", "tp"), "must not name a mesh axis twice"),
])
def test_axis_name_form(name, fragment):
    rejects("axis_name", fragment, axis_name=name)


def test_axis_name_must_be_bound():
    rejects("axis_name", "is not bound here", axis_name="tp")


def test_x2_dtype_only_hifloat8():
    rejects("x2_dtype", "must be None or 'hifloat8'", x2_dtype="float4_e2m1fn")


# ----------------------------------------------------------------------------- x1

def test_x1_required():
    rejects("x1", "is required", x1=None)


def test_x1_dtype():
    rejects("x1", "must be float16 or bfloat16", x1=z((M, K), jnp.float32))


@pytest.mark.parametrize("shape", [(K,), (1, 2, M, K)])
def test_x1_rank(shape):
    rejects("x1", "must be 2-D (m, k) or 3-D (b, s, k)", x1=z(shape))


def test_m_range():
    rejects("x1", "m (x1 shape (0, 64) without its last dim, multiplied out) must be in [1, 2147483647]",
            x1=z((0, K)))


def test_k_range():
    k = 65536
    rejects("x1", "k (x1 shape (1, 65536), last dim) must be in [0, 65535]",
            x1=z((1, k)), x2=z((k, N), jnp.int8))


# ----------------------------------------------------------------------------- x2

def test_x2_required():
    rejects("x2", "is required", x2=None)


def test_n_range():
    rejects("x2", "n (from x2 shape (64, 65536)) must be in [1, 65535]",
            x2=z((K, 65536), jnp.int8), antiquant_scale=z((1,)))


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.int16, jnp.int32])
def test_x2_dtype(dtype):
    rejects("x2", "must be int8, int4, float8_e4m3fn or uint8", x2=z((K, N), dtype))


def test_float8_e5m2_has_no_kernel():
    rejects("x2", "no current Ascend kernel takes float8_e5m2 weights", x2=z((K, N), jnp.float8_e5m2))


def test_uint8_weight_needs_hifloat8():
    rejects("x2", "pass x2_dtype='hifloat8'", x2=z((K, N), jnp.uint8))


def test_hifloat8_needs_uint8_storage():
    rejects("x2", "needs x2 stored as uint8", x2_dtype="hifloat8")


def test_nd_weight_is_2d():
    rejects("x2", "an ND weight must be 2-D", x2=z((1, K, N), jnp.int8))


def test_k_must_match():
    rejects("x2", "its first dim (k) must equal x1's last dim k=64", x2=z((K + 32, N), jnp.int8))


def test_k_must_match_transposed():
    rejects("x2", "(transpose_x2=True: x2 is (n, k))", x2=z((K, N), jnp.int8), transpose_x2=True)


def test_nz_only_for_integer_weights():
    rejects("x2_format", "only int8 and int4 weights may be FRACTAL_NZ",
            x2=z((2, 4, 16, 32), jnp.float8_e4m3fn), x2_format="FRACTAL_NZ")


def test_nz_is_4d():
    rejects("x2", "a FRACTAL_NZ weight must be 4-D", x2_format="FRACTAL_NZ")


def test_nz_block_shape():
    rejects("x2", "last two dims of a FRACTAL_NZ int4 weight must be (16, 64)",
            x2=z((2, 4, 16, 32), jnp.int4), x2_format="FRACTAL_NZ")


def test_nz_block_counts():
    # (k=64, n=48) int8 -> (ceil(48/32), ceil(64/16), 16, 32) = (2, 4, 16, 32)
    rejects("x2", "FRACTAL_NZ storage of a (64, 48) matrix must have shape (2, 4, 16, 32)",
            x2=z((2, 3, 16, 32), jnp.int8), x2_format="FRACTAL_NZ")


def test_nz_valid_passes():
    args, opts = base(x2=z((2, 4, 16, 32), jnp.int8), x2_format="FRACTAL_NZ")
    assert wq.weight_quant_matmul_all_reduce(*args, **opts).shape == (M, N)


# ----------------------------------------------------------------------------- group size

@pytest.mark.parametrize("g", [48, 16, 64, 96, -32])
def test_group_size_rule(g):
    err = rejects("antiquant_group_size", "must be 0 or a multiple of 32 in [32, k-1] with k=64",
                  antiquant_group_size=g, antiquant_scale=z((2, N)))
    assert err.value == g


def test_group_size_int():
    rejects("antiquant_group_size", "must be an int", antiquant_group_size=32.0)


# ----------------------------------------------------------------------------- scale / offset

def test_scale_required():
    rejects("antiquant_scale", "is required", antiquant_scale=None)


def test_scale_dtype():
    rejects("antiquant_scale", "must have x1's dtype bfloat16", antiquant_scale=z((N,), jnp.float16))


@pytest.mark.parametrize("shape", [(N + 1,), (2, N), (N, 1), ()])
def test_scale_shape(shape):
    rejects("antiquant_scale", "must be (1,) per-tensor, (48,) or (1, 48) per-channel", antiquant_scale=z(shape))


def test_per_group_scale_shape():
    rejects("antiquant_scale", "per-group scale must be (ceil(k/antiquant_group_size), n) = (2, 48)",
            antiquant_group_size=32, antiquant_scale=z((N,)))


@pytest.mark.parametrize("wd", [jnp.float8_e4m3fn])
def test_no_offset_with_fp8(wd):
    rejects("antiquant_offset", f"must be None with {jnp.dtype(wd).name} weights",
            x2=z((K, N), wd), antiquant_offset=z((N,)))


def test_no_offset_with_hifloat8():
    rejects("antiquant_offset", "must be None with hifloat8 weights",
            x2=z((K, N), jnp.uint8), x2_dtype="hifloat8", antiquant_offset=z((N,)))


def test_offset_dtype():
    rejects("antiquant_offset", "must have x1's dtype", antiquant_offset=z((N,), jnp.float32))


def test_offset_shape():
    rejects("antiquant_offset", "must have antiquant_scale's shape (48,)", antiquant_offset=z((1, N)))


# ----------------------------------------------------------------------------- bias / x3

def test_bias_shape():
    rejects("bias", "must be 1-D (48,)", bias=z((1, N)))


def test_bias_dtype():
    rejects("bias", "must be bfloat16", bias=z((N,), jnp.float32))


def test_bias_float32_rejected_with_fp8_too():
    """An older doc allowed a float32 bias with FP8 weights and bf16 x1; no current kernel does."""
    rejects("bias", "must be bfloat16, x1's dtype", x2=z((K, N), jnp.float8_e4m3fn), bias=z((N,), jnp.float32))


def test_x3_shape():
    rejects("x3", "must have the output's shape (4, 48)", x3=z((M, N + 1)))


def test_x3_dtype():
    rejects("x3", "must be bfloat16", x3=z((M, N), jnp.float32))


# ----------------------------------------------------------------------------- where rules apply

def test_rules_apply_at_trace_time_under_jit():
    args, opts = base(antiquant_group_size=48, antiquant_scale=z((2, N)))
    f = jax.jit(lambda *a: wq.weight_quant_matmul_all_reduce(*a, **opts))
    with pytest.raises(wq.ConstraintError, match="antiquant_group_size=48"):
        f.trace(*args)


def test_rules_apply_to_local_shapes_inside_shard_map():
    """Inside shard_map the operator sees per-device shapes: k=64 split 4 ways is 16, and a
    group size of 32 is then out of range, as it would be on the NPU."""
    mesh = Mesh(np.array(jax.devices()[:4]), ("tp",))
    args, _ = base(antiquant_scale=z((2, N)))
    f = jax.shard_map(lambda x1, x2, s: wq.weight_quant_matmul_all_reduce(
        x1, x2, s, axis_name="tp", antiquant_group_size=32),
        mesh=mesh, in_specs=(P(None, "tp"), P("tp"), P()), out_specs=P())
    with pytest.raises(wq.ConstraintError, match=r"k-1\] with k=16"):
        jax.jit(f).trace(*args[:2], z((1, N)))


def test_axis_size_outside_1_2_4_8_is_not_an_error_on_the_reference_path():
    mesh = Mesh(np.array(jax.devices()[:3]), ("tp",))
    x1 = jnp.ones((2, 3 * 32), BF)
    x2 = jnp.ones((3 * 32, 8), jnp.int8)
    s = jnp.full((8,), 0.5, BF)
    put = lambda a, sp: jax.device_put(a, NamedSharding(mesh, sp))
    f = jax.jit(jax.shard_map(lambda a, b, c: wq.weight_quant_matmul_all_reduce(a, b, c, axis_name="tp"),
                              mesh=mesh, in_specs=(P(None, "tp"), P("tp"), P()), out_specs=P()))
    y = f(put(x1, P(None, "tp")), put(x2, P("tp")), put(s, P()))
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.full((2, 8), 48.0))


# ----------------------------------------------------------------------------- k = 0

def test_k_zero_is_bias_plus_x3():
    """The only empty case the kernel takes: k = 0, output = bias + x3 (summed over ranks)."""
    b = jnp.arange(N, dtype=BF)
    x3 = jnp.ones((M, N), BF)
    args, opts = base(x1=z((M, 0)), x2=z((0, N), jnp.int8), bias=b, x3=x3)
    y = wq.weight_quant_matmul_all_reduce(*args, **opts)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(b + x3, np.float32))


def test_k_zero_takes_no_group_size():
    rejects("antiquant_group_size", "with k=0", x1=z((M, 0)), x2=z((0, N), jnp.int8),
            antiquant_group_size=32, antiquant_scale=z((0, N)))


def test_k_zero_needs_nd():
    rejects("x2_format", "k=0", x1=z((M, 0)), x2=z((2, 0, 16, 32), jnp.int8), x2_format="FRACTAL_NZ")


# ----------------------------------------------------------------------------- products

def test_every_rule_that_no_product_takes_is_rejected_without_a_product():
    # FP8 / HiFloat8: per-channel only (Ascend 950); FRACTAL_NZ: per-channel only (both)
    rejects("antiquant_scale", "per_tensor scale with float8_e4m3fn weights is not taken on any product",
            x2=z((K, N), jnp.float8_e4m3fn), antiquant_scale=z((1,)))
    rejects("antiquant_scale", "per_group scale with hifloat8 weights",
            x2=z((K, N), jnp.uint8), x2_dtype="hifloat8", antiquant_group_size=32, antiquant_scale=z((2, N)))
    rejects("x2_format", "a FRACTAL_NZ weight with a per_tensor scale is not taken on any product",
            x2=z((2, 4, 16, 32), jnp.int8), x2_format="FRACTAL_NZ", antiquant_scale=z((1,)), bias=z((N,)))


def test_atlas_a2_rejects_fp8_and_hifloat8():
    with wq.target_product("atlas_a2"):
        err = rejects("x2", "not taken on Atlas A2: its kernel takes int8, int4 weights", x2=z((K, N), jnp.float8_e4m3fn))
    assert err.value == "dtype float8_e4m3fn"
    # ... which the union (no product chosen) accepts
    args, opts = base(x2=z((K, N), jnp.float8_e4m3fn))
    assert wq.weight_quant_matmul_all_reduce(*args, **opts).shape == (M, N)


def test_ascend950_is_nd_only_and_aligns_per_group_n_and_k():
    with wq.target_product("ascend950"):
        rejects("x2_format", "int8 weights must be ND on Ascend 950PR/950DT",
                x2=z((2, 4, 16, 32), jnp.int8), x2_format="FRACTAL_NZ")
        # int4 per-group: n and k multiples of 64 (n = 48 is not)
        rejects("x2", "n=48: per-group int4 weights need n and k multiples of 64 on Ascend 950PR/950DT",
                x2=z((K, N), jnp.int4), antiquant_group_size=32, antiquant_scale=z((2, N)))
        args, opts = base(x2=z((K, 64), jnp.int8), antiquant_group_size=32, antiquant_scale=z((2, 64)))
        assert wq.weight_quant_matmul_all_reduce(*args, **opts).shape == (M, 64)  # 32-aligned


def test_target_product_is_part_of_the_jit_key():
    """A function traced under no product is traced again under one (its cache is keyed on it)."""
    args, opts = base(x2=z((K, N), jnp.float8_e4m3fn))
    f = jax.jit(lambda *a: wq.weight_quant_matmul_all_reduce(*a, **opts))
    f(*args)
    with wq.target_product("atlas_a2"):
        with pytest.raises(wq.ConstraintError, match="not taken on Atlas A2"):
            f(*args)
    assert wq.current_target_product() is None
    f(*args)


def test_target_product_names_a_known_product():
    with pytest.raises(wq.ConstraintError, match=r"product='atlas_a3': must be one of \['ascend950', 'atlas_a2'\]"):
        wq.target_product("atlas_a3")
