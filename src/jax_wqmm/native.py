"""The native path: the nanobind extension, finding the CANN libraries, and the FFI lowering.

Nothing here runs at import: the extension and CANN are loaded on first use, so importing
jax_wqmm never fails because CANN (or the extension) is absent.

Library lookup, per role (libascendcl, libnnopbase, HCCL and the op library), in:
  1. the explicit setting: :func:`configure_cann` (``lib_dirs``), else ``$JAX_WQMM_CANN_LIB_DIR``
     (``:``-separated);
  2. ``$ASCEND_HOME_PATH/lib64``, ``$ASCEND_TOOLKIT_HOME/lib64``,
     ``/usr/local/Ascend/ascend-toolkit/latest/lib64``, ``/usr/local/Ascend/cann/lib64``;
  3. the dynamic loader's default path (``LD_LIBRARY_PATH``, ldconfig).
The op library: in each directory ``libopapi_transformer.so`` (CANN 9.x ships the MC2 ops
there), then the deprecated ``libopapi.so``; the first file exporting both aclnn entry points
wins. HCCL: each ``Hccl*`` symbol from ``libhccl.so``, else ``libhcomm.so`` (CANN >= 8.5).
Settings override the names (``configure_cann(op_library=...)``, ``$JAX_WQMM_OPAPI_LIBRARY``).
:func:`cann_status` says which file every symbol came from.

Devices: the handler makes the buffer's device current on its thread before any aclnn or HCCL
call (``aclrtGetDevice`` / ``aclrtSetDevice``) with XLA's local device ordinal, which the Ascend
PJRT plugin is assumed to number as CANN's logical device ids (0..N-1 of the devices visible
under ``ASCEND_RT_VISIBLE_DEVICES``, not hardware ids). ``aclInit`` is never called: the PJRT
plugin owns ACL's initialization.
"""

from __future__ import annotations

import functools
import math
import os
import re
import threading
import warnings
from typing import Mapping, Sequence

import jax
import numpy as np

from .spec import PRODUCTS, WqmmSpec, check_product, current_target_product

__all__ = [
    "CannLibraryError",
    "configure_cann",
    "load_cann",
    "cann_status",
    "library_search_dirs",
    "library_names",
    "ffi_attributes",
    "native_lowering",
    "register_npu_lowering",
    "npu_product",
    "product_of",
    "NPU_PLATFORM",
]

ENV_LIB_DIR = "JAX_WQMM_CANN_LIB_DIR"
ENV_OP_LIBRARY = "JAX_WQMM_OPAPI_LIBRARY"
ENV_PLATFORM = "JAX_WQMM_NPU_PLATFORM"
#: The platform name of the Ascend PJRT plugin (unconfirmed; "npu" is the likely one).
NPU_PLATFORM = os.environ.get(ENV_PLATFORM, "npu")

#: Candidate file names per library role, in order (see the module docstring).
DEFAULT_LIBRARY_NAMES = {
    "ascendcl": ("libascendcl.so",),
    "nnopbase": ("libnnopbase.so",),
    "hccl": ("libhccl.so", "libhcomm.so"),
    "opapi": ("libopapi_transformer.so", "libopapi.so"),
}
# aclDataType / aclFormat codes (ffi/cann_abi.h)
ACL_WEIGHT_DTYPE = {"int8": 2, "int4": 29, "hifloat8": 34, "float8_e5m2": 35, "float8_e4m3fn": 36}
ACL_FORMAT = {"ND": 2, "FRACTAL_NZ": 29}

_lock = threading.Lock()
_config: dict = {"lib_dirs": None, "names": {}}


class CannLibraryError(RuntimeError):
    """The CANN libraries (or a symbol in them) could not be loaded; the message lists every
    path tried and every symbol missing."""


class NativeExtensionError(ImportError):
    """The compiled extension jax_wqmm._wqmm_ffi is not importable."""


@functools.cache
def extension():
    """The compiled extension module (imported on first use)."""
    try:
        from . import _wqmm_ffi  # type: ignore[attr-defined]
    except ImportError as e:  # pragma: no cover - depends on the install
        raise NativeExtensionError(
            "jax_wqmm._wqmm_ffi is not built: install the package with `pip install .` "
            f"(a C++17 compiler is needed): {e}") from e
    return _wqmm_ffi


def configure_cann(
    lib_dirs: Sequence[str] | None = None,
    op_library: str | None = None,
    library_names: Mapping[str, str] | None = None,
) -> None:
    """Sets where the CANN libraries are found; the next use reloads them.

    Args:
      lib_dirs: directories searched first (before the CANN install locations).
      op_library: the op library's file name or path (default: ``libopapi_transformer.so``,
        then ``libopapi.so``).
      library_names: file name or path per role ("ascendcl", "nnopbase", "hccl", "opapi"),
        or a sequence of them tried in order.

    Raises:
      RuntimeError: communicators made by :func:`jax_wqmm.hccl.create_groups` still exist
        (they belong to the loaded libraries): call ``hccl.destroy_groups()`` first.
    """
    names = {role: _names(v) for role, v in (library_names or {}).items()}
    if op_library is not None:
        names["opapi"] = _names(op_library)
    unknown = set(names) - set(DEFAULT_LIBRARY_NAMES)
    if unknown:  # before any setting changes
        raise ValueError(f"library_names: unknown roles {sorted(unknown)}; "
                         f"the roles are {sorted(DEFAULT_LIBRARY_NAMES)}")
    from . import hccl

    live = hccl.live_communicators()
    if live:
        raise RuntimeError(
            f"configure_cann: {live} HCCL communicator(s) made by jax_wqmm.hccl.create_groups "
            "still use the loaded CANN libraries; call jax_wqmm.hccl.destroy_groups() first")
    with _lock:
        _config["lib_dirs"] = None if lib_dirs is None else [os.fspath(d) for d in lib_dirs]
        _config["names"] = names
        if extension.cache_info().currsize:  # loaded before: drop it, the next use reloads
            extension().unload_cann()


def library_search_dirs() -> list[str]:
    """The directories searched, in order (the loader's default path comes last, implicitly)."""
    explicit = _config["lib_dirs"]
    if explicit is None:
        explicit = [d for d in os.environ.get(ENV_LIB_DIR, "").split(os.pathsep) if d]
    dirs = list(explicit)
    for var in ("ASCEND_HOME_PATH", "ASCEND_TOOLKIT_HOME"):
        if os.environ.get(var):
            dirs.append(os.path.join(os.environ[var], "lib64"))
    dirs += ["/usr/local/Ascend/ascend-toolkit/latest/lib64", "/usr/local/Ascend/cann/lib64"]
    return dirs


def _names(v) -> tuple[str, ...]:
    return (os.fspath(v),) if isinstance(v, (str, os.PathLike)) else tuple(os.fspath(x) for x in v)


def library_names() -> dict[str, tuple[str, ...]]:
    """The candidate library file names (or paths) per role, in the order tried."""
    names = dict(DEFAULT_LIBRARY_NAMES)
    if os.environ.get(ENV_OP_LIBRARY):
        names["opapi"] = (os.environ[ENV_OP_LIBRARY],)
    names.update(_config["names"])
    return names


def load_cann() -> None:
    """Loads the CANN libraries if not loaded; raises :class:`CannLibraryError` listing every
    path tried and every missing symbol."""
    ext = extension()
    with _lock:
        if ext.cann_loaded():
            return
        report = ext.load_cann(library_search_dirs(), {r: list(v) for r, v in library_names().items()})
    if report:
        raise CannLibraryError(
            "jax_wqmm could not load the CANN libraries:\n" + report
            + f"Point it at a CANN install with ${ENV_LIB_DIR}=<dir> or "
              "jax_wqmm.native.configure_cann(lib_dirs=[...]); set the op library with "
              f"${ENV_OP_LIBRARY} or configure_cann(op_library=...).")


def cann_status() -> dict:
    """What is loaded: {"loaded": bool, "paths": {role: paths}, "symbols": {symbol: path},
    "soc": aclrtGetSocName() or "", "search_dirs": [...], "names": {role: candidates}}."""
    ext = extension()
    loaded = ext.cann_loaded()
    return {"loaded": loaded, "paths": dict(ext.cann_paths()), "symbols": dict(ext.cann_symbols()),
            "soc": ext.soc_name() if loaded else "",
            "search_dirs": library_search_dirs(), "names": library_names()}


# ------------------------------------------------------------------------------ products

# (pattern over a PJRT device kind or CANN SoC name, product key or None, title). Order matters.
_PRODUCT_PATTERNS = (
    (re.compile(r"910_?93|atlas.?a3", re.I), None, "Atlas A3"),
    (re.compile(r"910B|atlas.?(800T|900|200T)?.?a2", re.I), "atlas_a2", "Atlas A2"),
    (re.compile(r"950", re.I), "ascend950", "Ascend 950PR/950DT"),
    (re.compile(r"310", re.I), None, "Atlas inference series (310)"),
    (re.compile(r"910", re.I), None, "Ascend 910 training series"),
)


def product_of(name: str) -> tuple[str | None, str] | None:
    """(product key or None when no kernel exists there, title) for a PJRT device kind or a
    CANN SoC name (e.g. "Ascend910B4" -> ("atlas_a2", "Atlas A2")); None when unrecognized."""
    for pattern, key, title in _PRODUCT_PATTERNS:
        if pattern.search(name or ""):
            return key, title
    return None


def npu_product(platform: str | None = None) -> str:
    """The product whose kernel runs the op here: the :func:`jax_wqmm.target_product` setting;
    else the PJRT device kind of ``platform``'s devices; else CANN's ``aclrtGetSocName()``;
    else Atlas A2, with a warning.

    Raises:
      ConstraintError: the device is a product without a kernel for the operator.
    """
    from .spec import ConstraintError

    chosen = current_target_product()
    if chosen is not None:
        return chosen
    seen = []
    try:
        kinds = {d.device_kind for d in jax.devices(platform or NPU_PLATFORM)}
    except RuntimeError:
        kinds = set()
    soc = extension().soc_name() if extension().cann_loaded() else ""
    for name in sorted(kinds) + [soc]:
        if not name:
            continue
        seen.append(name)
        found = product_of(name)
        if found is None:
            continue
        key, title = found
        if key is None:
            raise ConstraintError(
                "device", name, f"{title} has no kernel of aclnnWeightQuantMatmulAllReduce "
                f"(supported: {', '.join(p.title for p in PRODUCTS.values())})")
        return key
    _warn_once(("product", tuple(seen)), (
        f"jax_wqmm: no known Ascend product in the device kind / SoC name {seen or ['(none)']}; "
        "checking calls against the Atlas A2 rules (set jax_wqmm.target_product(...) to choose)"))
    return "atlas_a2"


# ------------------------------------------------------------------------------ lowering

def axis_key(axis_name: Sequence[str]) -> str:
    """The group-registry key of a (tuple of) mesh axis name(s)."""
    return ",".join(axis_name)


def ffi_attributes(spec: WqmmSpec, scale_transposed: bool = False) -> dict:
    """The FFI attributes of a validated call (names and types as ffi/wqmm_attrs.h binds).
    ``scale_transposed``: the scale / offset operands are passed column-major (the NPU
    lowering does this when ``spec.scale_transposed``)."""
    return dict(
        axis=axis_key(spec.axis_name),
        antiquant_group_size=np.int64(spec.group_size),
        transpose_x2=bool(spec.transpose_x2),
        scale_transposed=bool(scale_transposed),
        x2_format=np.int32(ACL_FORMAT[spec.x2_format]),
        x2_dtype=np.int32(ACL_WEIGHT_DTYPE[spec.weight_dtype]),
        has_offset=bool(spec.has_offset),
        has_bias=bool(spec.has_bias),
        has_x3=bool(spec.has_x3),
        k=np.int64(spec.k),
        n=np.int64(spec.n),
        reduce_op=spec.reduce_op,
        comm_turn=np.int64(spec.comm_turn),
        stream_mode=np.int64(spec.stream_mode),
    )


def _axis_sizes(ctx, axis_name: Sequence[str]) -> list[int]:
    mesh = getattr(ctx.module_context.axis_context, "mesh", None)
    if mesh is None:
        raise NotImplementedError(
            f"jax_wqmm: the native lowering needs the mesh of axis_name={tuple(axis_name)}: "
            "call the op inside jax.shard_map")
    return [int(mesh.shape[a]) for a in axis_name]


_warned: set = set()


def _warn_once(key, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=2)


def native_lowering(target: str, platform: str | None = None):
    """A lowering rule: one custom call into ``target`` (the all-reduce inside it), or the
    reference lowering (matmul + XLA all-reduce) where the fused kernel cannot run.

    The call is checked against the rules of the product that runs it (:func:`npu_product`
    of ``platform``): a call that product's kernel would reject raises ConstraintError here,
    at lowering time, naming the product.
    """

    from .primitive import reference_lowering

    def rule(ctx, *operands, spec: WqmmSpec):
        if not spec.axis_name:
            # No reduction: the MC2 kernel has nothing to fuse; XLA's dequantize + dot runs.
            return reference_lowering(ctx, *operands, spec=spec)
        load_cann()
        product = npu_product(platform)
        check_product(spec, product)
        world = math.prod(_axis_sizes(ctx, spec.axis_name))
        sizes = PRODUCTS[product].world_sizes
        if world not in sizes:
            _warn_once(("axis_size", product, world), (
                f"jax_wqmm: axis_name={spec.axis_name} spans {world} devices; "
                f"aclnnWeightQuantMatmulAllReduce on {PRODUCTS[product].title} supports "
                f"{', '.join(map(str, sorted(sizes)))} ranks, so this call falls back to the "
                "reference lowering (dequantize + matmul + XLA all-reduce)."))
            return reference_lowering(ctx, *operands, spec=spec)
        # The kernel wants a per-group scale / offset transposed together with x2: XLA hands
        # them over column-major, i.e. (G, n) views of (n, G) storage (minor-to-major (0, 1)).
        layouts = None
        if spec.scale_transposed:
            layouts = [None] * len(operands)
            layouts[2] = (0, 1)
            if spec.has_offset:
                layouts[3] = (0, 1)
        # has_side_effect: the custom call hides a collective, so XLA must run it on every
        # rank even where its result is unused (else the other ranks wait forever).
        return jax.ffi.ffi_lowering(target, operand_layouts=layouts, has_side_effect=True)(
            ctx, *operands, **ffi_attributes(spec, scale_transposed=spec.scale_transposed))

    return rule


_registered_targets: set = set()


def register_targets(platform: str, *names: str) -> None:
    """Registers the extension's FFI targets ``names`` for ``platform`` (once each)."""
    regs = extension().registrations()
    for name in names:
        if (name, platform) not in _registered_targets:
            jax.ffi.register_ffi_target(name, regs[name], platform=platform)
            _registered_targets.add((name, platform))


def register_npu_lowering(platform: str | None = None) -> bool:
    """Makes ``platform`` (default :data:`NPU_PLATFORM`) lower the op to the fused kernel.

    Returns False (and does nothing) when JAX knows no such platform (no PJRT plugin
    loaded): JAX refuses lowerings for unknown platforms. Loads nothing from CANN: that
    happens at the first lowering, which raises :class:`CannLibraryError` if CANN is missing.
    """
    from jax._src import xla_bridge
    from .primitive import register_lowering

    platform = platform or NPU_PLATFORM
    if not xla_bridge.is_known_platform(platform):
        return False
    register_targets(platform, "wqmm_aclnn_device")
    register_lowering(native_lowering("wqmm_aclnn_device", platform), platform)
    return True
