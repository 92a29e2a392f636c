"""The ``weight_quant_matmul_all_reduce`` primitive and its rules.

Operands, in operator order, only those present: x1, x2, antiquant_scale, [antiquant_offset],
[bias], [x3]. The single parameter ``spec`` (a :class:`~jax_wqmm.spec.WqmmSpec`) says which
are present and carries everything derived from the shapes.

Typing under ``shard_map`` follows ``lax.psum``: the caller reconciles the operands' varying
axes (see :func:`jax_wqmm.ops.weight_quant_matmul_all_reduce`), and the output is invariant
over ``spec.axis_name``. The default lowering, for every platform, is the jnp reference
(``reference.apply``), psum included; native lowerings override it per platform.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir
from jax._src import core as _core  # NamedAxisEffect, axis env: as lax.psum uses them
from jax._src import config as _config  # check_vma, as lax.psum reads it
from jax._src import dispatch as _dispatch

from . import autoshard, reference
from .spec import WqmmSpec, pack_operands, respec, unpack_operands

__all__ = ["wqmm_p", "bind", "vma_of", "reconcile_varying", "unbound_axes", "reference_lowering",
           "register_lowering"]

wqmm_p = Primitive("weight_quant_matmul_all_reduce")


def bind(spec: WqmmSpec, x1, x2, scale, offset=None, bias=None, x3=None) -> jax.Array:
    """Binds the primitive on operands whose presence matches ``spec``."""
    return wqmm_p.bind(*pack_operands(x1, x2, scale, offset, bias, x3), spec=spec)


# ------------------------------------------------------------------------------ typing

def vma_of(x) -> frozenset:
    """The mesh axes over which ``x`` varies (empty outside shard_map)."""
    return jax.typeof(x).mat.varying


def reconcile_varying(operands, axis_name: tuple[str, ...]):
    """pcast every operand to the union of all varying axes and the shard_map axes of
    ``axis_name`` (so the reduction axis is varying, as ``lax.psum`` does for an invariant
    input). Axes bound by ``vmap(axis_name=...)`` carry no varying type and are left alone."""
    target = _manual_axes(axis_name).union(*(vma_of(x) for x in operands))
    return tuple(
        lax.pcast(x, tuple(sorted(target - vma_of(x))), to="varying") if target - vma_of(x) else x
        for x in operands
    )


def _manual_axes(axis_name: tuple[str, ...]) -> frozenset:
    """The names in ``axis_name`` that are manual (shard_map) axes here: the ones that carry
    a varying type. Axes bound by ``vmap(axis_name=...)`` do not."""
    return frozenset(axis_name) & frozenset(jax.sharding.get_abstract_mesh().manual_axes)


def unbound_axes(axis_name: tuple[str, ...]) -> list[str]:
    """The names in ``axis_name`` that no enclosing shard_map / vmap binds."""
    env = _core.get_axis_env()
    return [a for a in axis_name if not env.axis_exists(a)]


def _abstract_eval(*avals, spec: WqmmSpec):
    x1 = avals[0]
    if tuple(x1.shape) != spec.x1_shape:
        raise AssertionError(f"x1 aval {x1.shape} does not match its spec {spec.x1_shape}")
    varying = frozenset().union(*(a.mat.varying for a in avals))
    out_mat = x1.mat.update(varying=varying - frozenset(spec.axis_name))
    # Sharding in types (Explicit mesh axes): x1's lead dims and x2's n; k is reduced.
    sharding = x1.sharding.update(spec=autoshard.output_spec(spec, x1.sharding, avals[1].sharding))
    out = x1.update(shape=spec.out_shape, dtype=jnp.dtype(spec.out_dtype), manual_axis_type=out_mat,
                    sharding=sharding)
    return out, {_core.NamedAxisEffect(a) for a in spec.axis_name}


wqmm_p.def_effectful_abstract_eval(_abstract_eval)
wqmm_p.def_impl(partial(_dispatch.apply_primitive, wqmm_p))


# ------------------------------------------------------------------------------ lowering

def _reference_impl(*operands, spec: WqmmSpec):
    return reference.apply(*unpack_operands(spec, operands), spec)


#: The jnp reference as a lowering rule: the default on every platform, and the fallback that
#: the native lowerings use where the fused kernel cannot run.
reference_lowering = mlir.lower_fun(_reference_impl, multiple_results=False)


def register_lowering(rule, platform: str | None = None) -> None:
    """Registers ``rule`` as the op's lowering on ``platform`` (None: every platform), behind
    the auto-sharding partitioner (jax_wqmm.autoshard): one place for every lowering."""
    # not cacheable: an auto-sharded lowering needs the module's device assignment, which
    # jax strips from cached lowerings
    mlir.register_lowering(wqmm_p, autoshard.partitioned(rule), platform=platform, cacheable=False)


register_lowering(reference_lowering)
# The auto-sharded lowering partitions through custom_partitioning, which needs the devices
# at lowering time (as jax declares for custom_partitioning itself).
_dispatch.prim_requires_devices_during_lowering.add(wqmm_p)


# ------------------------------------------------------------------------------ batching

def _batch_rule(axis_data, operands, dims, *, spec: WqmmSpec):
    size = axis_data.size
    if axis_data.name is not None and axis_data.name in spec.axis_name:
        # vmap(axis_name=...) over a reduced axis: the batch members are the ranks. Compute
        # each member's share without that axis, then sum over the batch, as lax.psum does.
        inner = dataclasses.replace(spec, axis_name=tuple(a for a in spec.axis_name if a != axis_data.name))
        out, d = _batch_rule(axis_data, operands, dims, spec=inner)
        total = jnp.sum(out.astype(jnp.float32), axis=d, keepdims=True).astype(out.dtype)
        return jnp.broadcast_to(total, out.shape), d
    ops = unpack_operands(spec, operands)
    ds = unpack_operands(spec, dims)
    ops = [None if x is None else (x if d is None else jnp.moveaxis(x, d, 0))
           for x, d in zip(ops, ds)]
    mapped = [x is not None and d is not None for x, d in zip(ops, ds)]
    x1, x2, scale, offset, bias, x3 = ops
    if not any(mapped[1:5]):
        # Only x1 / x3 vary: fold the batch into m and keep one fused call.
        lead = spec.x1_shape[:-1]
        x1b = x1 if mapped[0] else jnp.broadcast_to(x1, (size, *spec.x1_shape))
        x1f = x1b.reshape(-1, spec.k)
        x3f = None
        if x3 is not None:
            x3b = x3 if mapped[5] else jnp.broadcast_to(x3, (size, *spec.out_shape))
            x3f = x3b.reshape(-1, spec.n)
        new = respec(spec, x1f, x2, scale, offset, bias, x3f)
        out = bind(new, x1f, x2, scale, offset, bias, x3f)
        return out.reshape(size, *lead, spec.n), 0
    # A weight-side operand varies: one call per batch element.
    batched = [x if m else None for x, m in zip(ops, mapped)]
    fixed = [None if m else x for x, m in zip(ops, mapped)]

    def one(slices):
        args = [s if m else f for s, f, m in zip(slices, fixed, mapped)]
        return bind(spec, *args)

    return lax.map(one, batched), 0


batching.fancy_primitive_batchers[wqmm_p] = _batch_rule


# ------------------------------------------------------------------------------ autodiff

def _is_zero(t) -> bool:
    return t is None or type(t) is ad.Zero


def _jvp_rule(primals, tangents, *, spec: WqmmSpec):
    x1, x2, scale, offset, bias, x3 = unpack_operands(spec, primals)
    dx1, _, dscale, doffset, dbias, dx3 = unpack_operands(spec, tangents)
    out = bind(spec, x1, x2, scale, offset, bias, x3)
    terms = []
    # Linear in (x1, bias, x3): the same fused op on the tangents (transposed by _transpose_rule).
    lin = [None if _is_zero(t) else t for t in (dx1, dbias, dx3)]
    if any(t is not None for t in lin):
        tx1, tb, tx3 = lin
        if tx1 is None:
            tx1 = ad.instantiate_zeros(dx1)
        # tangents have their primals' shapes and dtypes: only bias / x3 presence changes
        lin_spec = dataclasses.replace(spec, bias_dtype=spec.bias_dtype if tb is not None else None,
                                       x3_dtype=spec.x3_dtype if tx3 is not None else None)
        terms.append(bind(lin_spec, tx1, x2, scale, offset, tb, tx3))
    # Through the weight: x1 @ d[(x2 + offset) * scale], then the same all-reduce (plain jnp;
    # float32 and linear in the tangents: the kernel's roundings differentiate as identities).
    if not (_is_zero(dscale) and _is_zero(doffset)):
        f32 = jnp.float32
        dw = 0.0
        if not _is_zero(dscale):  # (x2 + offset) * dscale
            dw = reference.dequantize(x2, dscale, offset, spec, dtype=f32)
        if not _is_zero(doffset):
            dw = dw + (reference.expand_quant_param(doffset, spec).astype(f32)
                       * reference.expand_quant_param(scale, spec).astype(f32))
        sharding = jax.typeof(out).sharding  # explicit mesh axes: k is summed away, as in out
        explicit = not sharding.mesh.empty and any(
            t == jax.sharding.AxisType.Explicit for t in sharding.mesh.axis_types)
        y = reference.matmul_f32(x1.astype(f32), dw, out_sharding=sharding if explicit else None)
        terms.append(reference.all_reduce(y.astype(spec.out_dtype), spec))
    if not terms:
        return out, ad.Zero.from_primal_value(out)
    tangent = terms[0]
    for t in terms[1:]:
        tangent = tangent + t
    return out, tangent


def _transpose_rule(ct, *operands, spec: WqmmSpec):
    x1, x2, scale, offset, bias, x3 = unpack_operands(spec, operands)
    for name, v in (("x2", x2), ("antiquant_scale", scale), ("antiquant_offset", offset)):
        if ad.is_undefined_primal(v):
            raise NotImplementedError(
                f"weight_quant_matmul_all_reduce is not linear in {name}; its derivative goes "
                "through the JVP rule, not a transpose")
    cts = [None] * len(operands)
    if type(ct) is ad.Zero:
        return cts
    # The transpose of the all-reduce, as lax.psum's: with varying types (check_vma=True) the
    # cotangent becomes varying over the reduced axes; without them shard_map hands each rank
    # 1/size of an unmapped output's cotangent, and the transpose is a psum.
    axes = tuple(sorted(_manual_axes(spec.axis_name)))
    if axes and _config._check_vma.value:
        missing = tuple(a for a in axes if a not in vma_of(ct))
        if missing:
            ct = lax.pcast(ct, missing, to="varying")
    elif axes:
        ct = lax.psum(ct, axes)
    out = [None] * 6
    if ad.is_undefined_primal(x1):
        w = reference.dequantize(x2, scale, offset, spec)
        gx1 = lax.dot_general(ct, w, (((ct.ndim - 1,), (1,)), ((), ())),
                              preferred_element_type=jnp.float32)
        out[0] = gx1.astype(x1.aval.dtype)
    if bias is not None and ad.is_undefined_primal(bias):
        out[4] = ct.astype(jnp.float32).reshape(-1, spec.n).sum(axis=0).astype(bias.aval.dtype)
    if x3 is not None and ad.is_undefined_primal(x3):
        out[5] = ct.astype(x3.aval.dtype)
    present = [v is not None for v in (x1, x2, scale, offset, bias, x3)]
    return [o for o, p in zip(out, present) if p]


ad.primitive_jvps[wqmm_p] = _jvp_rule
ad.primitive_transposes[wqmm_p] = _transpose_rule
