"""Driving the native path on CPU against the host emulator of the CANN ABI.

The emulator (``libwqmm_cann_emulator.so``, built next to the extension) exports the CANN
symbols the handler calls and computes the operator on host memory, with a real all-reduce
across the device threads. :func:`use_emulator` points the loader at it and lowers the
primitive on the CPU platform through the native FFI handler instead of the default CPU lowering::

    import jax_wqmm.testing as wqt
    emu = wqt.use_emulator()
    wqt.create_groups(mesh, "tp")        # HCCL communicators (emulated) per tp group
    ...jit(shard_map(...))...            # one custom call per device, no XLA all-reduce
    wqt.use_default()                    # back to the default CPU lowering

Switching lowerings clears JAX's caches (``jax.clear_caches``), so functions compiled before
the switch are lowered again with the new rule.

The emulator's argument checks are ported from CANN's op_api and tiling for an emulated SoC
(:meth:`Emulator.set_soc`; Atlas A2 "Ascend910B4" by default). This is an emulation of the ABI:
it says nothing about CANN's own numerics or performance.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
from pathlib import Path

import jax

from . import native
from .hccl import create_groups, destroy_groups  # re-exported for convenience

__all__ = ["Emulator", "emulator_library_path", "use_emulator", "use_reference", "emulated_npu",
           "use_default", "default_lowering", "create_groups", "destroy_groups", "HOST_TARGET", "NOOP_TARGET"]

# platform -> the use_* function that set its lowering last (absent: use_default)
_lowering: dict = {}

HOST_TARGET = "wqmm_aclnn_host"
NOOP_TARGET = "wqmm_noop"


def emulator_library_path() -> Path:
    """The emulator shared library installed next to the extension."""
    return Path(__file__).with_name("libwqmm_cann_emulator.so")


class Emulator:
    """Test hooks of the loaded emulator."""

    def __init__(self, path: Path):
        self.path = path
        lib = ctypes.CDLL(os.fspath(path))
        for name in ("wqmm_emu_live_tensors", "wqmm_emu_live_executors", "wqmm_emu_timeout_ms",
                     "wqmm_emu_calls", "wqmm_emu_live_comms"):
            getattr(lib, name).restype = ctypes.c_int64
        lib.wqmm_emu_set_failure.argtypes = [ctypes.c_int, ctypes.c_int]
        lib.wqmm_emu_set_timeout_ms.argtypes = [ctypes.c_int64]
        lib.wqmm_emu_set_soc.argtypes = [ctypes.c_char_p]
        lib.aclrtGetSocName.restype = ctypes.c_char_p
        self._lib = lib

    def live_tensors(self) -> int:
        """aclTensor descriptors created and not yet destroyed."""
        return int(self._lib.wqmm_emu_live_tensors())

    def live_executors(self) -> int:
        return int(self._lib.wqmm_emu_live_executors())

    def live_comms(self) -> int:
        """Communicators created and not yet destroyed."""
        return int(self._lib.wqmm_emu_live_comms())

    def calls(self) -> int:
        """Operator runs (second stage) so far."""
        return int(self._lib.wqmm_emu_calls())

    @property
    def soc(self) -> str:
        """The emulated SoC name (what ``aclrtGetSocName`` returns)."""
        return self._lib.aclrtGetSocName().decode()

    def set_soc(self, soc: str) -> None:
        """Emulates another SoC: "Ascend910B4" (Atlas A2, the default), "Ascend950PR",
        "Ascend910_9391" (Atlas A3), "Ascend310P3", ... Clears JAX's caches (the native
        lowering checks the product it finds)."""
        self._lib.wqmm_emu_set_soc(soc.encode())
        jax.clear_caches()

    @contextlib.contextmanager
    def emulating(self, soc: str):
        """``with emu.emulating("Ascend950PR"):`` another SoC, then back."""
        old = self.soc
        self.set_soc(soc)
        try:
            yield self
        finally:
            self.set_soc(old)

    def set_failure(self, stage: str | None, code: int = 161002) -> None:
        """Every call of ``stage`` ("workspace" or "run") fails with ``code``; None clears."""
        self._lib.wqmm_emu_set_failure({None: 0, "workspace": 1, "run": 2}[stage], code)

    @contextlib.contextmanager
    def failing(self, stage: str, code: int = 161002):
        self.set_failure(stage, code)
        try:
            yield
        finally:
            self.set_failure(None)

    def set_timeout_ms(self, ms: int) -> None:
        """How long a rank waits for the others in the all-reduce and in group creation."""
        self._lib.wqmm_emu_set_timeout_ms(int(ms))

    @property
    def timeout_ms(self) -> int:
        return int(self._lib.wqmm_emu_timeout_ms())


@functools.cache
def _emulator(path: str) -> Emulator:
    return Emulator(Path(path))


def use_emulator(platform: str = "cpu") -> Emulator:
    """Loads the emulator as every CANN library and lowers the op on ``platform`` through the
    native handler's host binding. Returns the emulator's test hooks."""
    from .primitive import register_lowering

    path = emulator_library_path()
    if not path.exists():
        raise FileNotFoundError(f"{path}: the emulator is not built (install with `pip install .`)")
    if native.library_names().get("opapi") != (os.fspath(path),) or not native.extension().cann_loaded():
        native.configure_cann(lib_dirs=[], library_names={r: os.fspath(path) for r in native.DEFAULT_LIBRARY_NAMES})
    native.load_cann()
    native.register_targets(platform, HOST_TARGET, NOOP_TARGET)
    register_lowering(native.native_lowering(HOST_TARGET, platform), platform)
    jax.clear_caches()  # executables compiled with the previous lowering must not be reused
    _lowering[platform] = use_emulator
    return _emulator(os.fspath(path))


def use_reference(platform: str = "cpu") -> None:
    """Lowers the op on ``platform`` with the jnp reference (the oracle), from the next call
    on (JAX's caches are cleared)."""
    from . import cpu_kernel

    cpu_kernel.unregister(platform)
    jax.clear_caches()
    _lowering[platform] = use_reference


def use_default(platform: str = "cpu") -> None:
    """Restores the default lowering on ``platform``: the CPU kernel where the extension is
    built, else the jnp reference (from the next call on: JAX's caches are cleared)."""
    from . import cpu_kernel

    if not cpu_kernel.register(platform):
        cpu_kernel.unregister(platform)
    jax.clear_caches()
    _lowering[platform] = use_default


@contextlib.contextmanager
def default_lowering(platform: str = "cpu"):
    """``with default_lowering():`` the op lowers as after :func:`use_default`, and afterwards
    as it did before (the emulator or the reference, if a use_* function had set them)."""
    previous = _lowering.get(platform, use_default)
    use_default(platform)
    try:
        yield
    finally:
        previous(platform)


@contextlib.contextmanager
def emulated_npu(platform: str = "cpu"):
    """``with emulated_npu() as emu:`` the op lowers to the native handler on ``platform``."""
    emu = use_emulator(platform)
    try:
        yield emu
    finally:
        use_default(platform)
