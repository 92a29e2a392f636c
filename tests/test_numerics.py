"""The fused call against the float64 oracle over the whole supported matrix."""

import itertools
import zlib

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jax
import jax_wqmm as wq
import oracle
from cases import make_case, to_jax

INT_DTYPES = ("int8", "int4")
FLOAT_DTYPES = ("float8_e4m3fn", "hifloat8")


def _supported(wd, gran, fmt) -> bool:
    """What some product's kernel takes (spec.PRODUCTS): FP8 / HiFloat8 per-channel ND only
    (Ascend 950); FRACTAL_NZ int8 / int4 per-channel only (Atlas A2)."""
    if wd in FLOAT_DTYPES:
        return gran == "per_channel" and fmt == "ND"
    return fmt == "ND" or gran == "per_channel"


def _matrix():
    for wd in INT_DTYPES + FLOAT_DTYPES:
        offsets = (False, True) if wd in INT_DTYPES else (False,)
        for gran, off, extras, lead, tr, fmt, act in itertools.product(
                ("per_tensor", "per_channel", "per_group"), offsets, (False, True),
                ((8,), (2, 3)), (False, True), ("ND", "FRACTAL_NZ"), ("bfloat16", "float16")):
            if not _supported(wd, gran, fmt):
                continue
            yield pytest.param(wd, gran, off, extras, lead, tr, fmt, act,
                               id=f"{wd}-{gran}-{'off' if off else 'sym'}-{'bias_x3' if extras else 'plain'}"
                                  f"-{len(lead) + 1}d-{'T' if tr else 'N'}-{fmt}-{act}")


def _check(case, y):
    expected, mag = oracle.wqmm([case.oracle], case.group_size, case.weight_dtype)
    assert y.dtype == np.dtype(case.act)
    assert y.shape == expected.shape
    oracle.assert_close(y, expected, mag, case.act)


@pytest.mark.parametrize("wd,gran,off,extras,lead,tr,fmt,act", list(_matrix()))
def test_matrix_against_oracle(wd, gran, off, extras, lead, tr, fmt, act):
    # a seed per case that does not change between runs (str hashes are salted per process)
    rng = np.random.default_rng(zlib.crc32(repr((wd, gran, off, extras, lead, tr, fmt, act)).encode()))
    case = make_case(rng, weight_dtype=wd, granularity=gran, offset=off, bias=extras, x3=extras,
                     lead=lead, transpose=tr, fmt=fmt, act=act)
    _check(case, wq.weight_quant_matmul_all_reduce(*to_jax(case.args), **case.kwargs))


@pytest.mark.parametrize("bias,x3", [(True, False), (False, True)])
def test_bias_or_x3_alone(bias, x3):
    case = make_case(np.random.default_rng(1), bias=bias, x3=x3, offset=True)
    _check(case, wq.weight_quant_matmul_all_reduce(*to_jax(case.args), **case.kwargs))


def test_per_channel_scale_as_1_by_n():
    case = make_case(np.random.default_rng(2), scale_2d=True, offset=True)
    _check(case, wq.weight_quant_matmul_all_reduce(*to_jax(case.args), **case.kwargs))


@pytest.mark.parametrize("wd", ["float8_e4m3fn", "hifloat8"])
@pytest.mark.parametrize("which", ["bias", "x3"])
def test_fp8_float32_bias_and_x3_are_rejected(wd, which):
    """An older doc let FP8 / HiFloat8 weights take float32 bias / x3; no current kernel does
    (ops-transformer op_api: bias and x3 must have x1's dtype)."""
    case = make_case(np.random.default_rng(3), weight_dtype=wd, bias=True, x3=True)
    args = list(case.args)
    i = 4 if which == "bias" else 5
    args[i] = args[i].astype(np.float32)
    with pytest.raises(wq.ConstraintError, match=rf"^{which}='dtype float32': must be bfloat16, x1's dtype"):
        wq.weight_quant_matmul_all_reduce(*to_jax(args), **case.kwargs)


def test_jit_equals_eager():
    case = make_case(np.random.default_rng(4), weight_dtype="int4", granularity="per_group",
                     offset=True, bias=True, x3=True)
    args = to_jax(case.args)
    f = jax.jit(lambda *a: wq.weight_quant_matmul_all_reduce(*a, **case.kwargs))
    _check(case, f(*args))


def test_tolerance_detects_a_wrong_result():
    """The dtype-derived tolerance is tight enough to catch a dropped offset or bias."""
    case = make_case(np.random.default_rng(5), offset=True, bias=True)
    expected, mag = oracle.wqmm([case.oracle], 0, "int8")
    without_bias = dict(case.oracle, bias=None)
    wrong, _ = oracle.wqmm([without_bias], 0, "int8")
    with pytest.raises(AssertionError):
        oracle.assert_close(wrong, expected, mag, "bfloat16")
    without_offset = dict(case.oracle, offset=None)
    wrong, _ = oracle.wqmm([without_offset], 0, "int8")
    with pytest.raises(AssertionError):
        oracle.assert_close(wrong, expected, mag, "bfloat16")


@settings(max_examples=25, deadline=None, derandomize=True)  # the same examples every run (CI)
@given(
    m=st.integers(1, 33), k=st.integers(33, 300), n=st.integers(1, 70),
    wd=st.sampled_from(INT_DTYPES + FLOAT_DTYPES), gran=st.sampled_from(["per_tensor", "per_channel", "per_group"]),
    tr=st.booleans(), nz=st.booleans(), act=st.sampled_from(["bfloat16", "float16"]),
    gmul=st.integers(1, 9), seed=st.integers(0, 2**31),
)
def test_random_shapes(m, k, n, wd, gran, tr, nz, act, gmul, seed):
    group = min(32 * gmul, (k - 1) // 32 * 32)
    fmt = "FRACTAL_NZ" if nz else "ND"
    if wd in FLOAT_DTYPES:
        gran = "per_channel"  # FP8 / HiFloat8: per-channel only
    if gran == "per_channel":
        n = max(n, 2)  # with n = 1 a per-channel scale has one element: per-tensor to CANN
    if not _supported(wd, gran, fmt):
        fmt = "ND"
    case = make_case(np.random.default_rng(seed), weight_dtype=wd, granularity=gran,
                     offset=wd in INT_DTYPES, bias=True, x3=True, lead=(m,), k=k, n=n,
                     transpose=tr, fmt=fmt, act=act, group_size=group)
    _check(case, wq.weight_quant_matmul_all_reduce(*to_jax(case.args), **case.kwargs))
