"""Weight-only quantization: :class:`QuantizedWeight`, :func:`quantize_weight`,
:func:`dequantize_weight`.

The encodings are the operator's: ``w ~= (q + offset) * scale`` with q int8 / int4 (symmetric:
no offset) or an 8-bit float (FP8 E4M3FN, HiFloat8; always symmetric, per-channel).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

from . import formats, reference
from .spec import WEIGHT_DTYPES, ConstraintError, WqmmSpec, check_group_size, make_spec

__all__ = ["QuantizedWeight", "quantize_weight", "dequantize_weight", "check_tensor_parallel"]

_INT_RANGE = {"int8": (-128, 127), "int4": (-8, 7)}
# |w| max maps to these. HiFloat8 is tapered: it has 3 mantissa bits only for |x| in
# [2^-3, 16), so the largest magnitude goes to 15 rather than to HIFLOAT8_MAX (1 mantissa bit).
_FLOAT_MAX = {"float8_e4m3fn": 448.0, "hifloat8": 15.0}
GRANULARITIES = ("per_tensor", "per_channel", "per_group")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A quantized (k, n) weight in the operator's layout; a pytree (arrays are its leaves).

    Attributes:
      data: the stored weight: (k, n), (n, k) if ``transpose``, or 4-D FRACTAL_NZ storage of
        either; int8 / int4 / float8_e4m3fn / uint8 (HiFloat8 codes).
      scale: (1,), (n,) or (ceil(k / group_size), n).
      offset: None, or scale's shape (integer encodings, asymmetric only).
      dtype: the encoding: "int8", "int4", "float8_e4m3fn" or "hifloat8".
      group_size: 0, or the per-group size along k.
      shape: the logical (k, n).
      transpose: ``data`` stores the (n, k) transpose.
      format: "ND" or "FRACTAL_NZ".
    """

    data: jax.Array
    scale: jax.Array
    offset: jax.Array | None
    dtype: str = dataclasses.field(metadata=dict(static=True))
    group_size: int = dataclasses.field(metadata=dict(static=True))
    shape: tuple[int, int] = dataclasses.field(metadata=dict(static=True))
    transpose: bool = dataclasses.field(default=False, metadata=dict(static=True))
    format: str = dataclasses.field(default="ND", metadata=dict(static=True))

    @property
    def nbytes(self) -> int:
        """Bytes of the stored weight (int4: half a byte per element) and its scale/offset."""
        k, n = self.shape
        weight = k * n // 2 if self.dtype == "int4" else k * n
        extra = self.scale.size * self.scale.dtype.itemsize
        if self.offset is not None:
            extra += self.offset.size * self.offset.dtype.itemsize
        return weight + extra

    @property
    def call_options(self) -> dict:
        """The operator options that describe this weight's storage (group size, layout,
        HiFloat8), for :func:`jax_wqmm.weight_quant_matmul_all_reduce`."""
        return dict(antiquant_group_size=self.group_size, transpose_x2=self.transpose,
                    x2_format=self.format, x2_dtype="hifloat8" if self.dtype == "hifloat8" else None)

    def spec(self) -> WqmmSpec:
        """The operator's validated description of this weight (against one row of x in the
        scale's dtype, or bfloat16): raises ConstraintError where the operator would not take
        it."""
        k, _ = self.shape
        act = self.scale.dtype if self.scale.dtype in (jnp.float16, jnp.bfloat16) else jnp.bfloat16
        like = lambda a: None if a is None else jax.ShapeDtypeStruct(a.shape, act)
        return make_spec(jax.ShapeDtypeStruct((1, k), act), self.data, like(self.scale), like(self.offset),
                         **self.call_options)

    def logical_data(self) -> jax.Array:
        """The (k, n) ND, untransposed quantized values (HiFloat8: uint8 codes)."""
        x = self.data
        if self.format == "FRACTAL_NZ":
            k, n = self.shape
            x = formats.from_fractal_nz(x, (n, k) if self.transpose else (k, n))
        return x.T if self.transpose else x

    def with_layout(self, *, transpose: bool = False, format: Literal["ND", "FRACTAL_NZ"] = "ND") -> "QuantizedWeight":
        """The same weight stored transposed ((n, k)) and / or as FRACTAL_NZ.

        Raises ConstraintError for a layout the operator does not take with this weight
        (e.g. FRACTAL_NZ is per-channel int8 / int4 only)."""
        if format not in ("ND", "FRACTAL_NZ"):
            raise ValueError(f"format={format!r}: must be 'ND' or 'FRACTAL_NZ'")
        x = self.logical_data()
        if transpose:
            x = x.T
        if format == "FRACTAL_NZ":
            x = formats.to_fractal_nz(x)
        out = dataclasses.replace(self, data=x, transpose=bool(transpose), format=format)
        out.spec()  # the operator's rules for the new layout
        return out


def quantize_weight(
    w: jax.typing.ArrayLike,
    *,
    dtype: Literal["int8", "int4", "float8_e4m3fn", "hifloat8"] = "int8",
    granularity: Literal["per_tensor", "per_channel", "per_group"] = "per_channel",
    group_size: int | None = None,
    symmetric: bool = True,
    scale_dtype=None,
    tp: int | None = None,
) -> QuantizedWeight:
    """Quantizes a float (k, n) weight for the operator.

    Args:
      w: (k, n) float weight (x @ w is the unquantized layer).
      dtype: the encoding of the quantized values.
      granularity: one scale for the tensor, per output channel (n,), or per group of
        ``group_size`` rows of k: (ceil(k / group_size), n).
      group_size: per-group only: a multiple of 32 in [32, k-1] (the operator's rule).
      symmetric: integer encodings only: False adds an offset so that [min, max] uses the
        whole integer range. 8-bit float encodings are always symmetric.
      scale_dtype: dtype of scale / offset: float16 or bfloat16 (the operator takes scales in
        the activation dtype; ``quant_matmul`` casts); default w's dtype if one of them, else
        bfloat16.
      tp: optional, the tensor-parallel size the rows (k) will be split over: checks now that
        each rank's k / tp holds whole groups that the operator accepts (per-group).

    Returns:
      A ND, untransposed :class:`QuantizedWeight`; ``with_layout`` gives other layouts.
    """
    w = jnp.asarray(w)
    if w.ndim != 2 or not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(f"w: shape {w.shape} dtype {w.dtype}: must be a 2-D (k, n) float array")
    if dtype not in WEIGHT_DTYPES:
        raise ValueError(f"dtype={dtype!r}: must be one of {', '.join(WEIGHT_DTYPES)}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity={granularity!r}: must be one of {', '.join(GRANULARITIES)}")
    if not symmetric and dtype not in _INT_RANGE:
        raise ValueError(f"symmetric=False: {dtype} weights take no offset (the operator forbids it)")
    k, n = w.shape
    if granularity == "per_group":
        if group_size is None:
            raise ValueError("group_size=None: per_group granularity needs a group_size")
        check_group_size(group_size, k, argument="group_size")
        if group_size == 0:
            raise ValueError("group_size=0: per_group granularity needs a group_size > 0")
    elif group_size not in (None, 0):
        raise ValueError(f"group_size={group_size}: only for granularity='per_group' (got {granularity!r})")
    if scale_dtype is None:
        scale_dtype = w.dtype if w.dtype in (jnp.float16, jnp.bfloat16) else jnp.bfloat16
    if jnp.dtype(scale_dtype) not in (jnp.float16, jnp.bfloat16):
        raise ConstraintError("scale_dtype", jnp.dtype(scale_dtype).name,
                              "must be float16 or bfloat16 (the operator takes scales in x1's dtype)")
    if tp is not None:
        check_tensor_parallel((k, n), group_size or 0, tp, "rows")

    wf = w.astype(jnp.float32)
    if granularity == "per_tensor":
        groups = wf.reshape(1, k * n)             # reduce over everything
    elif granularity == "per_channel":
        groups = wf.T                              # (n, k): reduce over k
    else:
        g = -(-k // group_size)
        padded = jnp.pad(wf, ((0, g * group_size - k), (0, 0)), mode="edge")
        groups = padded.reshape(g, group_size, n).transpose(0, 2, 1)  # (g, n, group)
    lo, hi = groups.min(axis=-1), groups.max(axis=-1)

    tiny = jnp.finfo(jnp.float32).tiny
    if dtype in _INT_RANGE:
        qmin, qmax = _INT_RANGE[dtype]
        scale = jnp.maximum(-lo, hi) / qmax if symmetric else (hi - lo) / (qmax - qmin)
    else:
        scale = jnp.maximum(-lo, hi) / _FLOAT_MAX[dtype]
    # The operator reads the scale in scale_dtype: round it up there, so [lo, hi] still fits
    # the code range, and quantize against the rounded value.
    scale = _round_up(jnp.maximum(scale, tiny), scale_dtype)
    offset = None
    if not symmetric:
        # w = (q + offset) * scale with lo landing on qmin; an integer, exact in scale_dtype.
        offset = (jnp.round(lo / scale.astype(jnp.float32)) - qmin).astype(scale_dtype)

    # The operator's rules for this weight (e.g. FP8 / HiFloat8: per-channel only).
    stored = jnp.uint8 if dtype == "hifloat8" else jnp.dtype(dtype)
    spec = make_spec(jax.ShapeDtypeStruct((1, k), scale_dtype), jax.ShapeDtypeStruct((k, n), stored),
                     scale, offset, antiquant_group_size=group_size or 0,
                     x2_dtype="hifloat8" if dtype == "hifloat8" else None)
    s = reference.expand_quant_param(scale, spec).astype(jnp.float32)
    x = wf / s
    if offset is not None:
        x = x - reference.expand_quant_param(offset, spec).astype(jnp.float32)
    if dtype in _INT_RANGE:
        qmin, qmax = _INT_RANGE[dtype]
        data = jnp.clip(jnp.round(x), qmin, qmax).astype(jnp.int8).astype(jnp.dtype(dtype))
    elif dtype == "hifloat8":  # |x| <= 15 here; saturating all the same (explicitly)
        data = formats.float_to_hifloat8(x, saturate=True)
    else:
        fmax = _FLOAT_MAX[dtype]
        data = jnp.clip(x, -fmax, fmax).astype(jnp.dtype(dtype))
    return QuantizedWeight(data=data, scale=scale, offset=offset, dtype=dtype,
                           group_size=group_size or 0, shape=(int(k), int(n)))


def check_tensor_parallel(shape: tuple[int, int], group_size: int, tp: int, split: str = "rows") -> None:
    """Raises ConstraintError (with the numbers) unless a (k, n) weight's ``split`` ("rows": k,
    row-parallel; "columns": n) divides over ``tp`` ranks, and, for rows with per-group
    scales, each rank's k / tp is a whole number of groups the operator accepts."""
    k, n = shape
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ConstraintError("tp", tp, "must be a positive int (the mesh axis size)")
    dim, name = (k, "k") if split == "rows" else (n, "n")
    if dim % tp:
        raise ConstraintError("tp", tp, f"{name}={dim} does not split over {tp} ranks")
    if split == "rows" and group_size:
        local = k // tp
        if local % group_size:
            raise ConstraintError("group_size", group_size,
                                  f"must divide k / tp = {k} / {tp} = {local} (each rank holds whole groups)")
        try:
            check_group_size(group_size, local, argument="group_size")
        except ConstraintError as e:
            raise ConstraintError(e.argument, e.value, f"{e.rule} (each rank's k = k / tp = {k} / {tp})") from None


def _round_up(x: jax.Array, dtype) -> jax.Array:
    """``x`` (float32) in ``dtype``, rounded towards +inf."""
    r = x.astype(dtype)
    return jnp.where(r.astype(jnp.float32) < x, jnp.nextafter(r, jnp.asarray(jnp.inf, dtype)), r)


def dequantize_weight(qw: QuantizedWeight) -> jax.Array:
    """(k, n) float32 ``(q + offset) * scale`` of a :class:`QuantizedWeight` (any layout)."""
    return reference.dequantize(qw.data, qw.scale, qw.offset, qw.spec(), dtype=jnp.float32)
