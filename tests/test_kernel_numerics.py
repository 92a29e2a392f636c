"""Every path rounds as the Ascend kernel does (the numeric contract, README "Numerics").

- The dequantized weight each lowering uses, extracted with x1 = rows of the identity, is
  bit-identical to the kernel's rule (oracle.kernel_dequantize) for every weight dtype x
  granularity x offset x float16 / bfloat16, ND, transposed and FRACTAL_NZ storage: the jnp
  reference, the CPU kernels (fused small-m, both decode paths, and the large-m dequantize
  path; every instruction-set copy in a subprocess) and the emulator of CANN.
- With inputs whose float32 accumulation is exact, the output with bias and x3 is
  bit-identical to the kernel's epilogue (round after bias, add x3, round again) at tp = 1.
"""

import itertools
import os
import subprocess
import sys
import textwrap
import zlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jax_wqmm as wq
import jax_wqmm.testing as wqt
from jax_wqmm import cpu_kernel
import oracle
from cases import make_case, to_jax

LOWERINGS = ("reference", "cpu", "emulator")
# identity rows, repeated past the CPU kernel's SMALL_M and its 512-row blocks: the large-m
# path (the blocked bf16 kernel, or the dequantize for XLA's dot)
LARGE_M = np.arange(2 * cpu_kernel.SMALL_M + 3) % 64


@pytest.fixture(scope="module")
def one_device_group():
    """A one-device mesh with an (emulated) HCCL group, for the emulator at tp = 1."""
    emu = wqt.use_emulator()
    mesh = jax.make_mesh((1,), ("one",), devices=jax.devices()[:1])
    wqt.create_groups(mesh, "one")
    wqt.use_default()
    yield mesh, emu
    wqt.destroy_groups()
    wqt.use_default()


def _call(lowering, args, kwargs, mesh, emu, soc):
    """The op over ``args`` (x1, x2, scale, offset, bias, x3; None where absent) lowered by
    ``lowering``, as a float64 array."""
    present = [a is not None for a in args]
    arrays = [jnp.asarray(a) for a in args if a is not None]

    def f(*a):
        it = iter(a)
        full = [next(it) if p else None for p in present]
        return wq.weight_quant_matmul_all_reduce(*full, axis_name="one" if lowering == "emulator" else None, **kwargs)

    if lowering == "reference":
        wqt.use_reference()
    elif lowering == "emulator":
        wqt.use_emulator()
    try:
        if lowering == "emulator":
            with emu.emulating(soc):
                g = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P(), out_specs=P()))
                return np.asarray(g(*arrays))
        return np.asarray(jax.jit(f)(*arrays))
    finally:
        wqt.use_default()


def _cases():
    for wd, gran, off, act, layout in itertools.product(
            ("int8", "int4", "float8_e4m3fn", "hifloat8"), ("per_tensor", "per_channel", "per_group"),
            (False, True), ("bfloat16", "float16"), ("ND", "T", "NZ")):
        fp8 = wd in ("float8_e4m3fn", "hifloat8")
        if fp8 and (gran != "per_channel" or off or layout == "NZ"):
            continue
        if layout == "NZ" and gran != "per_channel":
            continue
        yield pytest.param(wd, gran, off, act, layout, id=f"{wd}-{gran}-{'off' if off else 'sym'}-{act}-{layout}")


def _weight_case(wd, gran, off, act, layout, k=64, n=240, group_size=32):
    # n = 240: whole 64-column tiles and a ragged one; a whole 128-column strip of the int4
    # lookup kernel and a ragged one
    rng = np.random.default_rng(zlib.crc32(repr((wd, gran, off, act, layout)).encode()))
    case = make_case(rng, weight_dtype=wd, granularity=gran, offset=off, lead=(1,), k=k, n=n,
                     transpose=layout == "T", fmt="FRACTAL_NZ" if layout == "NZ" else "ND",
                     act=act, group_size=group_size)
    if off:  # offsets that are not integers: (q + o) itself rounds in float16
        o = case.oracle["offset"]
        o = (o.astype(np.float32) + rng.uniform(-1, 1, o.shape)).astype(o.dtype)
        case.oracle["offset"] = o
        case.args = case.args[:3] + (o,) + case.args[4:]
    o = case.oracle
    values = oracle.decode(o["codes"], wd)
    expand = lambda p: None if p is None else oracle.expand(np.asarray(p, np.float64), k, n, case.group_size)
    want = oracle.kernel_dequantize(values, expand(o["scale"]), expand(o["offset"]), act)
    return case, want


def _bits(a, act):
    return np.asarray(a).astype(oracle.ACT_NP[act]).view(np.uint16)


@pytest.mark.parametrize("wd,gran,off,act,layout", list(_cases()))
def test_dequantized_weight_is_the_kernels_rule(one_device_group, wd, gran, off, act, layout):
    mesh, emu = one_device_group
    case, want = _weight_case(wd, gran, off, act, layout)
    k = want.shape[0]
    eye = np.eye(k).astype(oracle.ACT_NP[act])
    soc = "Ascend950PR" if wd in ("float8_e4m3fn", "hifloat8") else "Ascend910B4"
    # the rows each path sees: more than SMALL_M (the large-m path), all k = 64
    # (the blocked bf16 kernel), 16 (the fused kernel's built panels), 2 and 1 (its direct decode)
    for rows in (LARGE_M, slice(0, k), slice(16, 32), slice(5, 7), slice(63, 64)):
        args = (eye[rows],) + case.args[1:]
        for lowering in LOWERINGS if isinstance(rows, slice) and rows.start == 0 else ("cpu",):
            got = _call(lowering, args, case.kwargs, mesh, emu, soc)
            np.testing.assert_array_equal(_bits(got, act), _bits(want[rows], act),
                                          err_msg=f"{lowering}, rows {rows}")


@pytest.mark.parametrize("act", ["bfloat16", "float16"])
@pytest.mark.parametrize("off", [False, True])
def test_int4_lookup_tables_round_as_the_kernel(act, off):
    """int4 with groups of 64 rows or more and m <= 7 takes the lookup kernel on AVX-512 BF16
    CPUs (its tables hold the rounded weights of each column and group); the other weight
    tests use groups of 32, which the conversion kernel takes. Weights bit for bit at m = 1,
    4 and 7, over two groups, two whole 128-column strips and a ragged one."""
    k = 128
    case, want = _weight_case("int4", "per_group", off, act, "ND", k=k, n=326, group_size=64)
    eye = np.eye(k).astype(oracle.ACT_NP[act])
    for rows in (slice(70, 71), slice(60, 64), slice(100, 107)):  # m = 1, 4 and 7
        got = wq.weight_quant_matmul_all_reduce(*to_jax((eye[rows],) + case.args[1:]), **case.kwargs)
        np.testing.assert_array_equal(_bits(got, act), _bits(want[rows], act), err_msg=f"rows {rows}")


@pytest.mark.parametrize("layout", ["ND", "T"])
@pytest.mark.parametrize("pattern", ["range", "one lane"])
def test_huge_scales_round_as_the_kernel(layout, pattern):
    """int8 without an offset computes q * s as fma(kMagic + q, s, -kMagic * s) where that is
    exact; scales of 2^100 and beyond take the plain multiply. Both are the kernel's rule.
    "range": scales from 2^95 to 2^115 over the columns; "one lane": a single scale of 2^110
    (column 5, inside the first whole tile of 64 columns, whose scales are read as vectors)
    among small ones: that vector's check alone must see it."""
    case, _ = _weight_case("int8", "per_channel", False, "bfloat16", layout)
    n = case.oracle["scale"].shape[-1]
    if pattern == "range":
        exponents = np.linspace(95, 115, n)
    else:
        exponents = np.linspace(-4, 4, n)
        exponents[5] = 110
    scale = (2.0 ** exponents).astype(ml_dtypes.bfloat16)
    case.oracle["scale"] = scale
    args = case.args[:2] + (scale,) + case.args[3:]
    want = oracle.kernel_dequantize(oracle.decode(case.oracle["codes"], "int8"),
                                    oracle.expand(scale.astype(np.float64), 64, n, 0), None, "bfloat16")
    eye = np.eye(64).astype(ml_dtypes.bfloat16)
    for rows in (slice(0, 64), slice(16, 32), slice(5, 7), slice(63, 64)):  # blocked, built, direct
        f = jax.jit(lambda *a: wq.weight_quant_matmul_all_reduce(*a, **case.kwargs))
        got = np.asarray(f(*map(jnp.asarray, (eye[rows],) + args[1:3])))
        np.testing.assert_array_equal(_bits(got, "bfloat16"), _bits(want[rows], "bfloat16"), err_msg=f"rows {rows}")


@pytest.mark.parametrize("wd", ["int8", "int4"])
@pytest.mark.parametrize("off", [False, True])
def test_float16_weights_at_the_ends_of_the_range_round_as_the_kernel(wd, off):
    """float16 activations: scales that put (q + o) * s among float16's subnormals, and (in
    columns of zero codes but one, without an offset) past its largest value, to inf: through
    the float16 decode kernel (the CPU's own conversions) at m = 64, 2 and 1."""
    case, _ = _weight_case(wd, "per_channel", off, "float16", "ND")
    n = case.oracle["scale"].shape[-1]
    scale = np.concatenate([2.0 ** np.linspace(-30, -16, n - 8), np.full(8, 6e4)]).astype(np.float16)
    codes = oracle.decode(case.oracle["codes"], wd).copy()
    x2 = case.args[1]
    if not off:  # the last eight columns: one code of 5 (5 * 6e4 > 65504), the rest 0
        codes[:, -8:] = 0
        codes[np.arange(8) * 7, np.arange(n - 8, n)] = 5
        x2 = codes.astype(x2.dtype)
    offset = case.oracle["offset"]
    args = (x2, scale, offset)
    with np.errstate(over="ignore"):  # the infs are the point
        want = oracle.kernel_dequantize(codes, oracle.expand(scale.astype(np.float64), 64, n, 0),
                                        None if offset is None else oracle.expand(np.asarray(offset, np.float64), 64, n, 0),
                                        "float16")
    assert np.any((want != 0) & (np.abs(want) < 2.0 ** -14))
    assert off or np.sum(np.isinf(want)) == 8
    eye = np.eye(64).astype(np.float16)
    f = jax.jit(lambda *a: wq.weight_quant_matmul_all_reduce(*a, **case.kwargs))
    for rows in (slice(0, 64), slice(5, 7), slice(63, 64)):
        got = np.asarray(f(*map(jnp.asarray, (eye[rows],) + tuple(a for a in args if a is not None))))
        # as values (a sum of +0 and -0 is +0), where no weight of the column is inf (0 * inf
        # is NaN in the sum)
        infs = np.sum(np.isinf(want), axis=0)
        keep = np.broadcast_to((infs == 0) | ((infs == 1) & np.isinf(want[rows])), got.shape)
        np.testing.assert_array_equal(got.astype(np.float64)[keep], want[rows].astype(np.float64)[keep],
                                      err_msg=f"rows {rows}")


def test_the_rule_is_not_single_rounding():
    """The float16 rule rounds q + o first: a single rounding of (q + o) * s differs."""
    _, want = _weight_case("int8", "per_channel", True, "float16", "ND")
    case, _ = _weight_case("int8", "per_channel", True, "float16", "ND")
    o = case.oracle
    exact = (oracle.decode(o["codes"], "int8") + o["offset"].astype(np.float64)) * o["scale"].astype(np.float64)
    assert np.mean(_bits(exact.astype(np.float16), "float16") != _bits(want, "float16")) > 0.05


def _exact_case(rng, m, k, n, act, wd, off, bias, x3):
    """Integer codes, power-of-two scales, integer offsets and small-integer activations: the
    float32 matmul sum is exact; bias and x3 are arbitrary."""
    dt = oracle.ACT_NP[act]
    codes = rng.integers(-8, 8, (k, n)).astype(np.int8)
    scale = (2.0 ** rng.integers(-4, -1, (n,))).astype(dt)
    offset = rng.integers(-3, 4, (n,)).astype(dt) if off else None
    x1 = rng.integers(-3, 4, (m, k)).astype(dt)
    b = rng.standard_normal(n).astype(dt) if bias else None
    x = (rng.standard_normal((m, n)) * 4).astype(dt) if x3 else None
    w = (codes.astype(np.float64) + (0 if offset is None else offset.astype(np.float64))) * scale.astype(np.float64)
    acc = x1.astype(np.float64) @ w
    assert np.all(acc.astype(np.float32) == acc)  # exact in float32
    x2 = codes if wd == "int8" else codes.astype(ml_dtypes.int4)
    return (x1, x2, scale, offset, b, x), oracle.kernel_epilogue(acc, b, x, act)


@pytest.mark.parametrize("act", ["bfloat16", "float16"])
@pytest.mark.parametrize("wd", ["int8", "int4"])
@pytest.mark.parametrize("off,bias,x3", [(False, True, True), (True, True, False), (True, False, True)])
def test_exact_sums_with_bias_and_x3_are_the_kernels_rounding(one_device_group, act, wd, off, bias, x3):
    mesh, emu = one_device_group
    rng = np.random.default_rng(zlib.crc32(repr((act, wd, off, bias, x3)).encode()))
    # 100 and more: the blocked bf16 kernel where it runs (515: two blocks of rows), else the
    # slabs above SMALL_M
    for m in (1, 2, 16, 40, 100, cpu_kernel.SMALL_M + 3, 2 * cpu_kernel.SMALL_M + 3):
        args, want = _exact_case(rng, m, 64, 48, act, wd, off, bias, x3)
        for lowering in LOWERINGS:
            got = _call(lowering, args, {}, mesh, emu, "Ascend910B4")
            np.testing.assert_array_equal(_bits(got, act), _bits(want, act), err_msg=f"{lowering}, m={m}")


def test_exact_sums_tell_the_two_roundings_apart():
    """x3 after the matmul's rounding differs from one rounding of the whole sum."""
    rng = np.random.default_rng(5)
    args, want = _exact_case(rng, 40, 64, 48, "bfloat16", "int8", False, True, True)
    x1, x2, s, _, b, x3 = args
    acc = x1.astype(np.float64) @ (x2.astype(np.float64) * s.astype(np.float64))
    once = (acc + b.astype(np.float64) + x3.astype(np.float64)).astype(np.float32).astype(ml_dtypes.bfloat16)
    assert np.mean(_bits(once, "bfloat16") != _bits(want, "bfloat16")) > 0.02


@pytest.mark.slow
@pytest.mark.parametrize("isa", ["avx512", "avx2", "portable"])
def test_every_instruction_set_copy_rounds_as_the_kernel(isa):
    code = textwrap.dedent("""
        import sys, numpy as np
        sys.path.insert(0, sys.argv[1])
        import conftest, jax, jax.numpy as jnp, jax_wqmm as wq, oracle
        from jax_wqmm import cpu_kernel
        import test_kernel_numerics as t
        print("isa", cpu_kernel.isa())
        for wd, gran, off, act, layout in [("int8", "per_channel", True, "float16", "ND"),
                                           ("int4", "per_group", True, "bfloat16", "ND"),
                                           ("int4", "per_tensor", False, "float16", "T"),
                                           ("int8", "per_group", True, "bfloat16", "T")]:
            case, want = t._weight_case(wd, gran, off, act, layout)
            eye = np.eye(want.shape[0]).astype(oracle.ACT_NP[act])
            for rows in (t.LARGE_M, slice(0, 64), slice(16, 32), slice(5, 7), slice(63, 64)):
                got = wq.weight_quant_matmul_all_reduce(jnp.asarray(eye[rows]), *map(jnp.asarray, [a for a in case.args[1:4] if a is not None]), **case.kwargs) if case.args[3] is not None else \\
                      wq.weight_quant_matmul_all_reduce(jnp.asarray(eye[rows]), *map(jnp.asarray, case.args[1:3]), **case.kwargs)
                np.testing.assert_array_equal(t._bits(got, act), t._bits(want[rows], act))
        rng = np.random.default_rng(0)
        for act in ("bfloat16", "float16"):
            for m in (1, 2, 16, 40, cpu_kernel.SMALL_M + 3):
                args, want = t._exact_case(rng, m, 64, 48, act, "int4", True, True, True)
                got = wq.weight_quant_matmul_all_reduce(*map(jnp.asarray, args))
                np.testing.assert_array_equal(t._bits(got, act), t._bits(want, act))
        print("ok")
    """)
    tests = os.path.dirname(__file__)
    out = subprocess.run([sys.executable, "-c", code, tests], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, JAX_WQMM_CPU_ISA=isa, JAX_PLATFORMS="cpu"), cwd=tests)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().endswith("ok")
