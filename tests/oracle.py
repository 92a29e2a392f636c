"""A float64 NumPy oracle, written independently of jax_wqmm (no package code is imported).

It implements the operator's formula from its documentation:
    out = sum over ranks r of (x1_r @ ((x2_r + offset_r) * scale_r) + bias_r + x3_r)
and the weight encodings from ascend-facts.md (FRACTAL_NZ index formula, HiFloat8 bit fields).
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np

C0 = {"int8": 32, "int4": 64}


def hifloat8_value(code: int) -> float:
    """HiFloat8 decoding straight from the bit-field description (arXiv 2409.16626)."""
    s = -1.0 if code >> 7 else 1.0
    bits = [(code >> i) & 1 for i in range(6, -1, -1)]  # bits 6..0
    if code == 0x00:
        return 0.0
    if code == 0x80:
        return math.nan
    if code & 0x7F == 0x6F:
        return s * math.inf
    if bits[0:2] == [1, 1]:
        d, w, rest = 4, 1, bits[2:]
    elif bits[0:2] == [1, 0]:
        d, w, rest = 3, 2, bits[2:]
    elif bits[0:2] == [0, 1]:
        d, w, rest = 2, 3, bits[2:]
    elif bits[0:3] == [0, 0, 1]:
        d, w, rest = 1, 3, bits[3:]
    elif bits[0:4] == [0, 0, 0, 1]:
        d, w, rest = 0, 3, bits[4:]
    else:  # 0000: denormal
        mm = bits[4] * 4 + bits[5] * 2 + bits[6]
        return s * 2.0 ** (mm - 23)
    exp_bits, man_bits = rest[:d], rest[d:]
    assert len(man_bits) == w
    if d == 0:
        e = 0
    else:
        low = 0
        for b in exp_bits[1:]:
            low = low * 2 + b
        e = (2 ** (d - 1) + low) * (-1 if exp_bits[0] else 1)
    man = 0
    for b in man_bits:
        man = man * 2 + b
    return s * 2.0**e * (1 + man / 2**w)


HIF8 = np.array([hifloat8_value(c) for c in range(256)])


def nd_to_nz(mat: np.ndarray, c0: int) -> np.ndarray:
    """nz[c1][r1][r0][c0] = nd[r1*16 + r0][c1*C0 + c0], zero padded."""
    rows, cols = mat.shape
    out = np.zeros((-(-cols // c0), -(-rows // 16), 16, c0), dtype=mat.dtype)
    for i in range(rows):
        for j in range(cols):
            out[j // c0, i // 16, i % 16, j % c0] = mat[i, j]
    return out


def decode(codes: np.ndarray, weight_dtype: str) -> np.ndarray:
    if weight_dtype == "hifloat8":
        return HIF8[np.asarray(codes).astype(np.int64)]
    return np.asarray(codes).astype(np.float64)


def expand(p: np.ndarray, k: int, n: int, group_size: int) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    if group_size:
        return np.repeat(p, group_size, axis=0)[:k]
    return np.broadcast_to(p.reshape(1, -1), (k, n)) if p.size > 1 else np.full((k, n), p.item())


def weight(codes, scale, offset, k, n, group_size, weight_dtype) -> np.ndarray:
    """(k, n) float64 (codes + offset) * scale from logical (k, n) codes."""
    w = decode(codes, weight_dtype)
    if offset is not None:
        w = w + expand(offset, k, n, group_size)
    return w * expand(scale, k, n, group_size)


def f64(x) -> np.ndarray:
    return np.asarray(x).astype(np.float64)


def wqmm(ranks, group_size=0, weight_dtype="int8"):
    """Sum over ranks of x1 @ W + bias + x3, and the same sum of magnitudes (for tolerances).

    ``ranks``: list of dicts with x1, codes (logical (k, n)), scale, offset, bias, x3 (None ok).
    """
    out = mag = 0.0
    for r in ranks:
        x1 = f64(r["x1"])
        k = x1.shape[-1]
        n = np.asarray(r["codes"]).shape[1]
        off = None if r.get("offset") is None else f64(r["offset"])
        w = weight(r["codes"], f64(r["scale"]), off, k, n, group_size, weight_dtype)
        y, a = x1 @ w, np.abs(x1) @ np.abs(w)
        for extra in ("bias", "x3"):
            if r.get(extra) is not None:
                y = y + f64(r[extra])
                a = a + np.abs(f64(r[extra]))
        out, mag = out + y, mag + a
    return out, mag


UNIT_ROUNDOFF = {"bfloat16": 2.0**-8, "float16": 2.0**-11, "float32": 2.0**-24}


def assert_close(actual, expected, mag, dtype: str, ranks: int = 1):
    """|actual - expected| <= (3 + ranks) * u(dtype) * mag elementwise.

    Error model: the weight is dequantized in ``dtype`` (two roundings: + offset, * scale), the
    local result is rounded once to ``dtype``, and the sum over ranks rounds once per addition;
    each rounding costs at most u times the magnitude sum ``mag`` (sum of |terms|).
    """
    actual = f64(actual)
    tol = (3 + ranks) * UNIT_ROUNDOFF[dtype] * mag + 1e-30
    err = np.abs(actual - expected)
    bad = ~(err <= tol)  # NaN is outside every tolerance
    if bad.any():
        i = np.unravel_index(np.argmax(np.where(np.isnan(err), np.inf, err - tol)), err.shape)
        raise AssertionError(
            f"{bad.sum()} of {bad.size} elements outside tolerance; worst at {i}: "
            f"actual {actual[i]}, expected {expected[i]}, tol {tol[i]}")


def reduce_expanded(g: np.ndarray, shape: tuple, group_size: int) -> np.ndarray:
    """The adjoint of ``expand``: (k, n) -> the scale / offset shape."""
    k, n = g.shape
    if group_size:
        groups = -(-k // group_size)
        padded = np.zeros((groups * group_size, n))
        padded[:k] = g
        return padded.reshape(groups, group_size, n).sum(axis=1)
    if math.prod(shape) == 1:
        return g.sum().reshape(shape)
    return g.sum(axis=0).reshape(shape)


def wqmm_grads(rank: dict, cot: np.ndarray, group_size=0, weight_dtype="int8", abs_=False):
    """Gradients of sum(cot * y) for one rank's operands (y as in ``wqmm``; the all-reduce
    hands every rank the same cotangent). With ``abs_``, the same sums over magnitudes."""
    f = np.abs if abs_ else (lambda a: a)
    x1 = f(f64(rank["x1"]))
    k = x1.shape[-1]
    codes = rank["codes"]
    n = np.asarray(codes).shape[1]
    cot = f(f64(cot))
    scale = f64(rank["scale"])
    off = None if rank.get("offset") is None else f64(rank["offset"])
    q = decode(codes, weight_dtype)
    qo = q if off is None else q + expand(off, k, n, group_size)
    s_e = expand(scale, k, n, group_size)
    w = f(qo * s_e)
    x1m, cotm = x1.reshape(-1, k), cot.reshape(-1, n)
    dw = x1m.T @ cotm
    out = {
        "x1": (cotm @ w.T).reshape(x1.shape),
        "scale": reduce_expanded(dw * f(qo), scale.shape, group_size),
        "bias": cotm.sum(axis=0),
        "x3": cot,
    }
    if off is not None:
        out["offset"] = reduce_expanded(dw * f(s_e), off.shape, group_size)
    return out


# ------------------------------------------------------------------ the kernel's rounding
# The Atlas A2 kernel (cann ops-nn weight_quant_batch_matmul_v2 custom kernels, as used by the
# MC2 op; ops-transformer matmul_all_reduce_add_x3.h), written with NumPy's own float16 and
# ml_dtypes' bfloat16 conversions (round to nearest even).

ACT_NP = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def kernel_dequantize(values: np.ndarray, scale: np.ndarray, offset, act: str) -> np.ndarray:
    """(k, n) weight in ``act`` from exact code values and (k, n)-expanded scale / offset:
    float16: f16(f16(q + o) * s); bfloat16: bf16((q + o) * s) in float32."""
    q = np.asarray(values, np.float32)
    s = np.asarray(scale).astype(np.float32)
    o = np.float32(0) if offset is None else np.asarray(offset).astype(np.float32)
    if act == "float16":
        return ((q + o).astype(np.float16).astype(np.float32) * s).astype(np.float16)
    return ((q + o) * s).astype(ml_dtypes.bfloat16)


def kernel_epilogue(acc: np.ndarray, bias, x3, act: str) -> np.ndarray:
    """out(acc + bias), then out(that + x3): the float32 matmul sum to the output."""
    dt = ACT_NP[act]
    acc = np.asarray(acc, np.float32)
    y = (acc if bias is None else acc + np.asarray(bias).astype(np.float32)).astype(dt)
    if x3 is not None:
        y = (y.astype(np.float32) + np.asarray(x3).astype(np.float32)).astype(dt)
    return y
