"""The operator's math in plain jnp: the oracle for native paths and the portable lowering.

Every function takes a validated :class:`~jax_wqmm.spec.WqmmSpec`; none re-checks a rule.
:func:`weight_quant_matmul_all_reduce_reference` is the same call as the public API, usable on
its own (it validates, then runs :func:`apply` without the primitive).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from . import formats
from .spec import WqmmSpec, make_spec

__all__ = [
    "weight_matrix",
    "expand_quant_param",
    "dequantize",
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
    return jnp.repeat(p, spec.group_size, axis=0, total_repeat_length=spec.num_groups * spec.group_size)[: spec.k]


def dequantize(x2, scale, offset, spec: WqmmSpec, dtype=None) -> jax.Array:
    """(k, n) weight ``(x2 + offset) * scale``, computed in ``dtype`` (default: x1's dtype,
    as the operator does)."""
    dtype = jnp.dtype(dtype or spec.act_dtype)
    w = weight_matrix(x2, spec).astype(dtype)
    if offset is not None:
        w = w + expand_quant_param(offset, spec).astype(dtype)
    return w * expand_quant_param(scale, spec).astype(dtype)


def matmul_f32(x: jax.Array, w: jax.Array) -> jax.Array:
    """x (..., k) @ w (k, n) with float32 accumulation."""
    return lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())),
                           preferred_element_type=jnp.float32)


def add_bias_x3(acc: jax.Array, bias, x3, spec: WqmmSpec) -> jax.Array:
    """``acc + bias + x3`` (float32, either may be None) in the output dtype."""
    if bias is not None:
        acc = acc + bias.astype(jnp.float32)
    if x3 is not None:
        acc = acc + x3.astype(jnp.float32)
    return acc.astype(spec.out_dtype)


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
