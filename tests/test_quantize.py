"""quantize_weight / dequantize_weight / quant_matmul."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import jax_wqmm as wq
import oracle

K, N = 160, 48


def _w(seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((K, N)).astype(np.float32))


def _expand(p, group):
    return oracle.expand(np.asarray(p, np.float64), K, N, group)


@pytest.mark.parametrize("dtype,qmax", [("int8", 127), ("int4", 7)])
@pytest.mark.parametrize("gran,group", [("per_tensor", None), ("per_channel", None), ("per_group", 64)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_integer_quantization_error_within_half_a_step(dtype, qmax, gran, group, symmetric):
    w = _w()
    qw = wq.quantize_weight(w, dtype=dtype, granularity=gran, group_size=group, symmetric=symmetric)
    assert qw.data.dtype == jnp.dtype(dtype) and qw.shape == (K, N)
    assert (qw.offset is None) == symmetric
    g = qw.group_size
    want_shape = {"per_tensor": (1,), "per_channel": (N,), "per_group": (-(-K // 64), N)}[gran]
    assert qw.scale.shape == want_shape and qw.scale.dtype == jnp.bfloat16
    q = np.asarray(qw.data).astype(np.int64)
    lo, hi = (-qmax - 1, qmax)
    assert q.min() >= lo and q.max() <= hi
    # Against the oracle's own dequantization of the stored codes and parameters:
    w_hat = oracle.weight(np.asarray(qw.data), np.asarray(qw.scale, np.float64),
                          None if qw.offset is None else np.asarray(qw.offset, np.float64), K, N, g, dtype)
    step = _expand(qw.scale, g)
    # half a step of rounding, plus the bf16 rounding of the offset (when asymmetric)
    slack = 0.5 * step + (0 if symmetric else np.abs(_expand(qw.offset, g)) * step * 2**-8)
    assert np.all(np.abs(w_hat - np.asarray(w, np.float64)) <= slack * 1.01 + 1e-6)
    np.testing.assert_allclose(np.asarray(wq.dequantize_weight(qw)), w_hat, rtol=2**-7, atol=1e-6)


def test_asymmetric_uses_the_whole_range():
    w = jnp.asarray(np.random.default_rng(1).uniform(0.5, 2.0, (K, N)).astype(np.float32))
    sym = wq.quantize_weight(w, dtype="int4", symmetric=True)
    asym = wq.quantize_weight(w, dtype="int4", symmetric=False)
    err = lambda qw: float(jnp.abs(wq.dequantize_weight(qw) - w).mean())
    assert err(asym) < 0.6 * err(sym)


@pytest.mark.parametrize("dtype,rel", [("float8_e4m3fn", 2**-3), ("hifloat8", 2**-3)])
def test_float8_quantization_relative_error(dtype, rel):
    w = _w(2)
    qw = wq.quantize_weight(w, dtype=dtype, granularity="per_channel")
    assert qw.offset is None
    w_hat = np.asarray(wq.dequantize_weight(qw), np.float64)
    wn = np.asarray(w, np.float64)
    big = np.abs(wn) > 0.05 * np.abs(wn).max(axis=0)
    assert np.all(np.abs(w_hat - wn)[big] <= rel * np.abs(wn)[big] * 1.01)


def test_hifloat8_storage_is_uint8():
    qw = wq.quantize_weight(_w(), dtype="hifloat8")
    assert qw.data.dtype == jnp.uint8


@pytest.mark.parametrize("kw,match", [
    (dict(dtype="int2"), "dtype='int2'"),
    (dict(granularity="per_row"), "granularity='per_row'"),
    (dict(granularity="per_group"), "group_size=None"),
    (dict(granularity="per_group", group_size=48), "group_size=48: must be 0 or a multiple of 32"),
    (dict(granularity="per_channel", group_size=64), "only for granularity='per_group'"),
    (dict(dtype="float8_e4m3fn", symmetric=False), "take no offset"),
])
def test_quantize_rejects(kw, match):
    with pytest.raises(ValueError, match=match):
        wq.quantize_weight(_w(), **kw)


def test_quantize_rejects_non_2d():
    with pytest.raises(ValueError, match="must be a 2-D"):
        wq.quantize_weight(jnp.ones((2, 3, 4)))


@pytest.mark.parametrize("transpose,fmt", [(False, "FRACTAL_NZ"), (True, "ND"), (True, "FRACTAL_NZ")])
@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_layouts_give_the_same_result(transpose, fmt, dtype):
    # FRACTAL_NZ weights are per-channel only (every product); ND ones take per-group too
    g = 32 if fmt == "ND" else 0
    qw = wq.quantize_weight(_w(3), dtype=dtype, granularity="per_group" if g else "per_channel",
                            group_size=g or None, symmetric=False)
    other = qw.with_layout(transpose=transpose, format=fmt)
    assert other.format == fmt and other.transpose == transpose
    np.testing.assert_array_equal(np.asarray(wq.dequantize_weight(other)), np.asarray(wq.dequantize_weight(qw)))
    x = np.random.default_rng(4).standard_normal((3, K)).astype(jnp.bfloat16)
    rank = dict(x1=x, codes=np.asarray(qw.data), scale=np.asarray(qw.scale), offset=np.asarray(qw.offset))
    expected, mag = oracle.wqmm([rank], g, dtype)
    oracle.assert_close(wq.quant_matmul(jnp.asarray(x), other), expected, mag, "bfloat16")


@pytest.mark.parametrize("kw,match", [
    (dict(dtype="float8_e4m3fn", granularity="per_tensor"), "per_tensor scale with float8_e4m3fn weights"),
    (dict(dtype="hifloat8", granularity="per_group", group_size=32), "per_group scale with hifloat8 weights"),
    (dict(dtype="float8_e5m2"), "dtype='float8_e5m2'"),
])
def test_quantize_applies_the_operator_rules(kw, match):
    with pytest.raises(ValueError, match=match):
        wq.quantize_weight(_w(), **kw)


def test_fractal_nz_layout_is_per_channel_only():
    qw = wq.quantize_weight(_w(), dtype="int4", granularity="per_group", group_size=32)
    with pytest.raises(wq.ConstraintError, match="FRACTAL_NZ weight with a per_group scale is not taken on any product"):
        qw.with_layout(format="FRACTAL_NZ")


def test_quantized_weight_is_a_pytree():
    qw = wq.quantize_weight(_w(), dtype="int4", granularity="per_group", group_size=32, symmetric=False)
    leaves, tree = jax.tree.flatten(qw)
    assert len(leaves) == 3
    again = jax.tree.unflatten(tree, leaves)
    assert again.group_size == 32 and again.dtype == "int4"
    y = jax.jit(lambda x, q: wq.quant_matmul(x, q))(jnp.ones((2, K), jnp.float16), qw)
    assert y.shape == (2, N) and y.dtype == jnp.float16


def test_quant_matmul_against_oracle():
    qw = wq.quantize_weight(_w(5), dtype="int8", granularity="per_channel", symmetric=False)
    x = np.random.default_rng(6).standard_normal((4, K)).astype(np.float16)
    b = np.random.default_rng(7).standard_normal((N,)).astype(np.float16)
    y = wq.quant_matmul(jnp.asarray(x), qw, bias=jnp.asarray(b))
    rank = dict(x1=x, codes=np.asarray(qw.data), scale=np.asarray(qw.scale.astype(jnp.float16)),
                offset=np.asarray(qw.offset.astype(jnp.float16)), bias=b)
    expected, mag = oracle.wqmm([rank], 0, "int8")
    oracle.assert_close(y, expected, mag, "float16")


def test_nbytes_counts_int4_as_half_a_byte():
    qw = wq.quantize_weight(_w(), dtype="int4", granularity="per_channel")
    assert qw.nbytes == K * N // 2 + N * 2
