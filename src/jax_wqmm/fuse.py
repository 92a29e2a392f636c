"""``fuse(fun)``: the user's own reduction becomes the fused operator.

Tensor-parallel code often reduces a row-parallel matmul itself::

    y = lax.psum(wq.quant_matmul(x, qw) + b, "tp")      # inside jax.shard_map

:func:`fuse` traces ``fun`` to a jaxpr and evaluates it again, replacing every such site by one
call of the operator over that axis (``aclnnWeightQuantMatmulAllReduce`` on the NPU): a
weight-quantized matmul with no reduction whose result feeds only a ``psum`` over mesh axes,
directly or through ``add``\\ s of per-rank terms. The operator adds bias and x3 on every rank
before its sum, so ``psum(qmm(x) + b)`` takes ``b`` as its bias (a row) or x3 (full shape); the
math is the same. Everything else is evaluated exactly as written: ``psum(qmm(x)) + b`` fuses
the ``psum`` only, and a matmul whose result is also used elsewhere is left alone. Not fusing
is never an error.

The rewrite happens each time ``fun`` is traced, on the operations JAX records, so it composes
with ``jax.jit`` (inside or outside), ``jax.grad``, ``jax.vmap`` and ``shard_map`` in ``fun``.
What it did is in :class:`FuseReport`: ``fused_fun.last_report`` after a call, and on the
``jax_wqmm.fuse`` logger (INFO; every trace with ``report=True``, at WARNING).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax._src import core as _core  # subjaxprs: the jaxprs nested in a jaxpr's eqns
from jax.extend import core as jex_core

from .primitive import wqmm_p
from .spec import ConstraintError

__all__ = ["fuse", "FuseReport"]

logger = logging.getLogger("jax_wqmm.fuse")

_PSUMS = frozenset({"psum", "psum_invariant", "psum2"})


@dataclasses.dataclass
class FuseReport:
    """What one trace of a fused function did.

    Attributes:
      fused: sites rewritten into the fused operator, as "m x k x n over axes (+ bias / x3)".
      skipped: (site, reason) for every weight-quantized matmul with no reduction inside a
        shard_map that was left as written.
    """

    fused: list[str] = dataclasses.field(default_factory=list)
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"jax_wqmm.fuse: {len(self.fused)} site(s) fused, {len(self.skipped)} left as written"]
        lines += [f"  fused: {s}" for s in self.fused]
        lines += [f"  left as written: {s}: {why}" for s, why in self.skipped]
        return "\n".join(lines)


def fuse(fun: Callable | None = None, *, report: bool = False) -> Callable:
    """Returns ``fun`` with ``psum(quantized matmul [+ per-rank terms])`` sites inside
    ``shard_map`` replaced by the fused operator over the psum's axes (module docstring).

    Usable as ``@wq.fuse`` or ``@wq.fuse(report=True)``. ``fun``'s arguments are arrays or
    pytrees of arrays (it is traced with them). The returned function has ``last_report``, the
    :class:`FuseReport` of its latest trace.
    """
    if fun is None:
        return functools.partial(fuse, report=report)

    @functools.wraps(fun)
    def fused(*args, **kwargs):
        closed, out_shape = jax.make_jaxpr(lambda a, k: fun(*a, **k), return_shape=True)(args, kwargs)
        rep = FuseReport()
        flat = jax.tree.leaves((args, kwargs))
        outs = _eval(closed.jaxpr, closed.consts, flat, rep, manual=frozenset())
        fused.last_report = rep
        (logger.warning if report else logger.info)("%s", rep)
        return jax.tree.unflatten(jax.tree.structure(out_shape), outs)

    fused.last_report = None
    return fused


# ------------------------------------------------------------------------------ the rewrite

def _site(eqn) -> str:
    s = eqn.params["spec"]
    return f"{s.m}x{s.k}x{s.n} {s.weight_dtype} {s.granularity}"


def _has_candidate(jaxpr) -> bool:
    """Whether ``jaxpr`` (or one nested in it) has a weight-quantized matmul with no reduction."""
    return (any(eqn.primitive is wqmm_p and not eqn.params["spec"].axis_name for eqn in jaxpr.eqns)
            or any(_has_candidate(j) for j in _core.subjaxprs(jaxpr)))


@dataclasses.dataclass
class _Chain:
    """A matmul whose result reaches a psum through adds: the eqn indices and the terms."""
    matmul: int
    adds: list[tuple[int, Any]]  # (eqn index, the added term var)
    psum: int
    axes: tuple


def _find_chains(jaxpr, manual: frozenset, rep: FuseReport) -> dict[int, _Chain]:
    """The fusable chains of ``jaxpr``, keyed by the index of every eqn they consume."""
    uses: dict = {}
    for eqn in jaxpr.eqns:
        for v in eqn.invars:
            if isinstance(v, jex_core.Var):
                uses.setdefault(v, []).append(eqn)
    outvars = {v for v in jaxpr.outvars if isinstance(v, jex_core.Var)}
    index = {id(e): i for i, e in enumerate(jaxpr.eqns)}
    chains: dict[int, _Chain] = {}
    for i, eqn in enumerate(jaxpr.eqns):
        if eqn.primitive is not wqmm_p or eqn.params["spec"].axis_name:
            continue
        v, adds, why = eqn.outvars[0], [], None
        while True:
            users = uses.get(v, [])
            n_uses = len(users) + (v in outvars)
            if n_uses != 1 or v in outvars:
                why = ("its result is also used elsewhere" if n_uses > 1 else
                       "no psum follows: the result is returned as it is" if v in outvars else
                       "its result is unused")
                break
            user = users[0]
            name = user.primitive.name
            if name == "add" and len(adds) < 2:
                term = user.invars[1] if user.invars[0] is v else user.invars[0]
                if user.outvars[0].aval.dtype != eqn.outvars[0].aval.dtype:
                    why = "an add changes the dtype"
                    break
                adds.append((index[id(user)], term))
                v = user.outvars[0]
                continue
            if name in _PSUMS:
                axes = tuple(user.params.get("axes", ()))
                if len(user.invars) != 1:
                    why = "the psum reduces several arrays at once"
                elif user.params.get("axis_index_groups") is not None:
                    why = "the psum has axis_index_groups"
                elif not axes or not all(isinstance(a, str) and a in manual for a in axes):
                    why = f"the psum's axes {axes} are not shard_map mesh axes"
                else:
                    chain = _Chain(i, adds, index[id(user)], axes)
                    for j in [i, chain.psum, *(a for a, _ in adds)]:
                        chains[j] = chain
                break
            why = f"its result feeds {name}, not a psum"
            break
        if why is not None and manual:
            rep.skipped.append((_site(eqn), why))
    return chains


def _fused_call(chain: _Chain, jaxpr, read, rep: FuseReport):
    """The operator over the chain's axes, with the added terms as bias / x3; None (and a
    skip reason in the report) where they do not fit its slots."""
    from .ops import weight_quant_matmul_all_reduce
    from .spec import unpack_operands

    eqn = jaxpr.eqns[chain.matmul]
    spec = eqn.params["spec"]
    x1, x2, scale, offset, bias, x3 = unpack_operands(spec, [read(v) for v in eqn.invars])
    out_shape = spec.out_shape
    for _, term_var in chain.adds:
        t = read(term_var)
        shape = tuple(jnp.shape(t))
        row = len(shape) <= len(out_shape) and all(d == 1 for d in shape[:-1]) and shape[-1:] == (spec.n,)
        if bias is None and row:
            bias = jnp.reshape(t, (spec.n,))
        elif x3 is None:
            x3 = jnp.broadcast_to(t, out_shape)
        else:
            rep.skipped.append((_site(eqn), "more per-rank terms than the operator's bias and x3 slots"))
            return None
    try:
        y = weight_quant_matmul_all_reduce(x1, x2, scale, offset, bias, x3,
                                           **dict(spec.options, axis_name=chain.axes))
    except ConstraintError as e:
        rep.skipped.append((_site(eqn), f"the fused call breaks a rule: {e}"))
        return None
    rep.fused.append(f"{_site(eqn)} over {chain.axes}" + (f", {len(chain.adds)} added term(s) as bias / x3" if chain.adds else ""))
    return y


def _eval(jaxpr, consts, args, rep: FuseReport, manual: frozenset):
    """``core.eval_jaxpr`` with the rewrite: chains become fused calls; shard_map bodies and
    nested jits that hold candidates are evaluated by this function again."""
    env: dict = {}

    def read(v):
        return v.val if isinstance(v, jex_core.Literal) else env[v]

    for v, x in zip(jaxpr.constvars, consts):
        env[v] = x
    for v, x in zip(jaxpr.invars, args):
        env[v] = x
    chains = _find_chains(jaxpr, manual, rep)
    for i, eqn in enumerate(jaxpr.eqns):
        chain = chains.get(i)
        if chain is not None:
            if i != chain.psum:
                continue  # deferred to the chain's psum
            y = _fused_call(chain, jaxpr, read, rep)
            if y is not None:
                env[eqn.outvars[0]] = y
                continue
            for j in (chain.matmul, *(a for a, _ in chain.adds)):  # not fused: as written
                _bind(jaxpr.eqns[j], read, env, rep, manual)
        _bind(eqn, read, env, rep, manual)
    return [read(v) for v in jaxpr.outvars]


def _bind(eqn, read, env, rep, manual):
    invals = [read(v) for v in eqn.invars]
    name = eqn.primitive.name
    if name == "shard_map" and _has_candidate(eqn.params["jaxpr"]):
        p = eqn.params
        body = p["jaxpr"]
        inner = manual | frozenset(p["newly_manual_axes"])

        def run(*xs):
            return tuple(_eval(body, (), xs, rep, inner))

        outs = jax.shard_map(run, mesh=p["mesh"], in_specs=tuple(p["in_specs"]), out_specs=tuple(p["out_specs"]),
                             axis_names=set(p["newly_manual_axes"]), check_vma=p["check_vma"])(*invals)
    elif name in ("pjit", "jit") and _has_candidate(eqn.params["jaxpr"].jaxpr):
        closed = eqn.params["jaxpr"]
        outs = _eval(closed.jaxpr, closed.consts, invals, rep, manual)  # inlined
    else:
        params = eqn.primitive.get_bind_params(eqn.params)  # as core.eval_jaxpr binds
        with eqn.ctx.manager:
            outs = eqn.primitive.bind(*invals, **params)
        if not eqn.primitive.multiple_results:
            outs = [outs]
    for v, x in zip(eqn.outvars, outs):
        env[v] = x
