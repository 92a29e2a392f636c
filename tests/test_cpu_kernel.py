"""The native CPU kernel (the default CPU lowering for int8 / int4 ND weights) against the oracle."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jax_wqmm as wq
from jax_wqmm import cpu_kernel, native
import oracle
from cases import make_case, to_jax


def _lowered(case):
    f = jax.jit(lambda *a: wq.weight_quant_matmul_all_reduce(*a, **case.kwargs))
    return f, f.lower(*to_jax(case.args)).as_text()


def test_kernel_is_the_default_cpu_lowering():
    case = make_case(np.random.default_rng(60), weight_dtype="int4", granularity="per_group",
                     group_size=32, offset=True, bias=True, x3=True)
    _, text = _lowered(case)
    assert f"custom_call @{cpu_kernel.MATMUL_TARGET}" in text
    # large m: the blocked bf16 kernel where it runs (bfloat16, ND, AVX-512 BF16), else W
    # dequantized in slabs for XLA's dot
    big = make_case(np.random.default_rng(61), lead=(cpu_kernel.SMALL_M + 1,))
    blocked = cpu_kernel.isa() == "avx512bf16"
    assert f"custom_call @{cpu_kernel.MATMUL_TARGET if blocked else cpu_kernel.DEQUANTIZE_TARGET}" in _lowered(big)[1]
    big16 = make_case(np.random.default_rng(61), lead=(cpu_kernel.SMALL_M + 1,), act="float16")
    assert f"custom_call @{cpu_kernel.DEQUANTIZE_TARGET}" in _lowered(big16)[1]
    fp8 = make_case(np.random.default_rng(62), weight_dtype="float8_e4m3fn")
    assert "custom_call" not in _lowered(fp8)[1]  # FP8 keeps the jnp reference
    nz = make_case(np.random.default_rng(63), fmt="FRACTAL_NZ")
    assert "custom_call" not in _lowered(nz)[1]


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 15, 16, 17, 64, 511, 2048])
@pytest.mark.parametrize("wd,gran,off,tr,act", [
    ("int8", "per_channel", True, False, "bfloat16"),
    ("int4", "per_group", True, False, "float16"),
    ("int8", "per_tensor", False, True, "float16"),
    ("int4", "per_channel", False, True, "bfloat16"),
    ("int4", "per_group", False, True, "bfloat16"),
])
def test_m_from_1_to_2048_odd_k_and_n(m, wd, gran, off, tr, act):
    # k = 161 and n = 37: not multiples of any tile, panel or vector width; odd n puts int4
    # rows at odd nibble offsets.
    case = make_case(np.random.default_rng(m), weight_dtype=wd, granularity=gran, offset=off,
                     bias=True, x3=True, lead=(m,), k=161, n=37, transpose=tr, act=act, group_size=64)
    f, text = _lowered(case)
    assert "custom_call" in text
    y = f(*to_jax(case.args))
    expected, mag = oracle.wqmm([case.oracle], case.group_size, wd)
    oracle.assert_close(y, expected, mag, act)


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 7, 8, 9, 16])
@pytest.mark.parametrize("wd,n", [("int8", 37), ("int4", 326)])
@pytest.mark.parametrize("gran,g", [("per_tensor", 0), ("per_channel", 0), ("per_group", 32),
                                    ("per_group", 96)])
@pytest.mark.parametrize("off", [False, True])
@pytest.mark.parametrize("tr,act", [(False, "bfloat16"), (True, "bfloat16"), (False, "float16")],
                         ids=["ND", "T", "ND-f16"])
def test_decode_kernels(m, wd, n, gran, g, off, tr, act):
    """bfloat16 activations: on AVX-512 BF16 machines the dot-product kernels. ND: int8 codes
    converted tile by tile for m <= 4 (16-row panels), int4 ones for m <= 7 looked up in tables
    per column and group unless groups are of 32 rows (64-row panels, 128-column strips; float16
    activations too, their weights widened to floats for float FMAs), else a panel's pairs
    built first (float16: the float-FMA kernel, whose m = 5..16 instead convert one vector of
    16 weights four rows of W ahead for every row of x, 32-row panels: k = 417 ends in a panel
    of one row); k = 417 is odd, ends in a partial chunk of 16 rows and leaves groups of 96
    split over panels; n is not a multiple of the 64-column tile
    nor of the 128-column strip (int4: two whole strips).
    Transposed: 32 k of a column per vector (int4 through a table per column and group); k =
    417 (int8) and 418 (int4, whose columns must start on bytes) end in a partial vector, n in
    a partial block of four columns, and m > 4 takes the chunked path."""
    k = 418 if tr and wd == "int4" else 417
    case = make_case(np.random.default_rng(m * 7 + len(gran)), weight_dtype=wd, granularity=gran,
                     offset=off, bias=True, x3=True, lead=(m,), k=k, n=n, group_size=g or 64,
                     transpose=tr, act=act)
    f, text = _lowered(case)
    assert f"custom_call @{cpu_kernel.MATMUL_TARGET}" in text
    expected, mag = oracle.wqmm([case.oracle], case.group_size, wd)
    oracle.assert_close(f(*to_jax(case.args)), expected, mag, act)


@pytest.mark.parametrize("m,wd,n,gran,k,act", [
    (1, "int4", 8224, "per_group", 288, "bfloat16"), (2, "int4", 6000, "per_group", 288, "bfloat16"),
    (16, "int8", 8224, "per_group", 288, "bfloat16"), (16, "int4", 8224, "per_group", 288, "bfloat16"),
    (3, "int4", 4096, "per_group", 288, "bfloat16"), (4, "int4", 8192, "per_channel", 417, "bfloat16"),
    (1, "int4", 8192, "per_group", 288, "float16")])
def test_decode_kernels_wide_n(m, wd, n, gran, k, act):
    """Wide W: at n = 8224 the built panels (m = 16) and the int4 lookup kernel's panels (m <= 7)
    shrink to 16 rows, at n = 6000 the lookup kernel's to 32 (so groups of 96 span several
    panels); the last tile and strip are ragged. At n = 4096 and 8192 (rows 2 and 4 KiB apart)
    the lookup kernel copies each panel strip-major first: groups of 96 over 64-row panels,
    and k = 417 per channel ending in a panel of one row."""
    case = make_case(np.random.default_rng(m + n), weight_dtype=wd, granularity=gran,
                     offset=True, lead=(m,), k=k, n=n, group_size=96, act=act)
    y = wq.weight_quant_matmul_all_reduce(*to_jax(case.args), **case.kwargs)
    expected, mag = oracle.wqmm([case.oracle], case.group_size, wd)
    oracle.assert_close(y, expected, mag, act)


@pytest.mark.parametrize("m", [64, 130, 1030])
@pytest.mark.parametrize("wd,n", [("int8", 1100), ("int4", 1102)])
@pytest.mark.parametrize("gran,g", [("per_tensor", 0), ("per_channel", 0), ("per_group", 96)])
@pytest.mark.parametrize("off", [False, True])
def test_bf16_blocked_kernel(m, wd, n, gran, g, off):
    """bfloat16 activations, ND storage, m >= 64: on AVX-512 BF16 machines the kernel blocked as
    a GEMM (panels of 256 rows of W over chunks of four 64-column tiles, the columns split
    between threads, at most 512 rows of x at a time). k = 601 is odd and spans three panels
    (per group: groups of 96, the last one short); n leaves a ragged last tile and chunk; m =
    130 a partial block of rows, m = 1030 three blocks of rows, the last partial."""
    case = make_case(np.random.default_rng(m + n + len(gran)), weight_dtype=wd, granularity=gran,
                     offset=off, bias=True, x3=True, lead=(m,), k=601, n=n, group_size=g or 64)
    f, text = _lowered(case)
    assert f"custom_call @{cpu_kernel.MATMUL_TARGET}" in text
    expected, mag = oracle.wqmm([case.oracle], case.group_size, wd)
    oracle.assert_close(f(*to_jax(case.args)), expected, mag, "bfloat16")


@pytest.mark.parametrize("m,k,n,g", [(3, 4096, 96, 128), (3, 1000, 130, 96), (3, 33, 1, 32),
                                     (20, 4096, 1100, 128), (40, 2048, 1537, 64)])
def test_wide_and_narrow_shapes(m, k, n, g):
    """Includes large-m calls whose weight is dequantized in several column slabs."""
    case = make_case(np.random.default_rng(k), weight_dtype="int4", granularity="per_group",
                     offset=True, lead=(m,), k=k, n=n, group_size=g)
    if m > cpu_kernel.SMALL_M:
        text = _lowered(case)[1]
        assert text.count(f"custom_call @{cpu_kernel.DEQUANTIZE_TARGET}") > 1
    y = wq.weight_quant_matmul_all_reduce(*to_jax(case.args), **case.kwargs)
    expected, mag = oracle.wqmm([case.oracle], g, "int4")
    oracle.assert_close(y, expected, mag, "bfloat16")


@pytest.mark.parametrize("act", ["bfloat16", "float16"])
@pytest.mark.parametrize("wd,gran,off", [("int4", "per_group", True), ("int8", "per_channel", False)])
@pytest.mark.parametrize("tr", [False, True], ids=["ND", "T"])
def test_large_m_dequantizes_in_column_slabs(act, wd, gran, off, tr):
    """m > SMALL_M at k = 4096: the weight is dequantized in slabs of 512 columns (the AVX-512
    dequantize where the CPU has it; transposed storage into the slab's transpose), the last
    one ragged (n = 1100), then XLA's dot; except bfloat16 ND with AVX-512 BF16, which the
    blocked kernel takes (one custom call, no dequantized weight)."""
    m = cpu_kernel.SMALL_M + 5
    case = make_case(np.random.default_rng(3), weight_dtype=wd, granularity=gran, offset=off,
                     bias=True, lead=(m,), k=4096, n=1100, act=act, group_size=128, transpose=tr)
    f, text = _lowered(case)
    if act == "bfloat16" and not tr and cpu_kernel.isa() == "avx512bf16":
        assert f"custom_call @{cpu_kernel.MATMUL_TARGET}" in text
        assert cpu_kernel.DEQUANTIZE_TARGET not in text
    else:
        assert text.count(f"custom_call @{cpu_kernel.DEQUANTIZE_TARGET}") == 3
    expected, mag = oracle.wqmm([case.oracle], case.group_size, wd)
    oracle.assert_close(f(*to_jax(case.args)), expected, mag, act)


def test_large_m_fuses_by_the_extensions_own_rule():
    """cpu_kernel.fused asks the extension which large-m calls its blocked bf16 kernel runs
    (the rule its dispatch follows): bfloat16, ND, int4 only with an even n, AVX-512 BF16."""
    blocked = native.extension().cpu_matmul_blocked
    here = cpu_kernel.isa() == "avx512bf16"
    assert blocked(bf16=True, transposed=False, int4=False, n=1101) == here
    assert blocked(bf16=True, transposed=False, int4=True, n=1100) == here
    assert not blocked(bf16=True, transposed=False, int4=True, n=1101)  # int4 rows must start on bytes
    assert not blocked(bf16=False, transposed=False, int4=False, n=1100)  # float16
    assert not blocked(bf16=True, transposed=True, int4=False, n=1100)


def test_kernel_inside_shard_map_then_xla_psum():
    mesh = Mesh(np.array(jax.devices()), ("tp",))
    case = make_case(np.random.default_rng(64), weight_dtype="int8", granularity="per_group",
                     group_size=32, offset=True, bias=True, k=8 * 64, n=40, lead=(4,))
    from test_shard_map import _rank_slices
    specs = (P(None, "tp"), P("tp", None), P("tp", None), P("tp", None), P())
    f = jax.jit(jax.shard_map(
        lambda *a: wq.weight_quant_matmul_all_reduce(*a, axis_name="tp", antiquant_group_size=32),
        mesh=mesh, in_specs=specs, out_specs=P()))
    args = [jax.device_put(jnp.asarray(a), NamedSharding(mesh, s)) for a, s in zip(case.args[:5], specs)]
    text = f.lower(*args).as_text()
    assert f"custom_call @{cpu_kernel.MATMUL_TARGET}" in text and "all_reduce" in text
    expected, mag = oracle.wqmm(_rank_slices(case, 8), 32, "int8")
    oracle.assert_close(f(*args), expected, mag, case.act, ranks=8)


@pytest.mark.parametrize("isa", ["portable", "avx2", "avx512"])
def test_every_instruction_set_path_agrees_with_the_oracle(isa):
    """The kernel copies for lower instruction sets (forced with JAX_WQMM_CPU_ISA); the default
    run of the other tests covers the best one here (avx512bf16 on this machine). float16 at
    m = 6 on avx512: int4 takes the float-FMA kernel's all-rows path, which the lookup kernel
    takes from it on AVX-512 BF16; m = 17: its built panels."""
    code = textwrap.dedent("""
        import sys, numpy as np
        sys.path.insert(0, sys.argv[1])
        import conftest, jax_wqmm as wq, oracle
        from jax_wqmm import cpu_kernel
        from cases import make_case, to_jax
        print("isa", cpu_kernel.isa())
        for m, act in ((1, "bfloat16"), (3, "bfloat16"), (8, "bfloat16"), (40, "bfloat16"),
                       (6, "float16"), (17, "float16")):
            for wd, gran, tr in (("int8", "per_channel", False), ("int4", "per_group", False),
                                 ("int4", "per_tensor", True)):
                case = make_case(np.random.default_rng(m), weight_dtype=wd, granularity=gran,
                                 offset=True, bias=True, lead=(m,), k=161, n=37, transpose=tr,
                                 group_size=64, act=act)
                y = wq.weight_quant_matmul_all_reduce(*to_jax(case.args), **case.kwargs)
                e, mag = oracle.wqmm([case.oracle], case.group_size, wd)
                oracle.assert_close(y, e, mag, act)
        print("ok")
    """)
    tests = os.path.dirname(__file__)
    out = subprocess.run([sys.executable, "-c", code, tests], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, JAX_WQMM_CPU_ISA=isa, JAX_PLATFORMS="cpu"), cwd=tests)
    assert out.returncode == 0, out.stdout + out.stderr
    # a machine without the requested instruction set downgrades, never upgrades
    want = {"portable": ("portable",), "avx2": ("avx2", "portable"),
            "avx512": ("avx512", "avx2", "portable")}[isa]
    assert out.stdout.splitlines()[0].split()[1] in want
    assert out.stdout.strip().endswith("ok")


def test_reference_lowering_can_be_restored():
    import jax_wqmm.testing as wqt
    case = make_case(np.random.default_rng(65))
    wqt.use_reference()
    try:
        assert "custom_call" not in _lowered(case)[1]
    finally:
        wqt.use_default()
    assert "custom_call" in _lowered(case)[1]


def test_import_does_not_initialize_jax_backends():
    """Registering the CPU kernel and probing for an NPU platform at import must leave JAX
    configurable: users set jax_num_cpu_devices after importing jax_wqmm."""
    code = ("import jax_wqmm, jax\n"
            "jax.config.update('jax_num_cpu_devices', 3)\n"
            "print(len(jax.devices()), jax_wqmm.cpu_kernel.isa())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"), cwd=os.path.dirname(__file__))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "3"


def test_an_unknown_isa_setting_is_refused_naming_the_choices():
    out = subprocess.run([sys.executable, "-c", "import jax_wqmm"], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, JAX_WQMM_CPU_ISA="bogus", JAX_PLATFORMS="cpu"),
                         cwd=os.path.dirname(__file__))
    assert out.returncode != 0
    assert "JAX_WQMM_CPU_ISA='bogus': must be one of avx512bf16, avx512, avx2, portable" in out.stderr


def test_the_rate_probes_measure_what_this_cpu_runs():
    """peak_mac_rate / convert_rate: positive where the instruction runs, 0.0 where the kernel
    that uses it does not (portable path; the conversion probe needs AVX-512 BF16), and a clear
    error for an unknown choice. Rates, not timings: nothing here depends on the machine's load
    beyond being nonzero."""
    isa = cpu_kernel.isa()
    assert (cpu_kernel.peak_mac_rate(0.01) > 0) == (isa != "portable")
    assert (cpu_kernel.peak_mac_rate(0.01, instruction="fma") > 0) == (isa != "portable")
    for wd in ("int8", "int4"):
        for rows in cpu_kernel.CONVERT_ROWS:
            assert (cpu_kernel.convert_rate(wd, 0.01, rows=rows) > 0) == (isa == "avx512bf16")
    if isa == "avx512bf16":  # 16 rows: 16 dot products per converted pair, 64 per step: it runs them
        assert 1.5 * cpu_kernel.convert_rate("int8", 0.05, rows=16) < cpu_kernel.convert_rate("int8", 0.05)
        with pytest.raises(ValueError, match="rows=3: must be 0, 1, 2, 4, 8 or 16"):  # the extension's own check
            native.extension().cpu_convert_rate(False, 3, 0.01)
    with pytest.raises(ValueError, match=r"rows=3: must be one of \(0, 1, 2, 4, 8, 16\)"):
        cpu_kernel.convert_rate("int8", rows=3)
    with pytest.raises(ValueError, match="instruction='vnni': must be 'widest' or 'fma'"):
        cpu_kernel.peak_mac_rate(instruction="vnni")
    with pytest.raises(ValueError, match="weight_dtype='float8_e4m3fn': must be 'int8' or 'int4'"):
        cpu_kernel.convert_rate("float8_e4m3fn")
