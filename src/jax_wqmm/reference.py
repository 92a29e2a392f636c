"""The operator's math in plain jnp: the oracle for native paths and the portable lowering.

It rounds as the Atlas A2 kernel does (the numeric contract; ``ffi/numerics.h`` writes the same
rule in C++ for the CPU kernels and the emulator):

- dequantize, float16 x1: ``w = f16(f16(q + offset) * scale)`` (two half roundings);
- dequantize, bfloat16 x1: ``w = bf16((q + offset) * scale)`` in float32 (one rounding);
  q is the code's exact value; FP8 / HiFloat8 weights take no offset;
- matmul: float32 accumulation with the bias, one rounding to the output dtype;
- x3: added after that rounding, then rounded again; the all-reduce sums in the output dtype.

Every rounding is explicit, on the bits of float32 values (round to nearest even, float16
subnormals and overflow included; :func:`round_to`), so no XLA rewrite of float16 / bfloat16
arithmetic (excess precision) can drop one.

Every function takes a validated :class:`~jax_wqmm.spec.WqmmSpec`; none re-checks a rule.
:func:`weight_quant_matmul_all_reduce_reference` is the same call as the public API, usable on
its own (it validates, then runs :func:`apply` without the primitive).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from . import formats
from .spec import WqmmSpec, make_spec

__all__ = [
    "weight_matrix",
    "expand_quant_param",
    "dequantize",
    "round_to",
    "matmul_f32",
    "add_bias_x3",
    "local_matmul",
    "apply",
    "weight_quant_matmul_all_reduce_reference",
]


def weight_matrix(x2: jax.Array, spec: WqmmSpec) -> jax.Array:
    """The logical (k, n) weight in a float dtype exactly holding every code.

    Undoes FRACTAL_NZ tiling and the transposed storage; decodes HiFloat8 codes. int8 / int4 /
    FP8 come back as float32 (exact), HiFloat8 as float32 (exact: at most 4 mantissa bits).
    """
    if spec.x2_format == "FRACTAL_NZ":
        x2 = formats.from_fractal_nz(x2, spec.stored_matrix_shape)
    if spec.transpose_x2:
        x2 = x2.T
    if spec.weight_dtype == "hifloat8":
        return formats.hifloat8_to_float32(x2)
    return x2.astype(jnp.float32)


def expand_quant_param(p: jax.Array, spec: WqmmSpec) -> jax.Array:
    """A scale or offset broadcastable against the (k, n) weight: (1, 1), (1, n) or (k, n)."""
    if spec.granularity == "per_tensor":
        return p.reshape(1, 1)
    if spec.granularity == "per_channel":
        return p.reshape(1, spec.n)
    # (G, n) -> (G, g, n) -> (G * g, n): a broadcast and a merge of dims, which keep a
    # sharding of G (explicit mesh axes) on k, unlike a gather
    g, n = spec.group_size, spec.n
    w = jnp.broadcast_to(p[:, None, :], (spec.num_groups, g, n)).reshape(spec.num_groups * g, n)
    return w if spec.num_groups * g == spec.k else w[: spec.k]


def _u32(x):
    return lax.bitcast_convert_type(x, jnp.uint32)


def _f32(u):
    return lax.bitcast_convert_type(u, jnp.float32)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def round_to(x: jax.Array, dtype) -> jax.Array:
    """float32 ``x`` rounded to ``dtype`` (float16 / bfloat16: nearest even, float16 subnormals,
    overflow to inf, NaN kept), kept in float32; float32 stays as it is. The same bit
    arithmetic as ``RoundF16`` / ``RoundBf16`` in ffi/numerics.h. Differentiates as the
    identity (as a cast does)."""
    name = jnp.dtype(dtype).name
    x = x.astype(jnp.float32)
    u = _u32(x)
    a = u & jnp.uint32(0x7FFFFFFF)
    nan = a > jnp.uint32(0x7F800000)
    if name == "bfloat16":
        r = (u + jnp.uint32(0x7FFF) + ((u >> 16) & jnp.uint32(1))) & jnp.uint32(0xFFFF0000)
        return jnp.where(nan, x, _f32(r))
    if name != "float16":
        return x
    normal = _f32((a + jnp.uint32(0xFFF) + ((a >> 13) & jnp.uint32(1))) & jnp.uint32(0xFFFFE000))
    # below 2^-14 the quantum is 2^-24: scale (exactly), round half to even, scale back
    tiny = lax.round(_f32(a) * 2.0**24, lax.RoundingMethod.TO_NEAREST_EVEN) * 2.0**-24
    r = jnp.where(a < jnp.uint32(0x38800000), tiny, normal)
    r = jnp.where(a >= jnp.uint32(0x477FF000), jnp.float32(jnp.inf), r)
    r = jnp.where(nan, _f32(a), r)
    return _f32(_u32(r) | (u & jnp.uint32(0x80000000)))


@round_to.defjvp
def _round_to_jvp(dtype, primals, tangents):
    (x,), (t,) = primals, tangents
    return round_to(x, dtype), t.astype(jnp.float32)


def dequantize(x2, scale, offset, spec: WqmmSpec, dtype=None) -> jax.Array:
    """(k, n) weight ``(x2 + offset) * scale`` rounded as the kernel does for x1's dtype (module
    docstring), in x1's dtype; ``dtype=jnp.float32``: the exact value, unrounded."""
    q = weight_matrix(x2, spec)  # exact
    if offset is not None:
        q = q + expand_quant_param(offset, spec).astype(jnp.float32)
    s = expand_quant_param(scale, spec).astype(jnp.float32)
    if dtype is not None and jnp.dtype(dtype) == jnp.float32:
        return q * s
    if spec.act_dtype == "float16":
        q = round_to(q, "float16")
    return round_to(q * s, spec.act_dtype).astype(dtype or spec.act_dtype)


def matmul_f32(x: jax.Array, w: jax.Array, out_sharding=None, transposed: bool = False) -> jax.Array:
    """x (..., k) @ w (k, n), or x @ w.T for w (n, k) if ``transposed``, with float32
    accumulation (``out_sharding``: for explicit mesh axes where k is sharded)."""
    kw = {} if out_sharding is None else dict(out_sharding=out_sharding)
    return lax.dot_general(x, w, (((x.ndim - 1,), (1 if transposed else 0,)), ((), ())),
                           preferred_element_type=jnp.float32, **kw)


def add_bias_x3(acc: jax.Array, bias, x3, spec: WqmmSpec) -> jax.Array:
    """The kernel's epilogue on the float32 matmul ``acc``: ``out(acc + bias)``, then
    ``out(that + x3)`` (either may be None), in the output dtype."""
    if bias is not None:
        acc = acc + bias.astype(jnp.float32)
    y = round_to(acc, spec.out_dtype)
    if x3 is not None:
        y = round_to(y + x3.astype(jnp.float32), spec.out_dtype)
    return y.astype(spec.out_dtype)


def local_matmul(x1, x2, scale, offset, bias, x3, spec: WqmmSpec) -> jax.Array:
    """One rank's share: ``x1 @ ((x2 + offset) * scale) + bias + x3`` in the output dtype."""
    return add_bias_x3(matmul_f32(x1, dequantize(x2, scale, offset, spec)), bias, x3, spec)


def all_reduce(y: jax.Array, spec: WqmmSpec) -> jax.Array:
    """The operator's all-reduce: a sum over ``spec.axis_name`` (identity without one)."""
    return lax.psum(y, spec.axis_name) if spec.axis_name else y


def apply(x1, x2, scale, offset, bias, x3, spec: WqmmSpec) -> jax.Array:
    """The whole operator on validated operands: local matmul, then the all-reduce."""
    return all_reduce(local_matmul(x1, x2, scale, offset, bias, x3, spec), spec)


def weight_quant_matmul_all_reduce_reference(
    x1, x2, antiquant_scale, antiquant_offset=None, bias=None, x3=None, **options
) -> jax.Array:
    """The public call, computed in plain jnp (no primitive): validate, then :func:`apply`."""
    spec = make_spec(x1, x2, antiquant_scale, antiquant_offset, bias, x3, **options)
    return apply(x1, x2, antiquant_scale, antiquant_offset, bias, x3, spec)
