"""Random operator cases: the arguments for jax_wqmm and the matching oracle input."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from oracle import C0, HIF8, nd_to_nz

ACT = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
# HiFloat8 codes with finite magnitudes in [2^-8, 16] (keeps fp16 outputs far from overflow).
HIF8_CODES = np.array([c for c in range(256)
                       if np.isfinite(HIF8[c]) and (HIF8[c] == 0 or 2.0**-8 <= abs(HIF8[c]) <= 16)],
                      dtype=np.uint8)


def random_codes(rng, weight_dtype: str, k: int, n: int) -> np.ndarray:
    """Logical (k, n) weight codes in the weight's storage dtype."""
    if weight_dtype == "int8":
        return rng.integers(-128, 128, (k, n)).astype(np.int8)
    if weight_dtype == "int4":
        return rng.integers(-8, 8, (k, n)).astype(np.int8).astype(ml_dtypes.int4)
    if weight_dtype == "hifloat8":
        return rng.choice(HIF8_CODES, (k, n))
    return (rng.standard_normal((k, n)) * 2).astype(getattr(ml_dtypes, weight_dtype))


def store(codes: np.ndarray, weight_dtype: str, transpose: bool, fmt: str) -> np.ndarray:
    mat = codes.T if transpose else codes
    if fmt == "FRACTAL_NZ":
        mat = nd_to_nz(mat.astype(np.int8), C0[weight_dtype]).astype(codes.dtype)
    return np.ascontiguousarray(mat)


@dataclasses.dataclass
class Case:
    args: tuple          # positional: x1, x2, scale, offset, bias, x3 (None where absent)
    kwargs: dict         # keyword options
    oracle: dict         # one rank for oracle.wqmm
    act: str
    group_size: int
    weight_dtype: str


def make_case(rng, *, weight_dtype="int8", granularity="per_channel", offset=False, bias=False,
              x3=False, lead=(8,), k=96, n=40, transpose=False, fmt="ND", act="bfloat16",
              group_size=64, scale_2d=False) -> Case:
    dt = ACT[act]
    if fmt == "FRACTAL_NZ" and granularity == "per_tensor" and not (bias or x3):
        # Nothing states n: it is the padded NZ extent (see spec.make_spec); use a full block.
        n = -(-n // C0[weight_dtype]) * C0[weight_dtype] if not transpose else -(-n // 16) * 16
    codes = random_codes(rng, weight_dtype, k, n)
    x1 = rng.standard_normal((*lead, k)).astype(dt)
    g = group_size if granularity == "per_group" else 0
    shape = {"per_tensor": (1,), "per_channel": (1, n) if scale_2d else (n,),
             "per_group": (-(-k // group_size), n)}[granularity]
    scale = rng.uniform(0.005, 0.03, shape).astype(dt)
    off = rng.uniform(-64, 64, shape).astype(dt) if offset else None
    b = rng.standard_normal((n,)).astype(dt) if bias else None
    x3a = rng.standard_normal((*lead, n)).astype(dt) if x3 else None
    x2 = store(codes, weight_dtype, transpose, fmt)
    kwargs = dict(antiquant_group_size=g, transpose_x2=transpose, x2_format=fmt)
    if weight_dtype == "hifloat8":
        kwargs["x2_dtype"] = "hifloat8"
    oracle = dict(x1=x1, codes=codes, scale=scale, offset=off, bias=b, x3=x3a)
    return Case((x1, x2, scale, off, b, x3a), kwargs, oracle, act, g, weight_dtype)


def to_jax(args):
    return tuple(None if a is None else jnp.asarray(a) for a in args)
