"""Auto-sharded jit: a call with no ``axis_name`` over sharded global arrays partitions into
per-device fused calls.

Under ``jax.jit`` over arrays placed with ``NamedSharding`` (no ``shard_map``), a call of the
operator without ``axis_name`` is lowered through ``jax.experimental.custom_partitioning``
with a Shardy sharding rule (``x1: ... k``, ``x2: k n``, scale ``n`` / ``g n``, out
``... n``). When the partitioner settles on x1's last dim (k) sharded over mesh axes, every
device runs the operator on its shards **with those axes as its axis_name**: one fused call
with the all-reduce inside (on the NPU, one ``aclnnWeightQuantMatmulAllReduce``), the output
replicated over them. The call keeps its global meaning: bias and x3 are added once (the
first device along k passes them, the others zeros, as ``layers.row_parallel_linear`` does). n and batch dims stay sharded as their inputs say (column-parallel,
data-parallel: no collective at all); the weight is never gathered.

Where a sharding cannot map to the operator (k sharded over a split that breaks a rule of the
operator, e.g. a group size that does not divide the local k, or FRACTAL_NZ storage), k is
gathered instead (the right answer, as XLA would do) and a warning says so once.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.interpreters import mlir
from jax.sharding import NamedSharding, PartitionSpec as P

from .spec import ConstraintError, WqmmSpec, make_spec, pack_operands, unpack_operands

__all__ = ["partitioned", "output_spec"]

_warned: set = set()


def _factors(spec: WqmmSpec) -> list[list[str]]:
    """Shardy factor names of each present operand (operator order), then of the result. "g"
    (per-group scale rows) is split as k is; "p" (size 1) and a FRACTAL_NZ weight's storage
    dims ("z0".."z3") never are."""
    lead = ["m"] if len(spec.x1_shape) == 2 else ["b", "s"]
    if spec.x2_format == "ND":
        x2 = ["n", "k"] if spec.transpose_x2 else ["k", "n"]
    else:
        x2 = ["z0", "z1", "z2", "z3"]
    scale = {"per_tensor": ["p"], "per_channel": ["n"] if len(spec.scale_shape) == 1 else ["p", "n"],
             "per_group": ["g", "n"]}[spec.granularity]
    ops = [lead + ["k"], x2, scale]
    if spec.has_offset:
        ops.append(scale)
    if spec.has_bias:
        ops.append(["n"])
    if spec.has_x3:
        ops.append(lead + ["n"])
    return ops + [lead + ["n"]]


def _axes(entry) -> tuple:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def _entry(axes: tuple):
    return None if not axes else axes[0] if len(axes) == 1 else tuple(axes)


def _dim_spec(sharding, dim: int) -> tuple:
    spec = getattr(sharding, "spec", None)
    if spec is None or dim >= len(spec):
        return ()
    return _axes(spec[dim])


def _factor_axes(spec: WqmmSpec, x1_sharding, x2_sharding) -> dict[str, tuple]:
    """Mesh axes per factor as the inputs are sharded: x1's lead dims and k, x2's n (ND only;
    dropped where x1's dims use the same axes)."""
    x1_factors = _factors(spec)[0]
    axes = {f: _dim_spec(x1_sharding, d) for d, f in enumerate(x1_factors)}
    n_axes = _dim_spec(x2_sharding, 0 if spec.transpose_x2 else 1) if spec.x2_format == "ND" else ()
    if not set(n_axes) & set().union(*axes.values()):
        axes["n"] = n_axes
    axes["g"] = axes["k"]
    return axes


def _shardings(spec: WqmmSpec, axes: dict[str, tuple]) -> list[P]:
    """PartitionSpecs of the present operands and of the result for factor -> mesh axes."""
    return [P(*(_entry(axes.get(f, ())) for f in op)) for op in _factors(spec)]


def _plan(spec: WqmmSpec, mesh, arg_shapes) -> dict[str, tuple]:
    """Factor -> mesh axes for the partitioned call: the inputs' shardings, with k (and g)
    replicated where a split of k does not map to the operator (warned once)."""
    axes = _factor_axes(spec, arg_shapes[0].sharding, arg_shapes[1].sharding)
    k_axes = axes["k"]
    if k_axes:
        size = math.prod(mesh.shape[a] for a in k_axes)
        why = None
        if spec.x2_format != "ND":
            why = "a FRACTAL_NZ weight cannot be split along k here"
        elif spec.k % size:
            why = f"k={spec.k} does not split over {size} devices"
        else:
            try:
                make_spec(*_local_avals(spec, mesh, arg_shapes, axes), **spec.options)
            except ConstraintError as e:
                why = str(e)
        if why:
            key = (spec, k_axes)
            if key not in _warned:
                _warned.add(key)
                warnings.warn(
                    f"jax_wqmm: k sharded over {k_axes} does not map to the fused operator ({why}); "
                    "gathering k instead (the result is the same, without the fused all-reduce).",
                    RuntimeWarning, stacklevel=2)
            axes = dict(axes, k=(), g=())
    return axes


def _local_avals(spec, mesh, arg_shapes, axes):
    """The operands as one device sees them (ShapeDtypeStructs), absent ones None."""
    shapes = []
    for a, p in zip(arg_shapes, _shardings(spec, axes)[:-1]):
        dims = list(a.shape)
        for d, entry in enumerate(p):
            dims[d] //= math.prod(mesh.shape[x] for x in _axes(entry))
        shapes.append(jax.ShapeDtypeStruct(tuple(dims), a.dtype))
    return unpack_operands(spec, shapes)


@functools.cache
def _partitioned_call(spec: WqmmSpec):
    from .primitive import wqmm_p

    @custom_partitioning
    def call(*operands):
        return wqmm_p.bind(*operands, spec=spec)

    def partition(mesh, arg_shapes, result_shape):
        axes = _plan(spec, mesh, arg_shapes)
        k_axes = axes["k"]
        specs = _shardings(spec, axes)

        def lower_fn(*operands):
            x1, x2, scale, offset, bias, x3 = unpack_operands(spec, operands)
            if k_axes and (bias is not None or x3 is not None):
                # The call's global meaning adds bias and x3 once; the operator adds them on
                # every rank before its sum: pass them on the first rank of k's axes only.
                first = lax.axis_index(k_axes) == 0
                bias = None if bias is None else jnp.where(first, bias, jnp.zeros_like(bias))
                x3 = None if x3 is None else jnp.where(first, x3, jnp.zeros_like(x3))
            local = make_spec(x1, x2, scale, offset, bias, x3, **dict(spec.options, axis_name=None))
            local = dataclasses.replace(local, axis_name=k_axes, product=spec.product)
            return wqmm_p.bind(*pack_operands(x1, x2, scale, offset, bias, x3), spec=local)

        return (mesh, lower_fn, NamedSharding(mesh, specs[-1]),
                tuple(NamedSharding(mesh, p) for p in specs[:-1]))

    names = [" ".join(op) for op in _factors(spec)]
    call.def_partition(partition=partition, sharding_rule=", ".join(names[:-1]) + " -> " + names[-1],
                       reduction_factors=("k",))
    return call


def partitioned(rule):
    """A lowering rule: ``rule`` where the module is not auto-sharded over several devices (or
    the call already reduces), else the call through :func:`_partitioned_call`."""
    from jax._src import sharding_impls

    def lowering(ctx, *operands, spec: WqmmSpec):
        axis_context = ctx.module_context.axis_context
        auto = (not spec.axis_name and isinstance(axis_context, sharding_impls.ShardingContext)
                and axis_context.num_devices > 1)
        if not auto:
            return rule(ctx, *operands, spec=spec)
        return mlir.lower_fun(_partitioned_call(spec), multiple_results=False)(ctx, *operands)

    return lowering


def output_spec(spec: WqmmSpec, x1_sharding, x2_sharding):
    """The output's PartitionSpec for sharding-in-types (Explicit mesh axes): x1's lead dims,
    x2's n dim; the reduced k is not in it (the operator's all-reduce replicates it)."""
    return _shardings(spec, _factor_axes(spec, x1_sharding, x2_sharding))[-1]
