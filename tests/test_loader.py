"""Finding CANN: the op library and HCCL candidates, the report of what was tried, and where
each symbol came from. The emulator library stands in for every CANN file (symlinked under
the names CANN uses); libm stands in for a library that lacks the symbols."""

import os
import re

import pytest

import jax_wqmm.testing as wqt
from jax_wqmm import hccl, native


@pytest.fixture
def emu():
    wqt.destroy_groups()  # configure_cann refuses while communicators exist
    emulator = wqt.use_emulator()
    yield emulator
    native.configure_cann(lib_dirs=[], library_names={})  # back to the defaults, then the emulator
    wqt.use_emulator()
    wqt.use_default()


def _libm() -> str:
    with open("/proc/self/maps") as f:
        for line in f:
            m = re.search(r"(/\S*/libm\.so\.6)$", line.strip())
            if m:
                return m.group(1)
    pytest.fail("libm.so.6 is not mapped in this process")


def _install(tmp_path, files: dict[str, str]) -> str:
    """A fake CANN lib64: name -> target file (symlinks)."""
    d = tmp_path / "lib64"
    d.mkdir()
    for name, target in files.items():
        os.symlink(target, d / name)
    return str(d)


def _emulated_cann(tmp_path, **overrides) -> str:
    emu = os.fspath(wqt.emulator_library_path())
    files = {"libascendcl.so": emu, "libnnopbase.so": emu, "libhccl.so": emu,
             "libopapi_transformer.so": emu, "libopapi.so": emu}
    files.update(overrides)
    return _install(tmp_path, {k: v for k, v in files.items() if v})


def test_default_names_prefer_the_per_family_op_library(emu, tmp_path):
    d = _emulated_cann(tmp_path)
    native.configure_cann(lib_dirs=[d], library_names={})
    native.load_cann()
    status = native.cann_status()
    assert status["symbols"]["aclnnWeightQuantMatmulAllReduce"] == f"{d}/libopapi_transformer.so"
    assert status["symbols"]["aclnnWeightQuantMatmulAllReduceGetWorkspaceSize"] == f"{d}/libopapi_transformer.so"
    assert status["symbols"]["aclrtSetDevice"] == f"{d}/libascendcl.so"
    assert status["symbols"]["HcclCommInitRootInfo"] == f"{d}/libhccl.so"
    assert status["soc"] == "Ascend910B4"


def test_op_library_without_the_entry_points_is_skipped(emu, tmp_path):
    """libopapi_transformer.so without the operator (e.g. an older split): libopapi.so wins."""
    d = _emulated_cann(tmp_path, **{"libopapi_transformer.so": _libm()})
    native.configure_cann(lib_dirs=[d], library_names={})
    native.load_cann()
    assert native.cann_status()["symbols"]["aclnnWeightQuantMatmulAllReduce"] == f"{d}/libopapi.so"


def test_hccl_symbols_fall_back_to_libhcomm(emu, tmp_path):
    """CANN >= 8.5: communicator functions may live in libhcomm.so."""
    d = _emulated_cann(tmp_path, **{"libhccl.so": _libm(), "libhcomm.so": os.fspath(wqt.emulator_library_path())})
    native.configure_cann(lib_dirs=[d], library_names={})
    native.load_cann()
    symbols = native.cann_status()["symbols"]
    for name in ("HcclGetCommName", "HcclCommInitAll", "HcclGetRootInfo", "HcclCommInitRootInfo", "HcclCommDestroy"):
        assert symbols[name] == f"{d}/libhcomm.so", name


def test_the_setting_overrides_the_op_library(emu, tmp_path):
    d = _emulated_cann(tmp_path)
    native.configure_cann(lib_dirs=[d], op_library="libopapi.so")
    native.load_cann()
    assert native.cann_status()["symbols"]["aclnnWeightQuantMatmulAllReduce"] == f"{d}/libopapi.so"


def test_missing_library_lists_every_path_tried(emu, tmp_path, monkeypatch):
    monkeypatch.setenv("ASCEND_HOME_PATH", str(tmp_path / "ascend"))
    native.configure_cann(lib_dirs=[str(tmp_path / "mine")], library_names={})
    with pytest.raises(native.CannLibraryError) as info:
        native.load_cann()
    msg = str(info.value)
    for fragment in (str(tmp_path / "mine" / "libopapi_transformer.so"),
                     str(tmp_path / "mine" / "libopapi.so"),
                     str(tmp_path / "ascend" / "lib64" / "libnnopbase.so"),
                     "/usr/local/Ascend/ascend-toolkit/latest/lib64/libhccl.so",
                     "/usr/local/Ascend/cann/lib64/libhcomm.so",
                     "/usr/local/Ascend/cann/lib64/libascendcl.so",
                     "libopapi_transformer.so (loader default path)",
                     "opapi (libopapi_transformer.so, libopapi.so): not loaded",
                     "JAX_WQMM_CANN_LIB_DIR"):
        assert fragment in msg, (fragment, msg)
    # the op-library directories are searched one by one, each for both names in order
    order = [msg.index(str(tmp_path / "mine" / n)) for n in ("libopapi_transformer.so", "libopapi.so")]
    assert order == sorted(order) and order[1] < msg.index(str(tmp_path / "ascend" / "lib64" / "libopapi_transformer.so"))


def test_missing_symbol_is_named(emu):
    # A real library without the CANN symbols: libm as every role.
    native.configure_cann(lib_dirs=[], library_names={r: "libm.so.6" for r in native.DEFAULT_LIBRARY_NAMES})
    with pytest.raises(native.CannLibraryError) as info:
        native.load_cann()
    msg = str(info.value)
    assert "libm.so.6: loaded, but missing symbol aclnnWeightQuantMatmulAllReduceGetWorkspaceSize aclnnWeightQuantMatmulAllReduce" in msg
    assert "missing symbol aclrtGetDevice in libm.so.6 (ascendcl)" in msg
    assert "missing symbol HcclCommInitRootInfo in libm.so.6 (hccl)" in msg


def test_configure_cann_refuses_while_communicators_exist(emu):
    import jax

    mesh = jax.make_mesh((2,), ("loader_tp",), devices=jax.devices()[:2])
    wqt.create_groups(mesh, "loader_tp")
    assert hccl.live_communicators() == 2
    with pytest.raises(RuntimeError, match=r"2 HCCL communicator\(s\).*destroy_groups\(\) first"):
        native.configure_cann(lib_dirs=[])
    wqt.destroy_groups()  # ... and afterwards the libraries are still usable
    assert hccl.live_communicators() == 0
    native.configure_cann(lib_dirs=[], library_names={r: os.fspath(wqt.emulator_library_path())
                                                      for r in native.DEFAULT_LIBRARY_NAMES})
    native.load_cann()
