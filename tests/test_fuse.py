"""``wq.fuse``: the user's psum over a quantized matmul becomes the fused operator.

Each style runs with the emulator as the NPU (the HLO must hold one fused custom call per
reduced matmul and no all-reduce) and with the default CPU lowering; results and grads are
compared with the same function unfused (the reference lowering) and the float64 oracle.
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jax_wqmm as wq
import jax_wqmm.testing as wqt
from jax_wqmm import layers
import oracle

K, N, M = 8 * 64, 48, 5
ROW = P(None, "tp")


@pytest.fixture(scope="module")
def mesh():
    return Mesh(np.array(jax.devices()), ("tp",))


@pytest.fixture
def emulated(mesh):
    emu = wqt.use_emulator()
    wqt.create_groups(mesh, "tp")
    yield emu
    wqt.destroy_groups()
    wqt.use_default()


def _operands(mesh, act=jnp.bfloat16, seed=0):
    rng = np.random.default_rng(seed)
    qw = wq.quantize_weight(rng.standard_normal((K, N)).astype(np.float32), dtype="int4",
                            granularity="per_group", group_size=32, symmetric=False, scale_dtype=act)
    x = jnp.asarray(rng.standard_normal((M, K)), act)
    b = jnp.asarray(rng.standard_normal((N,)), act)
    r = jnp.asarray(rng.standard_normal((M, N)), act)
    qspecs = layers.row_parallel_specs(qw)
    put = lambda a, s: jax.tree.map(lambda v, sp: jax.device_put(v, NamedSharding(mesh, sp)), a, s)
    return put((x, qw, b, r), (ROW, qspecs, P(), P())), (ROW, qspecs, P(), P()), qw


def _oracle(x, qw, bias_terms):
    """psum over 8 ranks of x_r @ W_r, plus bias_terms (already summed over ranks)."""
    rank = dict(x1=np.asarray(x), codes=np.asarray(qw.data), scale=np.asarray(qw.scale),
                offset=np.asarray(qw.offset))
    y, mag = oracle.wqmm([rank], 32, "int4")
    return y + bias_terms, mag + np.abs(bias_terms)


# each style: (body, what it adds per rank before / after the sum, fused sites, extra adds)
STYLES = {
    "psum": (lambda x, q, b, r: lax.psum(wq.quant_matmul(x, q), "tp"), lambda b, r: 0),
    "psum_plus_bias_inside": (lambda x, q, b, r: lax.psum(wq.quant_matmul(x, q) + b, "tp"), lambda b, r: 8 * b),
    "psum_plus_residual_inside": (lambda x, q, b, r: lax.psum(r + wq.quant_matmul(x, q), "tp"), lambda b, r: 8 * r),
    "psum_plus_both_inside": (lambda x, q, b, r: lax.psum(wq.quant_matmul(x, q) + b + r, "tp"), lambda b, r: 8 * (b + r)),
    "bias_after_the_sum": (lambda x, q, b, r: lax.psum(wq.quant_matmul(x, q), "tp") + b, lambda b, r: b),
}


def _f(mesh, specs, body):
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=P()))


@pytest.mark.parametrize("style", list(STYLES))
def test_fused_on_the_emulated_npu(mesh, emulated, style):
    body, extra = STYLES[style]
    args, specs, qw = _operands(mesh)
    fused = wq.fuse(_f(mesh, specs, body))
    text = jax.jit(fused).lower(*args).as_text()
    assert text.count(f"@{wqt.HOST_TARGET}") == 1 and "all_reduce" not in text, text
    compiled = jax.jit(fused).lower(*args).compile().as_text()
    assert "all-reduce" not in compiled and "all-gather" not in compiled
    assert len(fused.last_report.fused) == 1 and not fused.last_report.skipped
    y = fused(*args)
    b, r = np.asarray(args[2], np.float64), np.asarray(args[3], np.float64)
    want, mag = _oracle(args[0], qw, extra(b, r))
    oracle.assert_close(y, want, mag, "bfloat16", ranks=8)


@pytest.mark.parametrize("style", list(STYLES))
def test_fused_with_the_default_cpu_lowering_equals_unfused(mesh, style):
    body, _ = STYLES[style]
    args, specs, _ = _operands(mesh, jnp.float16, seed=1)
    f = _f(mesh, specs, body)
    fused = wq.fuse(f)
    text = jax.jit(fused).lower(*args).compile().as_text()
    assert "all-gather" not in text  # the weight stays sharded
    ref = np.asarray(f(*args), np.float64)
    y = np.asarray(fused(*args), np.float64)
    np.testing.assert_allclose(y, ref, rtol=0, atol=8 * 2.0**-10 * (np.abs(ref).max() + 1))


@pytest.mark.parametrize("style", ["psum_plus_bias_inside", "psum_plus_both_inside"])
def test_grads_equal_the_unfused_functions(mesh, emulated, style):
    """d/dx, d/dbias, d/dresidual and d/dscale of the fused function equal the unfused
    reference's (the emulator runs the forward on the native path)."""
    body, _ = STYLES[style]
    args, specs, _ = _operands(mesh, seed=2)
    f = _f(mesh, specs, body)
    loss = lambda fn: jax.jit(jax.grad(lambda x, q, b, r: fn(x, q, b, r).astype(jnp.float32).sum(),
                                       argnums=(0, 1, 2, 3), allow_int=True))
    got = loss(wq.fuse(f))(*args)
    wqt.use_reference()
    try:
        want = loss(f)(*args)
    finally:
        wqt.use_emulator()
    for name, g, w in (("x", got[0], want[0]), ("bias", got[2], want[2]), ("residual", got[3], want[3]),
                       ("scale", got[1].scale, want[1].scale), ("offset", got[1].offset, want[1].offset)):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        np.testing.assert_allclose(g, w, rtol=0, atol=16 * 2.0**-8 * (np.abs(w).max() + 1), err_msg=name)


def test_a_result_used_twice_is_left_alone(mesh):
    args, specs, qw = _operands(mesh, seed=3)

    def body(x, q, b, r):
        y = wq.quant_matmul(x, q)
        return lax.psum(y, "tp") + lax.psum(y * 0, "tp")

    fused = wq.fuse(_f(mesh, specs, body))
    y = fused(*args)
    assert fused.last_report.fused == [] and fused.last_report.skipped[0][1] == "its result is also used elsewhere"
    want, mag = _oracle(args[0], qw, 0)
    oracle.assert_close(y, want, mag, "bfloat16", ranks=8)


@pytest.mark.parametrize("scale_first", [True, False])
def test_other_patterns_are_left_as_written(mesh, scale_first):
    args, specs, qw = _operands(mesh, seed=4)
    if scale_first:
        body = lambda x, q, b, r: lax.psum(2 * wq.quant_matmul(x, q), "tp")
        why, factor = "its result feeds mul, not a psum", 2
    else:
        body = lambda x, q, b, r: lax.psum(wq.quant_matmul(x, q), "tp") * 0 + lax.psum(r, "tp")
        why, factor = None, None
    fused = wq.fuse(_f(mesh, specs, body))
    y = np.asarray(fused(*args), np.float64)
    if scale_first:
        assert fused.last_report.fused == [] and fused.last_report.skipped == [(fused.last_report.skipped[0][0], why)]
        want, mag = _oracle(args[0], qw, 0)
        oracle.assert_close(y, factor * want, factor * mag, "bfloat16", ranks=8)
    else:  # psum of something else is untouched, the matmul's psum fuses
        assert len(fused.last_report.fused) == 1
        np.testing.assert_allclose(y, 8 * np.asarray(args[3], np.float64), rtol=2**-7)


def test_composes_with_vmap_and_nested_jit(mesh):
    args, specs, qw = _operands(mesh, seed=5)
    body = STYLES["psum_plus_bias_inside"][0]
    f = _f(mesh, specs, body)
    xs = jnp.stack([args[0], args[0] * 2])
    batched = jax.jit(jax.vmap(wq.fuse(jax.jit(f)), in_axes=(0, None, None, None)))
    y = np.asarray(batched(xs, *args[1:]), np.float64)
    ref = np.asarray(jax.vmap(f, in_axes=(0, None, None, None))(xs, *args[1:]), np.float64)
    np.testing.assert_allclose(y, ref, rtol=0, atol=16 * 2.0**-8 * (np.abs(ref).max() + 1))


def test_report_goes_to_the_logger(mesh, caplog):
    args, specs, _ = _operands(mesh, seed=6)
    fused = wq.fuse(_f(mesh, specs, STYLES["psum"][0]), report=True)
    with caplog.at_level("WARNING", logger="jax_wqmm.fuse"):
        fused(*args)
    assert "1 site(s) fused, 0 left as written" in caplog.text
    assert str(fused.last_report).splitlines()[1].startswith("  fused: 5x64x48 int4 per_group over ('tp',)")
