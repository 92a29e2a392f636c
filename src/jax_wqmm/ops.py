"""The public calls: :func:`weight_quant_matmul_all_reduce` and :func:`quant_matmul`."""

from __future__ import annotations

from typing import Literal, Sequence

import jax
import jax.numpy as jnp

from . import primitive
from .quantize import QuantizedWeight
from .spec import ConstraintError, make_spec, pack_operands

__all__ = ["weight_quant_matmul_all_reduce", "quant_matmul"]

ArrayLike = jax.typing.ArrayLike


def weight_quant_matmul_all_reduce(
    x1: ArrayLike,
    x2: ArrayLike,
    antiquant_scale: ArrayLike,
    antiquant_offset: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    x3: ArrayLike | None = None,
    *,
    axis_name: str | Sequence[str] | None = None,
    antiquant_group_size: int = 0,
    transpose_x2: bool = False,
    x2_format: Literal["ND", "FRACTAL_NZ"] = "ND",
    x2_dtype: Literal["hifloat8"] | None = None,
    reduce_op: Literal["sum"] = "sum",
    comm_turn: int = 0,
    stream_mode: int = 1,
) -> jax.Array:
    """``allreduce_sum(x1 @ ((x2 + antiquant_offset) * antiquant_scale) + bias + x3)``.

    The fused weight-quantized matmul + all-reduce of ``aclnnWeightQuantMatmulAllReduce``.

    Args:
      x1: activations, (m, k) or (b, s, k), float16 or bfloat16.
      x2: quantized weight: (k, n) ND, or (n, k) with ``transpose_x2``, or 4-D FRACTAL_NZ
        storage of either (int8 / int4 with a per-channel scale); int8, int4, float8_e4m3fn,
        or uint8 HiFloat8 codes with ``x2_dtype="hifloat8"``.
      antiquant_scale: x1's dtype; (1,) per-tensor, (n,) or (1, n) per-channel, or
        (ceil(k / antiquant_group_size), n) per-group; FP8 / HiFloat8: per-channel only.
        Checked against every product's rules, or one's (``wq.target_product``).
      antiquant_offset: optional, scale's shape and dtype; not with FP8 / HiFloat8 weights.
      bias: optional (n,), x1's dtype, added on every rank before the sum.
      x3: optional, the output's shape and x1's dtype, added on every rank before the sum.
        With ``axis_name=None`` under auto-sharded jit, bias and x3 are added once.
      axis_name: mesh axis name(s) to sum over (inside ``jax.shard_map``); None: no sum.
      antiquant_group_size: 0, or the per-group size (a multiple of 32 in [32, k-1]).

    Returns:
      x1.shape[:-1] + (n,), x1's dtype; invariant over ``axis_name`` under shard_map.

    Raises:
      ConstraintError: an argument breaks a rule of the operator (before anything runs).
    """
    arrays = [None if a is None else jnp.asarray(a) for a in (x1, x2, antiquant_scale, antiquant_offset, bias, x3)]
    spec = make_spec(
        *arrays, axis_name=axis_name, antiquant_group_size=antiquant_group_size,
        transpose_x2=transpose_x2, x2_format=x2_format, x2_dtype=x2_dtype,
        reduce_op=reduce_op, comm_turn=comm_turn, stream_mode=stream_mode)
    if spec.axis_name:
        unbound = primitive.unbound_axes(spec.axis_name)
        if unbound:
            raise ConstraintError(
                "axis_name", axis_name,
                f"mesh axis {unbound[0]!r} is not bound here: call inside jax.shard_map over a "
                "mesh with that axis, or pass axis_name=None for no reduction")
    operands = primitive.reconcile_varying(pack_operands(*arrays), spec.axis_name)
    return primitive.wqmm_p.bind(*operands, spec=spec)


def quant_matmul(
    x: ArrayLike,
    qw: QuantizedWeight,
    *,
    bias: ArrayLike | None = None,
    x3: ArrayLike | None = None,
    axis_name: str | Sequence[str] | None = None,
) -> jax.Array:
    """``x @ dequantize_weight(qw) (+ bias + x3)``, summed over ``axis_name``.

    ``x``: (m, k) or (b, s, k), float16 / bfloat16. The weight's scale and offset are cast to
    ``x``'s dtype (the operator wants them in the activation dtype). Returns
    x.shape[:-1] + (n,) in x's dtype. Same rules and errors as
    :func:`weight_quant_matmul_all_reduce`.
    """
    x = jnp.asarray(x)
    if not isinstance(qw, QuantizedWeight):
        raise TypeError(f"qw: {type(qw).__name__}: must be a jax_wqmm.QuantizedWeight")
    scale = qw.scale.astype(x.dtype)
    offset = None if qw.offset is None else qw.offset.astype(x.dtype)
    return weight_quant_matmul_all_reduce(
        x, qw.data, scale, offset, bias, x3, axis_name=axis_name, **qw.call_options)
