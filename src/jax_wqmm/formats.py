"""Weight encodings the operator reads: FRACTAL_NZ tiling, torch_npu's int4-in-int32 packing,
and HiFloat8.

Every function takes NumPy or JAX arrays; the NZ and HiFloat8 functions are traceable
(they run under ``jax.jit``), the int32 packing functions are NumPy (checkpoint loading).
"""

from __future__ import annotations

import functools

import ml_dtypes
import numpy as np
import jax.numpy as jnp

from .spec import nz_c0

__all__ = [
    "to_fractal_nz",
    "from_fractal_nz",
    "pack_int4_to_int32",
    "unpack_int32_to_int4",
    "hifloat8_decode_table",
    "hifloat8_to_float32",
    "float_to_hifloat8",
    "HIFLOAT8_MAX",
]


def _xp(x):
    return np if isinstance(x, np.ndarray) else jnp


def _dtype_key(x) -> str:
    return np.dtype(x.dtype).name


# ---------------------------------------------------------------------------------------------
# FRACTAL_NZ: ND (r, c) -> (ceil(c/C0), ceil(r/16), 16, C0);
# nz[c1][r1][r0][c0] = nd[r1*16 + r0][c1*C0 + c0], zero padded (torch_npu FormatHelper.cpp).


def to_fractal_nz(x, c0: int | None = None):
    """Tiles a 2-D (rows, cols) matrix into 4-D FRACTAL_NZ storage.

    Returns shape (ceil(cols/C0), ceil(rows/16), 16, C0), zero padded; C0 is 32 bytes of
    elements (int8: 32, int4: 64, 16-bit: 16) unless given.
    """
    xp = _xp(x)
    if x.ndim != 2:
        raise ValueError(f"x: shape {tuple(x.shape)}: to_fractal_nz takes a 2-D matrix")
    c0 = c0 or nz_c0(_dtype_key(x))
    rows, cols = x.shape
    r1, c1 = -(-rows // 16), -(-cols // c0)
    x = xp.pad(x, ((0, r1 * 16 - rows), (0, c1 * c0 - cols)))
    return xp.transpose(x.reshape(r1, 16, c1, c0), (2, 0, 1, 3))


def from_fractal_nz(x, shape: tuple[int, int]):
    """Untiles 4-D FRACTAL_NZ storage back to the 2-D (rows, cols) matrix ``shape``."""
    xp = _xp(x)
    if x.ndim != 4:
        raise ValueError(f"x: shape {tuple(x.shape)}: from_fractal_nz takes 4-D NZ storage")
    c1, r1, r0, c0 = x.shape
    rows, cols = shape
    if r0 != 16 or -(-rows // 16) != r1 or -(-cols // c0) != c1:
        raise ValueError(f"x: shape {tuple(x.shape)}: not the FRACTAL_NZ storage of a {shape} matrix")
    nd = xp.transpose(x, (1, 2, 0, 3)).reshape(r1 * 16, c1 * c0)
    return nd[:rows, :cols]


# ---------------------------------------------------------------------------------------------
# torch_npu npu_convert_weight_to_int4pack: 8 int4 along the last dim in one int32,
# element j in bits 4j..4j+3.


def pack_int4_to_int32(q) -> np.ndarray:
    """Packs int4 values (int4 or any integer dtype holding values in [-8, 7]) into torch_npu's
    int32 layout: (..., c) -> (..., c // 8), element j of each 8 in bits 4j..4j+3."""
    q = np.asarray(q)
    if q.shape[-1] % 8:
        raise ValueError(f"q: shape {q.shape}: the last dim must be a multiple of 8 to pack into int32")
    v = q.astype(np.int64)
    if v.min(initial=0) < -8 or v.max(initial=0) > 7:
        raise ValueError("q: values must lie in the int4 range [-8, 7]")
    nib = (v & 0xF).astype(np.uint32).reshape(*q.shape[:-1], q.shape[-1] // 8, 8)
    shifts = (np.arange(8, dtype=np.uint32) * 4)
    packed = np.bitwise_or.reduce(nib << shifts, axis=-1).astype(np.uint32)
    return packed.view(np.int32)


def unpack_int32_to_int4(p) -> np.ndarray:
    """Unpacks torch_npu's int4-in-int32 layout: int32 (..., c) -> int4 (..., 8 c)."""
    p = np.asarray(p)
    if p.dtype != np.int32:
        raise ValueError(f"p: dtype {p.dtype}: must be int32")
    u = p.view(np.uint32)[..., None] >> (np.arange(8, dtype=np.uint32) * 4)
    nib = (u & 0xF).astype(np.int8)
    vals = np.where(nib >= 8, nib - 16, nib).astype(np.int8)
    return vals.reshape(*p.shape[:-1], p.shape[-1] * 8).astype(ml_dtypes.int4)


# ---------------------------------------------------------------------------------------------
# HiFloat8 (arXiv 2409.16626): sign, a prefix "dot" field choosing the exponent width D and
# the mantissa width; exponent sign-magnitude with an implicit leading 1.

#: The largest finite HiFloat8 value (code 0x6E).
HIFLOAT8_MAX = 32768.0


def _hifloat8_value(code: int) -> float:
    sign = -1.0 if code & 0x80 else 1.0
    r = code & 0x7F
    if r == 0:
        return float("nan") if code & 0x80 else 0.0
    if r == 0x6F:
        return sign * float("inf")
    # (dot prefix bits, its width, exponent width D, mantissa width)
    for prefix, plen, d, w in ((0b11, 2, 4, 1), (0b10, 2, 3, 2), (0b01, 2, 2, 3),
                               (0b001, 3, 1, 3), (0b0001, 4, 0, 3)):
        if r >> (7 - plen) == prefix:
            body = r & ((1 << (7 - plen)) - 1)
            exp_bits, man = body >> w, body & ((1 << w) - 1)
            if d == 0:
                e = 0
            else:
                neg = exp_bits >> (d - 1)
                mag = (1 << (d - 1)) + (exp_bits & ((1 << (d - 1)) - 1))
                e = -mag if neg else mag
            return sign * 2.0**e * (1.0 + man / 2.0**w)
    # prefix 0000: denormal, M = bits 2..0 (M = 0 handled above as zero)
    return sign * 2.0 ** ((r & 0x7) - 23)


@functools.lru_cache(maxsize=None)
def hifloat8_decode_table() -> np.ndarray:
    """float32 (256,): the value of every HiFloat8 code (0x80 NaN, 0x6F / 0xEF infinities)."""
    return np.array([_hifloat8_value(c) for c in range(256)], dtype=np.float32)


@functools.lru_cache(maxsize=None)
def _hifloat8_encode_tables(saturate: bool):
    table = hifloat8_decode_table().astype(np.float64)
    codes = [c for c in range(128) if np.isfinite(table[c])]
    values = [table[c] for c in codes]
    if not saturate:
        # The infinity code sits where e = 15 with mantissa 1 would be (1.5 * 2^15): what
        # rounds past the largest finite value's half ulp (40960) is infinite, as CANN's GE
        # encoder and en-dtypes do.
        codes.append(0x6F)
        values.append(1.5 * HIFLOAT8_MAX)
    order = np.argsort(values)
    values, codes = np.asarray(values)[order], np.asarray(codes, np.uint8)[order]
    # nearest by value; ties go to the larger magnitude (round half away from zero). Every
    # midpoint is exact in float32, so comparing float32 magnitudes against them is exact.
    mids = (values[:-1] + values[1:]) / 2
    return mids.astype(np.float32), codes


def hifloat8_to_float32(x):
    """Decodes HiFloat8 codes stored as uint8 to float32 (same shape)."""
    if _dtype_key(x) != "uint8":
        raise ValueError(f"x: dtype {_dtype_key(x)}: HiFloat8 codes are stored as uint8")
    xp = _xp(x)
    return xp.take(xp.asarray(hifloat8_decode_table()), x.astype(xp.int32))


def float_to_hifloat8(x, *, saturate: bool = False):
    """Encodes float16 / bfloat16 / float32 values as HiFloat8 codes (uint8), as CANN's GE
    encoder does: round to nearest, ties away from zero; |x| >= 40960 and +-inf give the
    infinity codes 0x6F / 0xEF; NaN gives 0x80; -0.0 gives 0x00. ``saturate=True`` maps what
    would be infinite to +-HIFLOAT8_MAX (0x6E / 0xEE) instead. float64 input is rounded to
    float32 first. Traceable."""
    xp = _xp(x)
    mids, codes = _hifloat8_encode_tables(bool(saturate))
    x = x.astype(xp.float32)
    mag = xp.abs(x)
    idx = xp.searchsorted(xp.asarray(mids), mag, side="right")
    code = xp.take(xp.asarray(codes), idx)
    code = xp.where((x < 0) & (code != 0), code | xp.uint8(0x80), code)
    return xp.where(xp.isnan(x), xp.uint8(0x80), code).astype(xp.uint8)
