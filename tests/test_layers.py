"""Tensor-parallel layers, the example decoder layer, and the same layer across processes."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jax_wqmm as wq
from jax_wqmm import layers
import oracle

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))
import llama_tp as ex  # noqa: E402


def _put(mesh, tree, specs):
    return jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), tree, specs)


def test_row_parallel_adds_bias_and_residual_once():
    mesh = Mesh(np.array(jax.devices()), ("tp",))
    rng = np.random.default_rng(50)
    k, n = 8 * 64, 32
    w = rng.standard_normal((k, n)).astype(np.float32)
    qw = wq.quantize_weight(w, dtype="int4", granularity="per_group", group_size=32, symmetric=False,
                            scale_dtype=jnp.float16)
    x = rng.standard_normal((3, k)).astype(np.float16)
    bias = rng.standard_normal((n,)).astype(np.float16)
    res = rng.standard_normal((3, n)).astype(np.float16)
    specs = (P(None, "tp"), layers.row_parallel_specs(qw), P(), P())
    f = jax.jit(jax.shard_map(lambda x, q, b, r: layers.row_parallel_linear(x, q, bias=b, residual=r),
                              mesh=mesh, in_specs=specs, out_specs=P()))
    y = f(*_put(mesh, (jnp.asarray(x), qw, jnp.asarray(bias), jnp.asarray(res)), specs))
    rank = dict(x1=x, codes=np.asarray(qw.data), scale=np.asarray(qw.scale), offset=np.asarray(qw.offset),
                bias=bias, x3=res)
    expected, mag = oracle.wqmm([rank], 32, "int4")  # bias and residual counted once
    oracle.assert_close(y, expected, mag, "float16", ranks=8)


def test_column_parallel_gives_each_rank_its_columns():
    mesh = Mesh(np.array(jax.devices()), ("tp",))
    rng = np.random.default_rng(51)
    k, n = 64, 8 * 16
    qw = wq.quantize_weight(rng.standard_normal((k, n)).astype(np.float32), dtype="int8",
                            scale_dtype=jnp.bfloat16)
    x = rng.standard_normal((2, 5, k)).astype(jnp.bfloat16)
    bias = rng.standard_normal((n,)).astype(jnp.bfloat16)
    specs = (P(), layers.column_parallel_specs(qw), P("tp"))
    f = jax.jit(jax.shard_map(lambda x, q, b: layers.column_parallel_linear(x, q, bias=b),
                              mesh=mesh, in_specs=specs, out_specs=P(None, None, "tp")))
    y = f(*_put(mesh, (jnp.asarray(x), qw, jnp.asarray(bias)), specs))
    rank = dict(x1=x, codes=np.asarray(qw.data), scale=np.asarray(qw.scale), bias=bias)
    expected, mag = oracle.wqmm([rank], 0, "int8")
    oracle.assert_close(y, expected, mag, "bfloat16")


def test_specs_reject_nz_weights():
    qw = wq.quantize_weight(jnp.ones((64, 64)), dtype="int8").with_layout(format="FRACTAL_NZ")
    with pytest.raises(NotImplementedError, match="FRACTAL_NZ"):
        layers.row_parallel_specs(qw)


@pytest.mark.parametrize("mode,tp", [("int8", 8), ("int4", 2)])
def test_example_layer_matches_unsharded_model(mode, tp):
    """The tensor-parallel layer equals the unsharded float32 model on the same dequantized
    weights, up to bf16 rounding (a bias or residual added tp times would be far off)."""
    cfg = ex.Config(hidden=512, heads=8, intermediate=1024, batch=1, seq=8)
    mesh = Mesh(np.array(jax.devices()[:tp]), ("tp",))
    p = ex.init_params(jax.random.key(0), cfg)
    q = ex.quantize_params(p, mode)
    step, qs = ex.make_step(mesh, cfg, q)
    x = ex.inputs(cfg)
    y = np.asarray(step(qs, jax.device_put(jnp.asarray(x, jnp.bfloat16), NamedSharding(mesh, P()))), np.float64)
    p_hat = dict(p, **{n: wq.dequantize_weight(q[n]) for n in ex.COLUMN + ex.ROW})
    want = np.asarray(ex.decoder_layer_f32(p_hat, jnp.asarray(x), cfg), np.float64)
    update = np.linalg.norm(want - x)
    assert np.linalg.norm(y - want) / update < 0.03
    # the failure this guards against, the row-parallel bias counted tp times, is well outside
    wrong = want + (tp - 1) * np.asarray(p["b_down"], np.float64)
    assert np.linalg.norm(wrong - want) / update > 0.1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    worker = Path(__file__).with_name("distributed_worker.py")
    procs = [subprocess.Popen([sys.executable, str(worker), str(port), str(i), str(tmp_path / f"y{i}.npy"),
                               str(EXAMPLES)], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    try:
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    # the single-process run: 8 local devices, same mesh shape and data
    cfg = ex.Config(hidden=256, heads=8, intermediate=512, batch=1, seq=8)
    mesh = Mesh(np.array(jax.devices()), ("tp",))
    step, qs = ex.make_step(mesh, cfg, ex.quantize_params(ex.init_params(jax.random.key(0), cfg), "int8"))
    x = ex.inputs(cfg)
    y = np.asarray(step(qs, jax.device_put(jnp.asarray(x, jnp.bfloat16), NamedSharding(mesh, P()))), np.float32)
    for i in range(2):
        got = np.load(tmp_path / f"y{i}.npy")
        np.testing.assert_allclose(got, y, rtol=2e-2, atol=2e-2 * np.abs(y).max())


# ----------------------------------------------------------------------------- friction a new user met

def test_group_size_that_does_not_divide_the_ranks_k_is_named_early():
    w = jnp.ones((4096, 64))
    msg = r"group_size=384: must divide k / tp = 4096 / 8 = 512 \(each rank holds whole groups\)"
    with pytest.raises(wq.ConstraintError, match=msg):
        wq.quantize_weight(w, dtype="int4", granularity="per_group", group_size=384, tp=8)
    qw = wq.quantize_weight(w, dtype="int4", granularity="per_group", group_size=384)
    with pytest.raises(wq.ConstraintError, match=msg):
        layers.row_parallel_specs(qw, tp=8)
    # a group the size of a rank's k breaks the operator's group <= k - 1 rule, with that k
    with pytest.raises(wq.ConstraintError, match=r"k-1\] with k=512 \(each rank's k = k / tp = 4096 / 8\)"):
        wq.quantize_weight(w, dtype="int4", granularity="per_group", group_size=512, tp=8)
    with pytest.raises(wq.ConstraintError, match="n=64 does not split over 3 ranks"):
        layers.column_parallel_specs(qw, tp=3)
    assert layers.row_parallel_specs(wq.quantize_weight(w, dtype="int4", granularity="per_group",
                                                        group_size=128, tp=8), tp=8).data == P("tp", None)


def test_row_parallel_linear_outside_shard_map_names_the_axis():
    qw = wq.quantize_weight(jnp.ones((64, 16)))
    with pytest.raises(wq.ConstraintError, match="axis_name='model': mesh axis 'model' is not bound here: call row_parallel_linear inside jax.shard_map"):
        layers.row_parallel_linear(jnp.ones((2, 64), jnp.bfloat16), qw, axis_name="model")


def test_layer_errors_name_the_layers_arguments():
    mesh = Mesh(np.array(jax.devices()), ("tp",))
    qw = wq.quantize_weight(jnp.ones((8 * 64, 16)), scale_dtype=jnp.bfloat16)
    specs = (P(None, "tp"), layers.row_parallel_specs(qw), P())
    f = jax.shard_map(lambda x, q, r: layers.row_parallel_linear(x, q, residual=r),
                      mesh=mesh, in_specs=specs, out_specs=P())
    with pytest.raises(wq.ConstraintError, match=r"^residual='dtype float32': must be x's dtype bfloat16: cast it with .astype\(jnp.bfloat16\)"):
        jax.jit(f).trace(jnp.ones((2, 8 * 64), jnp.bfloat16), qw, jnp.ones((2, 16), jnp.float32))
    with pytest.raises(wq.ConstraintError, match=r"^residual='shape \(2, 15\)': must have the output's shape \(2, 16\)"):
        jax.jit(f).trace(jnp.ones((2, 8 * 64), jnp.bfloat16), qw, jnp.ones((2, 15), jnp.bfloat16))


def test_quantize_weight_scale_dtype_must_be_an_activation_dtype():
    with pytest.raises(wq.ConstraintError, match="scale_dtype='float32': must be float16 or bfloat16"):
        wq.quantize_weight(jnp.ones((64, 16)), scale_dtype=jnp.float32)


@pytest.mark.parametrize("npu", [False, True], ids=["cpu", "emulated_npu"])
def test_example_layer_auto_sharded_form_equals_the_shard_map_form(npu):
    """The plain-jit form of the example layer (weights placed with NamedSharding, no
    shard_map) gives the shard_map form's output; under the emulator its compiled module
    runs one fused custom call per row-parallel projection, no all-reduce, and gathers no
    weight."""
    import jax_wqmm.testing as wqt

    cfg = ex.Config(hidden=512, heads=8, intermediate=1024, batch=1, seq=8)
    q = ex.quantize_params(ex.init_params(jax.random.key(0), cfg), "int8")
    mesh = jax.make_mesh((8,), ("tp",), axis_types=(jax.sharding.AxisType.Auto,))
    x = jnp.asarray(ex.inputs(cfg), jnp.bfloat16)
    if npu:
        wqt.use_emulator()
        wqt.create_groups(mesh, "tp")
    try:
        step, qs = ex.make_step(mesh, cfg, q)
        auto, qa = ex.make_auto_step(mesh, cfg, q)
        xs = jax.device_put(x, NamedSharding(mesh, P()))
        y_map, y_auto = np.asarray(step(qs, xs), np.float64), np.asarray(auto(qa, xs), np.float64)
        np.testing.assert_allclose(y_auto, y_map, rtol=0, atol=2**-6 * (np.abs(y_map).max() + 1))
        if npu:
            text = auto.lower(qa, xs).compile().as_text()
            assert text.count(f'custom_call_target="{wqt.HOST_TARGET}"') == 2 and "all-reduce" not in text
            weights = {f"{v.data.shape[0]},{v.data.shape[1]}" for n, v in q.items() if n in ex.COLUMN + ex.ROW}
            gathers = [line for line in text.splitlines() if "all-gather(" in line]
            assert not any(f"[{w}]" in line for line in gathers for w in weights), gathers
    finally:
        if npu:
            wqt.destroy_groups()
            wqt.use_default()
