"""The rules of ``aclnnWeightQuantMatmulAllReduce``, checked once, on shapes and dtypes.

:func:`make_spec` is the only place where the operator's constraints live. It turns the
arguments of a call (arrays, tracers, avals or ``jax.ShapeDtypeStruct``; only ``.shape`` and
``.dtype`` are read) and its static options into a :class:`WqmmSpec`: a small frozen, hashable
description that the primitive carries as its parameter and that every lowering (the jnp
reference, the native FFI call) reads instead of re-deriving anything.

Every violation raises :class:`ConstraintError` naming the argument, the value seen and the
rule broken. The rules follow the operator's documentation (``aclnnWeightQuantMatmulAllReduce``,
Atlas A2); where the documentation leaves a choice, the choice is stated in the rule text.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, Mapping

import numpy as np

__all__ = [
    "ConstraintError",
    "WqmmSpec",
    "make_spec",
    "check_group_size",
    "check_product",
    "target_product",
    "current_target_product",
    "Product",
    "PRODUCTS",
    "WEIGHT_DTYPES",
    "FP8_LIKE",
    "nz_c0",
]

#: Weight encodings some product's kernel accepts (names as in ``ml_dtypes``; HiFloat8 has no
#: NumPy dtype and is stored as ``uint8``). float8_e5m2 appears only in an older operator doc:
#: no current kernel takes it.
WEIGHT_DTYPES = ("int8", "int4", "float8_e4m3fn", "hifloat8")
#: Weight encodings for which the operator takes no ``antiquant_offset``.
FP8_LIKE = frozenset({"float8_e4m3fn", "hifloat8"})
#: Activation dtypes (x1, scale, offset, bias, x3, output).
ACTIVATION_DTYPES = ("float16", "bfloat16")
X2_FORMATS = ("ND", "FRACTAL_NZ")
GRANULARITIES = ("per_tensor", "per_channel", "per_group")

K_N_MAX = 65535
M_MAX = 2**31 - 1
INT_MAX = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class Product:
    """What one Ascend product's kernel accepts beyond the rules common to all (ops-transformer
    ``mc2/matmul_all_reduce``: op_api ``CheckDtypeValid`` and the tiling of each product).

    Attributes:
      name: the key of :data:`PRODUCTS` (``"atlas_a2"``, ``"ascend950"``).
      title: the product's name in messages.
      granularities: weight dtype -> the scale granularities its kernel takes.
      nz_granularities: weight dtype -> granularities with a FRACTAL_NZ weight (absent: ND only).
      group_alignment: weight dtype -> per-group calls need n and k multiples of this.
      world_sizes: ranks of a communicator the kernel runs on.
      deterministic: how to get reproducible sums.
    """

    name: str
    title: str
    granularities: Mapping[str, frozenset]
    nz_granularities: Mapping[str, frozenset]
    group_alignment: Mapping[str, int]
    world_sizes: frozenset
    deterministic: str

    @property
    def weight_dtypes(self) -> tuple[str, ...]:
        return tuple(d for d in WEIGHT_DTYPES if d in self.granularities)


_ALL = frozenset(GRANULARITIES)
_CHANNEL = frozenset({"per_channel"})

#: The products whose kernels implement the operator. Not supported (no kernel): Atlas A3,
#: Atlas 200I/500 A2, Atlas inference (310P) and training series.
PRODUCTS: dict[str, Product] = {
    "atlas_a2": Product(
        name="atlas_a2", title="Atlas A2",
        granularities={"int8": _ALL, "int4": _ALL},
        nz_granularities={"int8": _CHANNEL, "int4": _CHANNEL},
        group_alignment={},
        world_sizes=frozenset({1, 2, 4, 8}),
        deterministic="non-deterministic unless HCCL_DETERMINISTIC=true"),
    "ascend950": Product(
        name="ascend950", title="Ascend 950PR/950DT",
        granularities={"int8": _ALL, "int4": _ALL, "float8_e4m3fn": _CHANNEL, "hifloat8": _CHANNEL},
        nz_granularities={},
        group_alignment={"int8": 32, "int4": 64},
        world_sizes=frozenset({1, 2, 4, 8, 16, 32, 64}),
        deterministic="deterministic"),
}


def _union_product() -> Product:
    """What at least one product accepts: the rules of the reference (no product chosen)."""
    def merge(field):
        out: dict = {}
        for p in PRODUCTS.values():
            for k, v in getattr(p, field).items():
                out[k] = out.get(k, frozenset()) | v
        return out
    return Product(
        name="any", title="any supported product (" + ", ".join(p.title for p in PRODUCTS.values()) + ")",
        granularities=merge("granularities"), nz_granularities=merge("nz_granularities"),
        group_alignment={},  # Atlas A2 has none
        world_sizes=frozenset().union(*(p.world_sizes for p in PRODUCTS.values())),
        deterministic="")


ANY_PRODUCT = _union_product()


class ConstraintError(ValueError):
    """An argument breaks a rule of ``aclnnWeightQuantMatmulAllReduce``.

    Attributes:
      argument: the name of the offending argument (as in the public API).
      value: the value seen (a shape, dtype name or option value).
      rule: the rule broken, in words.
    """

    def __init__(self, argument: str, value: Any, rule: str):
        self.argument = argument
        self.value = value
        self.rule = rule
        super().__init__(f"{argument}={value!r}: {rule}")


def _fail(argument: str, value: Any, rule: str) -> None:
    raise ConstraintError(argument, value, rule)


def nz_c0(weight_dtype: str) -> int:
    """Columns of one FRACTAL_NZ block (C0): 32 bytes of elements, itemsize capped at 2."""
    bits = {"int4": 4, "int8": 8, "uint8": 8, "hifloat8": 8, "float8_e5m2": 8,
            "float8_e4m3fn": 8}.get(weight_dtype, 16)
    return 256 // min(bits, 16)


def check_group_size(group_size: Any, k: int, argument: str = "antiquant_group_size") -> int:
    """The group-size rule: 0 (not per-group) or a multiple of 32 in [32, min(k-1, INT_MAX)]."""
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)):
        _fail(argument, group_size, "must be an int")
    group_size = int(group_size)
    if group_size == 0:
        return 0
    hi = min(k - 1, INT_MAX)
    if group_size % 32 or not 32 <= group_size <= hi:
        _fail(argument, group_size,
              f"must be 0 or a multiple of 32 in [32, k-1] with k={k}")
    return group_size


@dataclasses.dataclass(frozen=True)
class WqmmSpec:
    """A validated call of the operator: static options plus the facts derived from shapes.

    Frozen and hashable: it is the parameter of the primitive. Shapes are logical shapes
    (int4 counts elements). ``x2_shape`` is the stored shape: (k, n), (n, k) when transposed,
    or the 4-D FRACTAL_NZ storage of either.
    """

    # static options, as the user passed them (normalized)
    axis_name: tuple[str, ...]
    group_size: int
    transpose_x2: bool
    x2_format: str
    weight_dtype: str
    reduce_op: str
    comm_turn: int
    stream_mode: int
    # derived from shapes and dtypes
    x1_shape: tuple[int, ...]
    x2_shape: tuple[int, ...]
    scale_shape: tuple[int, ...]
    m: int
    k: int
    n: int
    granularity: str  # "per_tensor" | "per_channel" | "per_group"
    act_dtype: str
    out_dtype: str
    bias_dtype: str | None
    x3_dtype: str | None
    has_offset: bool
    # the product whose rules were checked besides the common ones (None: any product's)
    product: str | None = None

    @property
    def scale_transposed(self) -> bool:
        """Whether the kernel takes antiquant_scale / antiquant_offset transposed with x2: a
        per-group (G, n) view with strides (1, G) over (n, G) storage (ops-transformer checks
        it with ``IsAffineInconsistent``). The public API keeps the logical (G, n) array; the
        native lowering hands the kernel that layout."""
        return self.transpose_x2 and self.granularity == "per_group" and min(self.scale_shape) > 1

    @property
    def has_bias(self) -> bool:
        return self.bias_dtype is not None

    @property
    def has_x3(self) -> bool:
        return self.x3_dtype is not None

    @property
    def out_shape(self) -> tuple[int, ...]:
        return self.x1_shape[:-1] + (self.n,)

    @property
    def num_groups(self) -> int:
        return -(-self.k // self.group_size) if self.group_size else 1

    @property
    def stored_matrix_shape(self) -> tuple[int, int]:
        """The 2-D matrix that x2 stores: (k, n), or (n, k) when transposed."""
        return (self.n, self.k) if self.transpose_x2 else (self.k, self.n)

    @property
    def options(self) -> dict[str, Any]:
        """The keyword options of the public call that produced this spec."""
        return dict(
            axis_name=self.axis_name or None,
            antiquant_group_size=self.group_size,
            transpose_x2=self.transpose_x2,
            x2_format=self.x2_format,
            x2_dtype="hifloat8" if self.weight_dtype == "hifloat8" else None,
            reduce_op=self.reduce_op,
            comm_turn=self.comm_turn,
            stream_mode=self.stream_mode,
        )


def _dtype_name(x: Any) -> str:
    return np.dtype(x.dtype).name


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in x.shape)


def normalize_axis_name(axis_name: Any) -> tuple[str, ...]:
    """None -> (); "tp" -> ("tp",); ("dp", "tp") -> ("dp", "tp")."""
    if axis_name is None:
        return ()
    names = (axis_name,) if isinstance(axis_name, str) else axis_name
    if not isinstance(names, (tuple, list)) or not names:
        _fail("axis_name", axis_name,
              "must be None, a mesh axis name or a non-empty tuple of names")
    for name in names:
        if not isinstance(name, str) or not name:
            _fail("axis_name", axis_name, "every mesh axis name must be a non-empty str")
    if len(set(names)) != len(names):
        _fail("axis_name", axis_name, "must not name a mesh axis twice")
    return tuple(names)


def _check_options(reduce_op, comm_turn, stream_mode, x2_format, transpose_x2) -> None:
    if reduce_op != "sum":
        _fail("reduce_op", reduce_op, "only 'sum' is supported")
    if isinstance(comm_turn, bool) or comm_turn != 0:
        _fail("comm_turn", comm_turn, "only 0 is supported")
    if isinstance(stream_mode, bool) or stream_mode != 1:
        _fail("stream_mode", stream_mode, "only 1 (ACL_STOP_ON_FAILURE) is supported")
    if x2_format not in X2_FORMATS:
        _fail("x2_format", x2_format, "must be 'ND' or 'FRACTAL_NZ'")
    if not isinstance(transpose_x2, (bool, np.bool_)):
        _fail("transpose_x2", transpose_x2, "must be a bool")


def _weight_dtype(x2: Any, x2_dtype: Any) -> str:
    stored = _dtype_name(x2)
    if x2_dtype is not None and x2_dtype != "hifloat8" and x2_dtype != stored:
        _fail("x2_dtype", x2_dtype,
              f"must be None or 'hifloat8' (x2 is {stored}; other encodings come from x2's dtype)")
    if x2_dtype == "hifloat8":
        if stored != "uint8":
            _fail("x2", f"dtype {stored}", "x2_dtype='hifloat8' needs x2 stored as uint8")
        return "hifloat8"
    if stored == "uint8":
        _fail("x2", f"dtype {stored}",
              "a uint8 weight is HiFloat8 storage: pass x2_dtype='hifloat8'")
    if stored == "float8_e5m2":
        _fail("x2", f"dtype {stored}",
              "no current Ascend kernel takes float8_e5m2 weights (only an older operator doc "
              "lists them): use float8_e4m3fn or hifloat8")
    if stored not in WEIGHT_DTYPES:
        _fail("x2", f"dtype {stored}",
              "must be int8, int4, float8_e4m3fn or uint8 with x2_dtype='hifloat8'")
    return stored


def _check_range(argument: str, value: int, lo: int, hi: int, what: str) -> None:
    if not lo <= value <= hi:
        _fail(argument, value, f"{what} must be in [{lo}, {hi}]")


def _nz_logical_shape(x2_shape, weight_dtype, transpose_x2, k, n_hint):
    """(k, n) of a FRACTAL_NZ weight; checks the 4-D storage against them."""
    if weight_dtype not in ANY_PRODUCT.nz_granularities:
        _fail("x2_format", "FRACTAL_NZ", f"only int8 and int4 weights may be FRACTAL_NZ, not {weight_dtype}")
    if len(x2_shape) != 4:
        _fail("x2", f"shape {x2_shape}", "a FRACTAL_NZ weight must be 4-D (cols/C0, rows/16, 16, C0)")
    c0 = nz_c0(weight_dtype)
    c1, r1, r0, c0_seen = x2_shape
    if (r0, c0_seen) != (16, c0):
        _fail("x2", f"shape {x2_shape}",
              f"the last two dims of a FRACTAL_NZ {weight_dtype} weight must be (16, {c0})")
    # Stored matrix: (k, n), or (n, k) when transposed.
    rows_blocks, cols_blocks = (r1, c1)
    if transpose_x2:
        n = n_hint if n_hint is not None else rows_blocks * 16
        rows, cols = n, k
    else:
        n = n_hint if n_hint is not None else cols_blocks * c0
        rows, cols = k, n
    if -(-rows // 16) != rows_blocks or -(-cols // c0) != cols_blocks:
        want = (-(-cols // c0), -(-rows // 16), 16, c0)
        _fail("x2", f"shape {x2_shape}",
              f"FRACTAL_NZ storage of a ({rows}, {cols}) matrix must have shape {want} (k={k}, n={n})")
    return n


def make_spec(
    x1: Any,
    x2: Any,
    antiquant_scale: Any,
    antiquant_offset: Any = None,
    bias: Any = None,
    x3: Any = None,
    *,
    axis_name: Any = None,
    antiquant_group_size: Any = 0,
    transpose_x2: Any = False,
    x2_format: Any = "ND",
    x2_dtype: Any = None,
    reduce_op: Any = "sum",
    comm_turn: Any = 0,
    stream_mode: Any = 1,
    product: str | None = None,
) -> WqmmSpec:
    """Checks every rule of the operator and returns the validated call description.

    Arguments are anything with ``.shape`` and ``.dtype`` (or None for optional ones).
    ``product`` (default: :func:`current_target_product`) adds that product's rules to the
    ones every product shares; without one, a call passes when some product accepts it.
    Raises :class:`ConstraintError` on the first rule broken.
    """
    product = current_target_product() if product is None else _product_name(product)
    axes = normalize_axis_name(axis_name)
    _check_options(reduce_op, comm_turn, stream_mode, x2_format, transpose_x2)
    transpose_x2 = bool(transpose_x2)

    # x1: (m, k) or (b, s, k), float16 / bfloat16, ND, never transposed.
    if x1 is None:
        _fail("x1", None, "is required")
    act = _dtype_name(x1)
    if act not in ACTIVATION_DTYPES:
        _fail("x1", f"dtype {act}", "must be float16 or bfloat16")
    x1_shape = _shape(x1)
    if len(x1_shape) not in (2, 3):
        _fail("x1", f"shape {x1_shape}", "must be 2-D (m, k) or 3-D (b, s, k)")
    k = x1_shape[-1]
    m = math.prod(x1_shape[:-1])
    _check_range("x1", m, 1, M_MAX, f"m (x1 shape {x1_shape} without its last dim, multiplied out)")
    _check_range("x1", k, 0, K_N_MAX, f"k (x1 shape {x1_shape}, last dim)")

    # x2: the weight.
    if x2 is None:
        _fail("x2", None, "is required")
    weight_dtype = _weight_dtype(x2, x2_dtype)
    x2_shape = _shape(x2)
    group_size = check_group_size(antiquant_group_size, k)
    if k == 0 and x2_format != "ND":
        _fail("x2_format", x2_format, "k=0 (an empty matmul: output = bias + x3) needs an ND weight")

    if antiquant_scale is None:
        _fail("antiquant_scale", None, "is required")
    scale_shape = _shape(antiquant_scale)

    if x2_format == "FRACTAL_NZ":
        # NZ storage pads n; take n from an argument that states it, else the padded extent.
        n_hint = None
        if bias is not None and len(_shape(bias)) == 1:
            n_hint = _shape(bias)[0]
        elif x3 is not None and len(_shape(x3)) >= 1:
            n_hint = _shape(x3)[-1]
        elif len(scale_shape) == 2 or (len(scale_shape) == 1 and scale_shape[0] != 1):
            n_hint = scale_shape[-1]
        n = _nz_logical_shape(x2_shape, weight_dtype, transpose_x2, k, n_hint)
    else:
        if len(x2_shape) != 2:
            _fail("x2", f"shape {x2_shape}", "an ND weight must be 2-D: (k, n), or (n, k) with transpose_x2=True")
        x2_k, n = (x2_shape[1], x2_shape[0]) if transpose_x2 else x2_shape
        if x2_k != k:
            where = "second" if transpose_x2 else "first"
            _fail("x2", f"shape {x2_shape}",
                  f"its {where} dim (k) must equal x1's last dim k={k}"
                  + (" (transpose_x2=True: x2 is (n, k))" if transpose_x2 else ""))
    _check_range("x2", n, 1, K_N_MAX, f"n (from x2 shape {x2_shape})")

    # antiquant_scale: (1,) per-tensor; (n,) / (1, n) per-channel; (ceil(k/g), n) per-group.
    scale_dtype = _dtype_name(antiquant_scale)
    if scale_dtype != act:
        _fail("antiquant_scale", f"dtype {scale_dtype}", f"must have x1's dtype {act}")
    if group_size:
        groups = -(-k // group_size)
        if scale_shape != (groups, n):
            _fail("antiquant_scale", f"shape {scale_shape}",
                  f"per-group scale must be (ceil(k/antiquant_group_size), n) = ({groups}, {n}) "
                  f"with k={k}, antiquant_group_size={group_size}")
        granularity = "per_group"
    elif scale_shape == (1,):
        granularity = "per_tensor"
    elif scale_shape in ((n,), (1, n)):
        granularity = "per_channel"
    else:
        _fail("antiquant_scale", f"shape {scale_shape}",
              f"must be (1,) per-tensor, ({n},) or (1, {n}) per-channel, or (ceil(k/g), {n}) "
              f"per-group with antiquant_group_size=g > 0 (n={n})")

    # antiquant_offset: scale's shape and dtype; none for FP8 / HiFloat8 weights.
    if antiquant_offset is not None:
        if weight_dtype in FP8_LIKE:
            _fail("antiquant_offset", f"shape {_shape(antiquant_offset)}",
                  f"must be None with {weight_dtype} weights")
        if _dtype_name(antiquant_offset) != act:
            _fail("antiquant_offset", f"dtype {_dtype_name(antiquant_offset)}",
                  f"must have x1's dtype {act}")
        if _shape(antiquant_offset) != scale_shape:
            _fail("antiquant_offset", f"shape {_shape(antiquant_offset)}",
                  f"must have antiquant_scale's shape {scale_shape}")

    out_shape = x1_shape[:-1] + (n,)

    # bias: (n,) in x1's dtype (every current kernel; an older doc allowed float32 with FP8).
    bias_dtype = None
    if bias is not None:
        bias_dtype = _dtype_name(bias)
        if bias_dtype != act:
            _fail("bias", f"dtype {bias_dtype}", f"must be {act}, x1's dtype")
        if _shape(bias) != (n,):
            _fail("bias", f"shape {_shape(bias)}", f"must be 1-D ({n},): n, the output's last dim")

    # x3: the output's shape, in x1's dtype (every current kernel; an older doc allowed float32).
    x3_dtype = None
    if x3 is not None:
        x3_dtype = _dtype_name(x3)
        if x3_dtype != act:
            _fail("x3", f"dtype {x3_dtype}", f"must be {act}, x1's dtype")
        if _shape(x3) != out_shape:
            _fail("x3", f"shape {_shape(x3)}", f"must have the output's shape {out_shape}")

    spec = WqmmSpec(
        axis_name=axes,
        group_size=group_size,
        transpose_x2=transpose_x2,
        x2_format=str(x2_format),
        weight_dtype=weight_dtype,
        reduce_op=reduce_op,
        comm_turn=int(comm_turn),
        stream_mode=int(stream_mode),
        x1_shape=x1_shape,
        x2_shape=x2_shape,
        scale_shape=scale_shape,
        m=m,
        k=k,
        n=n,
        granularity=granularity,
        act_dtype=act,
        out_dtype=act,
        bias_dtype=bias_dtype,
        x3_dtype=x3_dtype,
        has_offset=antiquant_offset is not None,
    )
    check_product(spec, None)
    if product is not None:
        check_product(spec, product)
    return dataclasses.replace(spec, product=product)


def respec(spec: WqmmSpec, x1, x2, antiquant_scale, antiquant_offset=None, bias=None, x3=None) -> WqmmSpec:
    """The spec of the same call options applied to other operands (used by batching)."""
    return make_spec(x1, x2, antiquant_scale, antiquant_offset, bias, x3, **spec.options,
                     product=spec.product)


# ------------------------------------------------------------------------------ products

def _product_name(name: Any) -> str:
    if name not in PRODUCTS:
        _fail("product", name, f"must be one of {sorted(PRODUCTS)}")
    return name


def check_product(spec: WqmmSpec, product: str | None) -> None:
    """Raises :class:`ConstraintError` when ``product``'s kernel would reject ``spec``
    (None: when no product's kernel takes it). The message names the product. (World sizes
    are not an error: the native lowering falls back outside ``Product.world_sizes``.)"""
    p = ANY_PRODUCT if product is None else PRODUCTS[_product_name(product)]
    on = f"on {p.title}" if product else f"on any product ({', '.join(q.title for q in PRODUCTS.values())})"
    wd = spec.weight_dtype
    if wd not in p.granularities:
        _fail("x2", f"dtype {spec.weight_dtype}",
              f"not taken {on}: its kernel takes {', '.join(p.weight_dtypes)} weights")
    if spec.granularity not in p.granularities[wd]:
        _fail("antiquant_scale", f"shape {spec.scale_shape}",
              f"a {spec.granularity} scale with {wd} weights is not taken {on}: "
              f"{wd} takes {', '.join(g for g in GRANULARITIES if g in p.granularities[wd])} only")
    if spec.x2_format == "FRACTAL_NZ":
        allowed = p.nz_granularities.get(wd, frozenset())
        if not allowed:
            _fail("x2_format", spec.x2_format, f"{wd} weights must be ND {on}")
        if spec.granularity not in allowed:
            _fail("x2_format", spec.x2_format,
                  f"a FRACTAL_NZ weight with a {spec.granularity} scale is not taken {on}: "
                  f"FRACTAL_NZ takes {', '.join(sorted(allowed))} only")
    align = p.group_alignment.get(wd)
    if align and spec.granularity == "per_group":
        for name, v in (("k", spec.k), ("n", spec.n)):
            if v % align:
                _fail("x2", f"shape {spec.x2_shape}",
                      f"{name}={v}: per-group {wd} weights need n and k multiples of {align} {on}")


def _target_state():
    from jax._src import config as jax_config  # as jax's own flags: part of the jit cache key

    return jax_config.optional_enum_state(
        name="jax_wqmm_target_product", enum_values=list(PRODUCTS), default=None,
        help="Check every jax_wqmm call against this Ascend product's rules (None: accept "
             "what any product accepts).",
        include_in_jit_key=True, include_in_trace_context=True)


_TARGET_PRODUCT = _target_state()


def current_target_product() -> str | None:
    """The product whose rules every call is checked against (None: any product's)."""
    return _TARGET_PRODUCT.value


def target_product(product: str | None):
    """Checks every call traced inside against ``product``'s rules: ``"atlas_a2"`` or
    ``"ascend950"`` (:data:`PRODUCTS`); None: what any product accepts.

    A context manager (``with wq.target_product("atlas_a2"): ...``, per thread); the process
    setting is ``jax.config.update("jax_wqmm_target_product", name)`` or the environment
    variable ``JAX_WQMM_TARGET_PRODUCT``. The setting is part of jit's cache key, so a function
    traced under one product is traced again under another.
    """
    return _TARGET_PRODUCT(None if product is None else _product_name(product))


def unpack_operands(spec: WqmmSpec, operands: Sequence[Any]):
    """(x1, x2, scale, offset|None, bias|None, x3|None) from the present operands."""
    it = iter(operands)
    x1, x2, scale = next(it), next(it), next(it)
    offset = next(it) if spec.has_offset else None
    bias = next(it) if spec.has_bias else None
    x3 = next(it) if spec.has_x3 else None
    rest = list(it)
    assert not rest, f"{len(rest)} unexpected operands"
    return x1, x2, scale, offset, bias, x3


def pack_operands(x1, x2, scale, offset=None, bias=None, x3=None) -> tuple:
    """The inverse of :func:`unpack_operands`: the present operands in operator order."""
    return tuple(a for a in (x1, x2, scale, offset, bias, x3) if a is not None)
