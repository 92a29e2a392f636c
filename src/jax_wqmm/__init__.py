"""jax_wqmm: Ascend's fused weight-quantized matmul + all-reduce
(``aclnnWeightQuantMatmulAllReduce``) as a JAX primitive.

``output = allreduce_sum(x1 @ ((x2 + antiquant_offset) * antiquant_scale) + bias + x3)``
"""

from .spec import (ConstraintError, PRODUCTS, WqmmSpec, current_target_product, make_spec,
                   target_product)
from .quantize import QuantizedWeight, quantize_weight, dequantize_weight
from .ops import weight_quant_matmul_all_reduce, quant_matmul
from .fuse import FuseReport, fuse
from . import formats, layers, reference
from .layers import column_parallel_linear, row_parallel_linear
from .formats import (
    to_fractal_nz,
    from_fractal_nz,
    pack_int4_to_int32,
    unpack_int32_to_int4,
    hifloat8_to_float32,
    float_to_hifloat8,
)

__version__ = "0.1.0"

# The native CPU kernel is the default CPU lowering when the extension is built, and the
# fused NPU lowering is registered when JAX knows the Ascend platform. Importing never fails
# without the extension or CANN (CANN itself is loaded at the first NPU lowering).
from . import cpu_kernel as _cpu_kernel
from . import native as _native

_cpu_kernel.register()
try:
    _native.register_npu_lowering()
except _native.NativeExtensionError:  # pragma: no cover - an install without the extension
    pass

__all__ = [
    "weight_quant_matmul_all_reduce",
    "quant_matmul",
    "fuse",
    "FuseReport",
    "quantize_weight",
    "dequantize_weight",
    "QuantizedWeight",
    "ConstraintError",
    "WqmmSpec",
    "make_spec",
    "target_product",
    "current_target_product",
    "PRODUCTS",
    "column_parallel_linear",
    "row_parallel_linear",
    "formats",
    "layers",
    "reference",
    "to_fractal_nz",
    "from_fractal_nz",
    "pack_int4_to_int32",
    "unpack_int32_to_int4",
    "hifloat8_to_float32",
    "float_to_hifloat8",
]
