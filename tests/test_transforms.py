"""jit, vmap and grad of the fused call, against the float64 oracle."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

import jax_wqmm as wq
import oracle
from cases import make_case, to_jax
from test_shard_map import TP, _put, _rank_slices, mesh_1d


# ------------------------------------------------------------------------------ vmap

def test_vmap_over_x1_and_x3_is_one_fused_call():
    case = make_case(np.random.default_rng(20), offset=True, bias=True, x3=True, granularity="per_group", group_size=32)
    x1, x2, s, o, b, x3 = to_jax(case.args)
    rng = np.random.default_rng(21)
    xs = jnp.asarray(rng.standard_normal((3, *x1.shape)), x1.dtype)
    f = jax.vmap(lambda x, y3: wq.weight_quant_matmul_all_reduce(x, x2, s, o, b, y3, antiquant_group_size=32),
                 in_axes=(0, None))
    jaxpr = jax.make_jaxpr(f)(xs, x3)
    assert sum(e.primitive.name == "weight_quant_matmul_all_reduce" for e in jaxpr.eqns) == 1
    ys = f(xs, x3)
    assert ys.shape == (3, *case.args[0].shape[:-1], 40)
    for i in range(3):
        expected, mag = oracle.wqmm([dict(case.oracle, x1=np.asarray(xs[i]))], 32, "int8")
        oracle.assert_close(ys[i], expected, mag, case.act)


def test_vmap_over_weights_and_bias_with_batch_dim_last():
    rng = np.random.default_rng(22)
    cases = [make_case(rng, weight_dtype="int4", offset=True, bias=True) for _ in range(2)]
    stack = lambda i: jnp.stack([jnp.asarray(c.args[i]) for c in cases], axis=-1)
    x1 = jnp.asarray(cases[0].args[0])
    x2, s, o, b = stack(1), stack(2), stack(3), stack(4)
    ys = jax.vmap(lambda w, sc, of, bi: wq.weight_quant_matmul_all_reduce(x1, w, sc, of, bi),
                  in_axes=(-1, -1, -1, -1))(x2, s, o, b)
    for i, c in enumerate(cases):
        expected, mag = oracle.wqmm([dict(c.oracle, x1=cases[0].oracle["x1"])], 0, "int4")
        oracle.assert_close(ys[i], expected, mag, c.act)


def test_vmap_inside_shard_map():
    mesh = mesh_1d()
    case = make_case(np.random.default_rng(23), k=TP * 16, n=16, offset=True)
    x1, x2, s, o = case.args[:4]
    xs = np.stack([x1, -x1])
    specs = (P(None, None, "tp"), P("tp", None), P(), P())
    fn = jax.jit(jax.shard_map(
        jax.vmap(lambda x, w, sc, of: wq.weight_quant_matmul_all_reduce(x, w, sc, of, axis_name="tp"),
                 in_axes=(0, None, None, None)),
        mesh=mesh, in_specs=specs, out_specs=P(), check_vma=True))
    ys = fn(*_put(mesh, (xs, x2, s, o), specs))
    for i, sign in enumerate((1, -1)):
        sub = type(case)(case.args, case.kwargs, dict(case.oracle, x1=sign * x1), case.act, 0, "int8")
        expected, mag = oracle.wqmm(_rank_slices(sub, TP), 0, "int8")
        oracle.assert_close(ys[i], expected, mag, case.act, ranks=TP)


def test_vmap_with_the_reduced_axis_name_sums_over_the_batch():
    """vmap(axis_name='tp') binds the reduced axis: batch members act as ranks (like lax.psum)."""
    rng = np.random.default_rng(24)
    cases = [make_case(rng, bias=True, offset=True) for _ in range(3)]
    stack = lambda i: jnp.stack([jnp.asarray(c.args[i]) for c in cases])
    ys = jax.vmap(lambda x, w, sc, of, bi: wq.weight_quant_matmul_all_reduce(x, w, sc, of, bi, axis_name="tp"),
                  axis_name="tp")(*(stack(i) for i in range(5)))
    expected, mag = oracle.wqmm([c.oracle for c in cases], 0, "int8")
    for i in range(3):
        oracle.assert_close(ys[i], expected, mag, "bfloat16", ranks=3)


# ------------------------------------------------------------------------------ grad

GRAD_ARGS = ("x1", "scale", "offset", "bias", "x3")


@pytest.mark.parametrize("cfg", [
    dict(granularity="per_channel"),
    dict(granularity="per_group", group_size=32),
    dict(granularity="per_tensor", x1_3d=True),
    dict(granularity="per_group", group_size=64, weight_dtype="int4", transpose=True),
], ids=lambda c: "-".join(str(v) for v in c.values()))
def test_grad_against_oracle(cfg):
    cfg = dict(cfg)
    lead = (2, 3) if cfg.pop("x1_3d", False) else (5,)
    case = make_case(np.random.default_rng(30), offset=True, bias=True, x3=True, act="float16",
                     lead=lead, **cfg)
    x1, x2, s, o, b, x3 = to_jax(case.args)
    cot = np.random.default_rng(31).standard_normal((*lead, 40)).astype(np.float32)

    def loss(x1, s, o, b, x3):
        y = wq.weight_quant_matmul_all_reduce(x1, x2, s, o, b, x3, **case.kwargs)
        return jnp.sum(y.astype(jnp.float32) * cot)

    grads = jax.jit(jax.grad(loss, argnums=range(5)))(x1, s, o, b, x3)
    want = oracle.wqmm_grads(case.oracle, cot, case.group_size, case.weight_dtype)
    mags = oracle.wqmm_grads(case.oracle, cot, case.group_size, case.weight_dtype, abs_=True)
    for name, g in zip(GRAD_ARGS, grads):
        assert g.shape == np.shape(want[name]) and g.dtype == np.float16, name
        oracle.assert_close(g, want[name], mags[name], "float16", ranks=2)


def test_grad_inside_shard_map_against_oracle():
    mesh = mesh_1d()
    case = make_case(np.random.default_rng(32), offset=True, bias=True, x3=True, act="float16",
                     granularity="per_group", group_size=32, k=TP * 64, n=24, lead=(6,))
    x1, x2, s, o, b, x3 = case.args
    specs = (P(None, "tp"), P("tp", None), P("tp", None), P("tp", None), P(), P())
    f = jax.shard_map(
        lambda *a: wq.weight_quant_matmul_all_reduce(*a, axis_name="tp", antiquant_group_size=32),
        mesh=mesh, in_specs=specs, out_specs=P(), check_vma=True)
    cot = np.random.default_rng(33).standard_normal((6, 24)).astype(np.float32)
    args = _put(mesh, (x1, x2, s, o, b, x3), specs)

    def loss(x1, s, o, b, x3):
        return jnp.sum(f(x1, args[1], s, o, b, x3).astype(jnp.float32) * cot)

    with jax.set_mesh(mesh):
        grads = jax.jit(jax.grad(loss, argnums=range(5)))(args[0], *args[2:])
    ranks = _rank_slices(case, TP)
    per = [oracle.wqmm_grads(r, cot, 32, "int8") for r in ranks]
    mags = [oracle.wqmm_grads(r, cot, 32, "int8", abs_=True) for r in ranks]
    concat = lambda key, parts, axis: np.concatenate([p[key] for p in parts], axis=axis)
    want = dict(x1=concat("x1", per, -1), scale=concat("scale", per, 0), offset=concat("offset", per, 0),
                bias=sum(p["bias"] for p in per), x3=sum(p["x3"] for p in per))
    mag = dict(x1=concat("x1", mags, -1), scale=concat("scale", mags, 0), offset=concat("offset", mags, 0),
               bias=sum(p["bias"] for p in mags), x3=sum(p["x3"] for p in mags))
    for name, g in zip(GRAD_ARGS, grads):
        assert g.shape == want[name].shape, name
        oracle.assert_close(g, want[name], mag[name], "float16", ranks=2)
    # bias and x3 are replicated and added on each of the tp ranks: their gradient is tp * cot.
    np.testing.assert_allclose(np.asarray(grads[4], np.float64), TP * cot, rtol=2e-3)


def test_jvp_matches_finite_difference_of_oracle():
    """A directional derivative w.r.t. the scale (through the JVP rule, not a transpose)."""
    case = make_case(np.random.default_rng(34), offset=True, act="float16", granularity="per_group", group_size=32)
    x1, x2, s, o = to_jax(case.args[:4])
    ds = jnp.asarray(np.random.default_rng(35).uniform(-1, 1, s.shape), s.dtype)
    _, t = jax.jvp(lambda sc: wq.weight_quant_matmul_all_reduce(x1, x2, sc, o, antiquant_group_size=32), (s,), (ds,))
    # d/ds of x1 @ ((q + o) * s) is x1 @ ((q + o) * ds): the oracle evaluated at scale=ds.
    want, mag = oracle.wqmm([dict(case.oracle, scale=np.asarray(ds))], 32, "int8")
    oracle.assert_close(t, want, mag, "float16")


def test_no_gradient_for_the_integer_weight():
    case = make_case(np.random.default_rng(36))
    x1, x2, s = to_jax(case.args[:3])
    with pytest.raises(TypeError):
        jax.grad(lambda w: wq.weight_quant_matmul_all_reduce(x1, w, s).astype(jnp.float32).sum())(x2)


def test_grad_inside_shard_map_without_check_vma_matches_with_it():
    """With check_vma=False the all-reduce must still transpose like lax.psum (a psum of the
    per-rank cotangent shares), not like the identity."""
    mesh = Mesh(np.array(jax.devices()), ("tp",))
    case = make_case(np.random.default_rng(37), offset=True, bias=True, x3=True, act="float16",
                     k=TP * 32, n=16, lead=(3,))
    x1, x2, s, o, b, x3 = to_jax(case.args)
    grads = {}
    for check_vma in (True, False):
        f = jax.shard_map(lambda *a: wq.weight_quant_matmul_all_reduce(*a, axis_name="tp"),
                          mesh=mesh, in_specs=(P(None, "tp"), P("tp", None), P(), P(), P(), P()),
                          out_specs=P(), check_vma=check_vma)
        loss = lambda x1, s, o, b, x3: f(x1, x2, s, o, b, x3).astype(jnp.float32).sum()
        grads[check_vma] = jax.jit(jax.grad(loss, argnums=range(5)))(x1, s, o, b, x3)
    for name, a, b_ in zip(GRAD_ARGS, grads[True], grads[False]):
        np.testing.assert_allclose(np.asarray(b_, np.float32), np.asarray(a, np.float32),
                                   rtol=1e-2, atol=1e-2, err_msg=name)
