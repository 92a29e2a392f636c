"""shard_map semantics: the all-reduce is part of the op, typed like lax.psum."""

import dataclasses

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import jax_wqmm as wq
import oracle
from cases import make_case, to_jax

TP = 8


def mesh_1d():
    return jax.make_mesh((TP,), ("tp",), axis_types=(AxisType.Explicit,))


def mesh_2d():
    return jax.make_mesh((2, 4), ("dp", "tp"), axis_types=(AxisType.Explicit,) * 2)


def _put(mesh, arrays, specs):
    return [None if a is None else jax.device_put(jnp.asarray(a), NamedSharding(mesh, s))
            for a, s in zip(arrays, specs)]


def _rank_slices(case, tp):
    """Per-rank oracle dicts for k sharded in tp equal slices (bias, x3 replicated)."""
    o = case.oracle
    k = o["x1"].shape[-1]
    kl = k // tp
    ranks = []
    for r in range(tp):
        sl = slice(r * kl, (r + 1) * kl)
        gran_group = case.group_size
        sc = o["scale"][r * kl // gran_group:(r + 1) * kl // gran_group] if gran_group else o["scale"]
        off = None if o["offset"] is None else (
            o["offset"][r * kl // gran_group:(r + 1) * kl // gran_group] if gran_group else o["offset"])
        ranks.append(dict(x1=o["x1"][..., sl], codes=o["codes"][sl], scale=sc, offset=off,
                          bias=o["bias"], x3=o["x3"]))
    return ranks


def _weight_spec(kwargs):
    if kwargs["x2_format"] == "FRACTAL_NZ":
        return P(None, None, None, None) if kwargs["transpose_x2"] else P(None, "tp", None, None)
    return P(None, "tp") if kwargs["transpose_x2"] else P("tp", None)


CONFIGS = [
    dict(weight_dtype="int8", granularity="per_channel", offset=True),
    dict(weight_dtype="int8", granularity="per_group", offset=True, group_size=32),
    dict(weight_dtype="int4", granularity="per_group", offset=True, group_size=32, transpose=True),
    dict(weight_dtype="int4", granularity="per_tensor"),
    dict(weight_dtype="int8", granularity="per_channel", fmt="FRACTAL_NZ"),
    dict(weight_dtype="float8_e4m3fn", granularity="per_channel", act="float16"),
    dict(weight_dtype="hifloat8", granularity="per_channel", act="float16"),
    dict(weight_dtype="int8", granularity="per_group", offset=True, group_size=32, transpose=True),
]


def _nz_per_rank(case, tp):
    """FRACTAL_NZ storage sharded along k: each rank's slice is the NZ tiling of its rows."""
    from cases import store
    o = case.oracle
    kl = o["codes"].shape[0] // tp
    parts = [store(o["codes"][r * kl:(r + 1) * kl], case.weight_dtype, False, "FRACTAL_NZ") for r in range(tp)]
    return np.concatenate(parts, axis=1)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_tp8_sharded_k_equals_oracle(cfg):
    mesh = mesh_1d()
    case = make_case(np.random.default_rng(10), bias=True, x3=True, k=TP * 64, n=48, lead=(6,), **cfg)
    x1, x2, s, o, b, x3 = case.args
    if case.kwargs["x2_format"] == "FRACTAL_NZ":
        x2 = _nz_per_rank(case, TP)
    g = case.group_size
    qspec = P("tp", None) if g else P()
    specs = (P(None, "tp"), _weight_spec(case.kwargs), qspec, qspec, P(), P())
    present = [a is not None for a in (x1, x2, s, o, b, x3)]

    def f(*args):
        full = iter(args)
        a = [next(full) if p else None for p in present]
        y = wq.weight_quant_matmul_all_reduce(*a, axis_name="tp", **case.kwargs)
        assert "tp" not in jax.typeof(y).mat.varying
        return y

    in_specs = tuple(sp for sp, p in zip(specs, present) if p)
    fn = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=P(), check_vma=True))
    args = [a for a in _put(mesh, (x1, x2, s, o, b, x3), specs) if a is not None]
    y = fn(*args)
    expected, mag = oracle.wqmm(_rank_slices(case, TP), g, case.weight_dtype)
    oracle.assert_close(y, expected, mag, case.act, ranks=TP)
    # The all-reduce is part of the op: bias and x3 are counted once per rank.
    single, _ = oracle.wqmm([case.oracle], g, case.weight_dtype)
    np.testing.assert_allclose(expected, single + (TP - 1) * (oracle.f64(b) + oracle.f64(x3)), rtol=1e-9, atol=1e-9)


def test_2d_mesh_dp_tp():
    mesh = mesh_2d()
    case = make_case(np.random.default_rng(11), weight_dtype="int4", granularity="per_group",
                     offset=True, bias=True, x3=True, k=4 * 64, n=24, lead=(2, 6), group_size=32)
    x1, x2, s, o, b, x3 = case.args
    specs = (P("dp", None, "tp"), P("tp", None), P("tp", None), P("tp", None), P(), P("dp"))
    fn = jax.jit(jax.shard_map(
        lambda *a: wq.weight_quant_matmul_all_reduce(*a, axis_name="tp", antiquant_group_size=32),
        mesh=mesh, in_specs=specs, out_specs=P("dp"), check_vma=True))
    y = np.asarray(fn(*_put(mesh, case.args, specs)), dtype=np.float64)
    for d in range(2):
        block = dict(case.oracle, x1=case.oracle["x1"][d:d + 1], x3=case.oracle["x3"][d:d + 1])
        sub = dataclasses.replace(case, oracle=block)
        expected, mag = oracle.wqmm(_rank_slices(sub, 4), 32, "int4")
        oracle.assert_close(y[d:d + 1], expected, mag, case.act, ranks=4)


def test_2d_mesh_sum_over_both_axes():
    mesh = mesh_2d()
    case = make_case(np.random.default_rng(12), offset=True, bias=True, k=8 * 32, n=16)
    x1, x2, s, o, b, _ = case.args
    specs = (P(None, ("dp", "tp")), P(("dp", "tp"), None), P(), P(), P())
    fn = jax.jit(jax.shard_map(
        lambda *a: wq.weight_quant_matmul_all_reduce(*a, axis_name=("dp", "tp")),
        mesh=mesh, in_specs=specs, out_specs=P(), check_vma=True))
    y = fn(*_put(mesh, (x1, x2, s, o, b), specs))
    expected, mag = oracle.wqmm(_rank_slices(case, 8), 0, "int8")
    oracle.assert_close(y, expected, mag, case.act, ranks=8)


def test_replicated_inputs_are_summed_per_rank():
    """Invariant inputs: every rank computes the same share, so the result is tp times it."""
    mesh = mesh_1d()
    case = make_case(np.random.default_rng(13), bias=True, act="float16")
    x1, x2, s, _, b, _ = case.args
    fn = jax.jit(jax.shard_map(
        lambda x1, x2, s, b: wq.weight_quant_matmul_all_reduce(x1, x2, s, bias=b, axis_name="tp"),
        mesh=mesh, in_specs=(P(),) * 4, out_specs=P(), check_vma=True))
    y = fn(*_put(mesh, (x1, x2, s, b), (P(),) * 4))
    expected, mag = oracle.wqmm([case.oracle] * TP, 0, "int8")
    oracle.assert_close(y, expected, mag, "float16", ranks=TP)


def _k_sharded(seed, check_vma):
    """A case with k sharded over tp=8, the op under shard_map, and its placed operands."""
    mesh = mesh_1d()
    case = make_case(np.random.default_rng(seed), k=8 * 16, n=16)
    specs = (P(None, "tp"), P("tp", None), P())
    fn = jax.jit(jax.shard_map(
        lambda *a: wq.weight_quant_matmul_all_reduce(*a, axis_name="tp"),
        mesh=mesh, in_specs=specs, out_specs=P(), check_vma=check_vma))
    return case, fn, _put(mesh, case.args[:3], specs)


def test_check_vma_false():
    case, fn, args = _k_sharded(14, check_vma=False)
    expected, mag = oracle.wqmm(_rank_slices(case, TP), 0, "int8")
    oracle.assert_close(fn(*args), expected, mag, case.act, ranks=TP)


def test_hlo_contains_the_all_reduce():
    _, fn, args = _k_sharded(15, check_vma=True)
    lowered = fn.lower(*args)
    text = lowered.as_text()
    assert text.count("all_reduce") >= 1, text
    hlo = lowered.compile().as_text()
    assert "all-reduce" in hlo


def test_unbound_axis_name_is_a_clear_error():
    case = make_case(np.random.default_rng(16))
    with pytest.raises(wq.ConstraintError, match="axis_name.*not bound"):
        wq.weight_quant_matmul_all_reduce(*to_jax(case.args[:3]), axis_name="tp")
