"""Auto-sharded jit: ``wq.quant_matmul`` over NamedSharding-placed global arrays (no shard_map)
partitions into per-device fused calls when k is sharded, and without collectives otherwise.
Auto and Explicit mesh axes, the default CPU lowering and the emulator as the NPU."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import jax_wqmm as wq
import jax_wqmm.testing as wqt
from jax_wqmm import layers
import oracle

K, N, M = 8 * 64, 64, 8
AXIS_TYPES = {"auto": AxisType.Auto, "explicit": AxisType.Explicit}


def _mesh(kind, shape=(8,), names=("tp",)):
    return jax.make_mesh(shape, names, axis_types=(AXIS_TYPES[kind],) * len(shape))


def _weights(seed, group=32):
    rng = np.random.default_rng(seed)
    qw = wq.quantize_weight(rng.standard_normal((K, N)).astype(np.float32), dtype="int4",
                            granularity="per_group", group_size=group, symmetric=False, scale_dtype=jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((M, K)), jnp.bfloat16)
    b = jnp.asarray(rng.standard_normal((N,)), jnp.bfloat16)
    return qw, x, b


def _place(mesh, tree, specs):
    return jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), tree, specs)


def _expected(qw, x, b):
    rank = dict(x1=np.asarray(x), codes=np.asarray(qw.data), scale=np.asarray(qw.scale),
                offset=np.asarray(qw.offset), bias=np.asarray(b))
    return oracle.wqmm([rank], qw.group_size, "int4")


@pytest.fixture
def emulated():
    emu = wqt.use_emulator()
    yield emu
    wqt.destroy_groups()
    wqt.use_default()


def _hlo(f, *args):
    return f.lower(*args).compile().as_text()


@pytest.mark.parametrize("kind", list(AXIS_TYPES))
@pytest.mark.parametrize("npu", [False, True], ids=["cpu", "emulated_npu"])
def test_row_parallel_becomes_the_fused_operator(kind, npu, request):
    mesh = _mesh(kind)
    if npu:
        request.getfixturevalue("emulated")
        wqt.create_groups(mesh, "tp")
    qw, x, b = _weights(0)
    qd = _place(mesh, qw, layers.row_parallel_specs(qw))
    xd, bd = _place(mesh, (x, b), (P(None, "tp"), P()))
    f = jax.jit(lambda x, q, b: wq.quant_matmul(x, q, bias=b))
    y = f(xd, qd, bd)
    text = _hlo(f, xd, qd, bd)
    assert "all-gather" not in text  # neither activations nor weight are gathered
    if npu:
        assert text.count(f'custom_call_target="{wqt.HOST_TARGET}"') == 1 and "all-reduce" not in text
    else:
        assert text.count("all-reduce") == 1
    assert y.sharding.is_equivalent_to(NamedSharding(mesh, P()), 2)
    if kind == "explicit":
        assert jax.typeof(y).sharding.spec in (P(), P(None, None))
    want, mag = _expected(qw, x, np.asarray(b, np.float64))  # the call's meaning: bias once
    oracle.assert_close(y, want, mag, "bfloat16", ranks=8)


@pytest.mark.parametrize("kind", list(AXIS_TYPES))
@pytest.mark.parametrize("layout", ["columns", "batch", "replicated"])
def test_other_shardings_need_no_collective(kind, layout):
    mesh = _mesh(kind)
    qw, x, b = _weights(1)
    qspecs = {"columns": layers.column_parallel_specs(qw), "batch": jax.tree.map(lambda _: P(), qw),
              "replicated": jax.tree.map(lambda _: P(), qw)}[layout]
    xs = {"columns": P(), "batch": P("tp"), "replicated": P()}[layout]
    bs = P("tp") if layout == "columns" else P()
    qd = _place(mesh, qw, qspecs)
    xd, bd = _place(mesh, (jnp.concatenate([x, x]) if layout == "batch" else x, b), (xs, bs))
    f = jax.jit(lambda x, q, b: wq.quant_matmul(x, q, bias=b))
    y = f(xd, qd, bd)
    text = _hlo(f, xd, qd, bd)
    assert "all-reduce" not in text and "all-gather" not in text and "all-to-all" not in text
    want_spec = {"columns": P(None, "tp"), "batch": P("tp"), "replicated": P()}[layout]
    assert y.sharding.is_equivalent_to(NamedSharding(mesh, want_spec), 2)
    want, mag = _expected(qw, x, np.asarray(b, np.float64))
    if layout == "batch":
        want, mag = np.concatenate([want, want]), np.concatenate([mag, mag])
    oracle.assert_close(y, want, mag, "bfloat16")


def test_a_split_the_operator_cannot_take_is_gathered_with_a_warning():
    """Group size 64 on a k split 16 ways leaves 32 rows per device: 64 > k - 1."""
    mesh = _mesh("auto", (16,)) if len(jax.devices()) >= 16 else None
    mesh = mesh or _mesh("auto", (8,))
    qw, x, b = _weights(2, group=64)  # k / 8 = 64: group 64 > 63 breaks the operator's rule
    qd = _place(mesh, qw, layers.row_parallel_specs(qw))
    xd, bd = _place(mesh, (x, b), (P(None, "tp"), P()))
    f = jax.jit(lambda x, q, b: wq.quant_matmul(x, q, bias=b))
    with pytest.warns(RuntimeWarning, match=r"k sharded over \('tp',\) does not map to the fused operator .*gathering k instead"):
        y = f(xd, qd, bd)
    want, mag = _expected(qw, x, np.asarray(b, np.float64))
    oracle.assert_close(y, want, mag, "bfloat16")


@pytest.mark.parametrize("kind", list(AXIS_TYPES))
def test_grads_of_the_auto_sharded_call_equal_the_unsharded(kind):
    mesh = _mesh(kind)
    qw, x, b = _weights(3)
    r = jnp.asarray(np.random.default_rng(4).standard_normal((M, N)), jnp.bfloat16)
    loss = lambda x, q, b, r: wq.quant_matmul(x, q, bias=b, x3=r).astype(jnp.float32).sum()
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3), allow_int=True))
    qd = _place(mesh, qw, layers.row_parallel_specs(qw))
    xd, bd, rd = _place(mesh, (x, b, r), (P(None, "tp"), P(), P()))
    got = grad(xd, qd, bd, rd)
    want = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3), allow_int=True))(x, qw, b, r)
    for name, g, w in (("x", got[0], want[0]), ("scale", got[1].scale, want[1].scale),
                       ("bias", got[2], want[2]), ("x3", got[3], want[3])):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        np.testing.assert_allclose(g, w, rtol=0, atol=16 * 2.0**-8 * (np.abs(w).max() + 1), err_msg=name)


def test_a_fractal_nz_weight_is_gathered_with_a_warning():
    """Its 4-D storage has factors of its own in the sharding rule and is never split."""
    mesh = _mesh("auto")
    rng = np.random.default_rng(5)
    qw = wq.quantize_weight(rng.standard_normal((K, N)).astype(np.float32), scale_dtype=jnp.bfloat16)
    nz = qw.with_layout(format="FRACTAL_NZ")
    x = jnp.asarray(rng.standard_normal((M, K)), jnp.bfloat16)
    xd = _place(mesh, x, P(None, "tp"))
    with pytest.warns(RuntimeWarning, match="a FRACTAL_NZ weight cannot be split along k here"):
        y = jax.jit(wq.quant_matmul)(xd, _place(mesh, nz, jax.tree.map(lambda _: P(), nz)))
    rank = dict(x1=np.asarray(x), codes=np.asarray(qw.data), scale=np.asarray(qw.scale))
    want, mag = oracle.wqmm([rank], 0, "int8")
    oracle.assert_close(y, want, mag, "bfloat16")
