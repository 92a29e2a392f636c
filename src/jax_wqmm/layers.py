"""Megatron-style tensor-parallel linear layers over the fused operator (inside shard_map).

- :func:`column_parallel_linear`: x is replicated over the tensor-parallel axis, each rank holds
  a slice of the weight's output columns; no reduction. Output: the rank's columns.
- :func:`row_parallel_linear`: each rank holds a slice of the input features (x's last dim and
  the weight's rows); the partial products are summed over the axis by the fused operator.
  Its bias and residual are added **once**: the operator adds bias and x3 on every rank before
  the sum, so they are passed on the axis' first rank only (zeros elsewhere).

:func:`column_parallel_specs` / :func:`row_parallel_specs` give the ``PartitionSpec`` pytree of
a :class:`~jax_wqmm.QuantizedWeight` for ``shard_map``'s ``in_specs``.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from .ops import quant_matmul
from .primitive import unbound_axes
from .quantize import QuantizedWeight, check_tensor_parallel
from .spec import ConstraintError, normalize_axis_name

__all__ = ["column_parallel_linear", "row_parallel_linear", "column_parallel_specs",
           "row_parallel_specs"]


def column_parallel_linear(x: jax.Array, qw: QuantizedWeight, *, bias: jax.Array | None = None) -> jax.Array:
    """``x @ W[:, cols] + bias[cols]`` for this rank's columns; no communication.

    Args:
      x: (m, k) or (b, s, k), float16 / bfloat16, the same on every rank.
      qw: this rank's (k, n / tp) columns of the weight.
      bias: optional (n / tp,), **this rank's slice** of the (n,) bias (in_specs ``P("tp")``).

    Returns:
      x.shape[:-1] + (n / tp,) in x's dtype.
    """
    return quant_matmul(x, qw, bias=bias)


def row_parallel_linear(
    x: jax.Array,
    qw: QuantizedWeight,
    *,
    axis_name: str | Sequence[str] = "tp",
    bias: jax.Array | None = None,
    residual: jax.Array | None = None,
) -> jax.Array:
    """``sum over ranks of x_r @ W[rows_r, :]`` + bias + residual, with one fused call.

    Args:
      x: (m, k / tp) or (b, s, k / tp), this rank's input features.
      qw: this rank's (k / tp, n) rows of the weight (per-group scales: its groups).
      axis_name: the tensor-parallel mesh axis (or axes) to sum over.
      bias: optional (n,), the same on every rank; added once.
      residual: optional, the output's shape and x's dtype, the same on every rank; added once
        (fused into the operator's x3).

    Returns:
      x.shape[:-1] + (n,) in x's dtype, invariant over ``axis_name``.
    """
    axes = normalize_axis_name(axis_name)
    unbound = unbound_axes(axes)
    if unbound:  # before axis_index, whose NameError would not say what to do
        raise ConstraintError(
            "axis_name", axis_name,
            f"mesh axis {unbound[0]!r} is not bound here: call row_parallel_linear inside "
            "jax.shard_map over a mesh with that axis (or use the auto-sharded form, README)")
    x = jnp.asarray(x)
    for name, t in (("bias", bias), ("residual", residual)):
        if t is not None and jnp.result_type(t) != x.dtype:
            raise ConstraintError(name, f"dtype {jnp.result_type(t)}",
                                  f"must be x's dtype {x.dtype}: cast it with .astype(jnp.{x.dtype})")
    first = lax.axis_index(axes) == 0  # rank 0 over all the axes together
    once = lambda t: None if t is None else jnp.where(first, t, jnp.zeros_like(t))
    try:
        return quant_matmul(x, qw, bias=once(bias), x3=once(residual), axis_name=axes)
    except ConstraintError as e:  # in the layer's words: x3 is the residual, x1 is x
        raise _renamed(e, {"x3": "residual", "x1": "x", "x2": "qw.data",
                           "antiquant_scale": "qw.scale", "antiquant_offset": "qw.offset"}) from None


def _renamed(e: ConstraintError, names: dict) -> ConstraintError:
    rule = e.rule
    for old, new in names.items():
        rule = rule.replace(f"{old}'s", f"{new}'s")
    return ConstraintError(names.get(e.argument, e.argument), e.value, rule)


def _specs(qw: QuantizedWeight, data: P, channel: P, group: P) -> QuantizedWeight:
    per = {"per_tensor": P(), "per_channel": channel, "per_group": group}
    granularity = ("per_group" if qw.group_size else
                   "per_tensor" if qw.scale.size == 1 else "per_channel")
    q = per[granularity]
    return dataclasses.replace(qw, data=data, scale=q, offset=None if qw.offset is None else q)


def column_parallel_specs(qw: QuantizedWeight, axis_name: str = "tp", tp: int | None = None) -> QuantizedWeight:
    """PartitionSpecs that split a ND, untransposed weight's columns (n) over ``axis_name``.
    With ``tp`` (the axis size), checks that the split is possible first."""
    _check_plain(qw)
    if tp is not None:
        check_tensor_parallel(qw.shape, qw.group_size, tp, "columns")
    channel = P(axis_name) if qw.scale.ndim == 1 else P(None, axis_name)
    return _specs(qw, P(None, axis_name), channel, P(None, axis_name))


def row_parallel_specs(qw: QuantizedWeight, axis_name: str = "tp", tp: int | None = None) -> QuantizedWeight:
    """PartitionSpecs that split a ND, untransposed weight's rows (k) over ``axis_name``
    (per-group scales split with their groups: k / tp must be a multiple of the group size).
    With ``tp`` (the axis size), checks that the split is possible first, with the numbers."""
    _check_plain(qw)
    if tp is not None:
        check_tensor_parallel(qw.shape, qw.group_size, tp, "rows")
    return _specs(qw, P(axis_name, None), P(), P(axis_name, None))


def _check_plain(qw: QuantizedWeight) -> None:
    if qw.format != "ND" or qw.transpose:
        raise NotImplementedError(
            "tensor-parallel specs for transposed or FRACTAL_NZ weights: shard the ND weight, "
            "then convert each shard with QuantizedWeight.with_layout inside shard_map")
