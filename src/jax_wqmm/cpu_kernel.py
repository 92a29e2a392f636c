"""The fast CPU path: native dequantizing matmuls (ffi/cpu_kernel.cc and the decode kernels) as
the CPU lowering.

For the cases it covers (int8 / int4 weights, ND storage, transposed or not, per-tensor /
per-channel / per-group, with or without offset, float16 / bfloat16 activations) the
primitive's CPU lowering is:

- m <= :data:`SMALL_M`: one custom call that reads the quantized weight once and returns
  ``x1 @ W + bias + x3`` (with AVX-512 BF16 and bfloat16 activations, bf16 dot products on
  codes rounded to bf16, paired along k for ND storage and in k order for transposed
  storage; with AVX-512 and float16 activations, the CPU's float16 conversions and float32
  FMAs; float FMAs on codes converted in cache otherwise), on XLA's FFI thread pool;
- every m with AVX-512 BF16, bfloat16 activations and ND storage: the same custom call, whose
  kernel is blocked as a GEMM from m = 64 on (each panel of W converted once, every block of
  rows of x over it), as fast as XLA's bf16 dot over unquantized weights or faster
  (:func:`fused`);
- larger m otherwise (compute-bound): a custom call that dequantizes W to the activation dtype
  in column slabs (transposed storage: into the slab's transpose), then XLA's own dot (float32
  accumulation), which is faster than those kernels there;

followed by the operator's all-reduce as an XLA psum. Every other case (FP8, HiFloat8,
FRACTAL_NZ) keeps the jnp reference lowering, which stays the oracle. This becomes the default
CPU lowering when the extension is importable (:func:`register`, called at import).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.interpreters import mlir

from . import native, reference
from .spec import WqmmSpec, unpack_operands, pack_operands

__all__ = ["SMALL_M", "supports", "fused", "local_matmul", "register", "unregister", "isa", "MATMUL_TARGET",
           "DEQUANTIZE_TARGET", "peak_mac_rate", "convert_rate", "CONVERT_ROWS"]

MATMUL_TARGET = "wqmm_cpu_matmul"
DEQUANTIZE_TARGET = "wqmm_cpu_dequantize"
#: Up to this many rows (m) the fused kernel runs; above it, dequantize + XLA's dot (measured
#: on a 2-core Zen 4 at k = n = 4096: the kernel is faster up to m = 256, 2-3x at m = 32-128).
SMALL_M = 256
#: Elements of W dequantized per slab on the large-m path.
DEQUANTIZE_SLAB = 1 << 21
#: The rows of x that convert_rate can multiply each converted pair with (0: convert only).
CONVERT_ROWS = (0, 1, 2, 4, 8, 16)


def supports(spec: WqmmSpec) -> bool:
    """Whether the CPU kernel covers this call (else the jnp reference runs)."""
    return (spec.weight_dtype in ("int8", "int4") and spec.x2_format == "ND" and spec.k > 0
            and spec.act_dtype in ("float16", "bfloat16"))


def fused(spec: WqmmSpec) -> bool:
    """Whether a covered call (:func:`supports`) runs as one fused custom call: at m <=
    :data:`SMALL_M`, and at every m where the blocked bf16 kernel takes it (AVX-512 BF16,
    bfloat16 activations, ND storage, int4 with an even n; measured on a 2-core Zen 4 at k = n
    = 4096: 0.98-0.99x XLA's bf16 dot at m = 512 and 0.93-0.97x at 2048, where the slabs took
    1.10-1.15x). Else W is dequantized in column slabs for XLA's dot. The rule is the
    extension's own (the one its dispatch follows), asked at trace time."""
    return spec.m <= SMALL_M or native.extension().cpu_matmul_blocked(
        spec.act_dtype == "bfloat16", spec.transpose_x2, spec.weight_dtype == "int4", spec.n)


def local_matmul(x1, x2, scale, offset, bias, x3, spec: WqmmSpec) -> jax.Array:
    """One rank's ``x1 @ ((x2 + offset) * scale) + bias + x3`` through the CPU kernels."""
    attrs = native.ffi_attributes(spec)
    out_type = jax.typeof(x1).update(shape=spec.out_shape, dtype=jnp.dtype(spec.out_dtype))
    if fused(spec):
        call = jax.ffi.ffi_call(MATMUL_TARGET, out_type)
        return call(*pack_operands(x1, x2, scale, offset, bias, x3), **attrs)
    # Dequantize and multiply a slab of columns at a time: each slab's weight is a small
    # temporary that the allocator reuses (a whole (k, n) one would be fresh pages each call).
    step = max(128, (DEQUANTIZE_SLAB // spec.k) // 128 * 128)
    parts = []
    for c0 in range(0, spec.n, step):
        c1 = min(spec.n, c0 + step)
        # transposed storage dequantizes into the slab's transpose, (c1 - c0, k), as it is stored
        shape = (c1 - c0, spec.k) if spec.transpose_x2 else (spec.k, c1 - c0)
        w_type = jax.typeof(scale).update(shape=shape, dtype=jnp.dtype(spec.act_dtype))
        w = jax.ffi.ffi_call(DEQUANTIZE_TARGET, w_type)(
            *pack_operands(x2, scale, offset), col_begin=np.int64(c0), col_end=np.int64(c1), **attrs)
        parts.append(reference.matmul_f32(x1, w, transposed=spec.transpose_x2))
    acc = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)
    return reference.add_bias_x3(acc, bias, x3, spec)


def _impl(*operands, spec: WqmmSpec):
    args = unpack_operands(spec, operands)
    if not supports(spec):
        return reference.apply(*args, spec)
    return reference.all_reduce(local_matmul(*args, spec), spec)


ISAS = ("avx512bf16", "avx512", "avx2", "portable")


def _check_isa_setting() -> None:
    forced = os.environ.get("JAX_WQMM_CPU_ISA")
    if forced is not None and forced not in ISAS:
        raise ValueError(f"JAX_WQMM_CPU_ISA={forced!r}: must be one of {', '.join(ISAS)} "
                         "(a lower instruction set than the CPU's; unset for the best one)")


def register(platform: str = "cpu") -> bool:
    """Makes the CPU kernel the lowering on ``platform``; False if the extension is missing.
    Raises ValueError for an unknown ``$JAX_WQMM_CPU_ISA``."""
    from .primitive import register_lowering

    _check_isa_setting()
    try:
        native.register_targets(platform, MATMUL_TARGET, DEQUANTIZE_TARGET)
    except native.NativeExtensionError:
        return False
    register_lowering(mlir.lower_fun(_impl, multiple_results=False), platform)
    return True


def unregister(platform: str = "cpu") -> None:
    """Back to the jnp reference lowering on ``platform``."""
    from .primitive import reference_lowering, register_lowering

    register_lowering(reference_lowering, platform)


def isa() -> str:
    """The instruction set the kernels run with here: "avx512bf16", "avx512", "avx2" or
    "portable" (``$JAX_WQMM_CPU_ISA`` can force a lower one)."""
    return native.extension().cpu_isa()


def peak_mac_rate(seconds: float = 0.2, instruction: str = "widest") -> float:
    """Multiply-adds per second of all cores, measured now for about ``seconds``, on the
    kernels' widest multiply-add (``instruction="widest"``: bf16 dot products with AVX-512
    BF16, else float FMAs) or on float FMAs (``"fma"``, what the float16 kernels multiply
    with): the compute ceiling of those kernels (a compute floor of m*k*n / rate for a
    matmul). 0.0 when unknown (portable path)."""
    if instruction not in ("widest", "fma"):
        raise ValueError(f"instruction={instruction!r}: must be 'widest' or 'fma'")
    return native.extension().cpu_peak_mac_rate(seconds, instruction == "fma")


def convert_rate(weight_dtype: str, seconds: float = 0.2, rows: int = 0) -> float:
    """Weights per second that the bfloat16 decode kernel converts from ``weight_dtype``
    ("int8" or "int4") codes to the rounded bfloat16 it multiplies (numeric contract: each
    weight is rounded), on all cores, with the codes in L1: a floor of k*n / rate on any
    bfloat16 call of that kernel, measured now for about ``seconds``. With ``rows`` (1, 2, 4,
    8 or 16) each converted pair of weights also feeds the dot products of that many rows of x,
    in registers: the kernel's inner loop at m = rows without its memory traffic, a floor of
    k*n / rate for that m (where conversion and dot products compete for the same vector
    units, as on Zen 4, it comes to about the conversion alone plus the dot products at peak).
    int4 with ``rows`` 1, 2 or 4 runs a different kernel, which converts nothing per weight: it
    looks the weights up in tables of each column's 16 rounded values (one per group), after
    transposing 16 rows of codes in registers; its rate is that kernel's inner loop (transposes,
    lookups and dot products on codes in L1, tables not built). 0.0 where those kernels do not
    run (no AVX-512 BF16)."""
    if weight_dtype not in ("int8", "int4"):
        raise ValueError(f"weight_dtype={weight_dtype!r}: must be 'int8' or 'int4'")
    if rows not in CONVERT_ROWS:
        raise ValueError(f"rows={rows!r}: must be one of {CONVERT_ROWS}")
    return native.extension().cpu_convert_rate(weight_dtype == "int4", rows, seconds)
