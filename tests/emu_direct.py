"""Direct calls into the emulator's CANN ABI (ctypes), for testing its checks in isolation:
the descriptors are built here, by hand, as a caller other than jax_wqmm could build them."""

from __future__ import annotations

import ctypes
import dataclasses
import os

import ml_dtypes
import numpy as np

import jax_wqmm.testing as wqt

ACL = {"float16": 1, "bfloat16": 27, "float32": 0, "int8": 2, "int4": 29, "uint8": 4,
       "hifloat8": 34, "float8_e5m2": 35, "float8_e4m3fn": 36}
ND, NZ = 2, 29
_NP = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32, "int8": np.int8,
       "int4": np.int8, "uint8": np.uint8, "hifloat8": np.uint8, "float8_e5m2": np.uint8,
       "float8_e4m3fn": np.uint8}


@dataclasses.dataclass
class T:
    """One aclTensor to create: view dims, dtype; strides / storage default to contiguous."""
    view: tuple
    dtype: str = "bfloat16"
    strides: tuple | None = None
    storage: tuple | None = None
    fmt: int = ND

    def transposed(self) -> "T":
        """The same logical (r, c) view over (c, r) storage: strides (1, r)."""
        r, c = self.view
        return dataclasses.replace(self, strides=(1, r), storage=(c, r))


def contiguous(view):
    s, acc = [], 1
    for d in reversed(view):
        s.append(acc)
        acc *= d
    return tuple(reversed(s))


class Direct:
    def __init__(self):
        lib = ctypes.CDLL(os.fspath(wqt.emulator_library_path()))
        i64p = ctypes.POINTER(ctypes.c_int64)
        lib.aclCreateTensor.restype = ctypes.c_void_p
        lib.aclCreateTensor.argtypes = [i64p, ctypes.c_uint64, ctypes.c_int32, i64p, ctypes.c_int64,
                                        ctypes.c_int32, i64p, ctypes.c_uint64, ctypes.c_void_p]
        lib.aclDestroyTensor.argtypes = [ctypes.c_void_p]
        vp = ctypes.c_void_p
        lib.aclnnWeightQuantMatmulAllReduceGetWorkspaceSize.argtypes = [
            vp, vp, vp, vp, vp, vp, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int64, ctypes.c_int64,
            ctypes.c_int64, vp, ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(vp)]
        lib.aclnnWeightQuantMatmulAllReduce.argtypes = [vp, ctypes.c_uint64, vp, vp]
        lib.aclGetRecentErrMsg.restype = ctypes.c_char_p
        lib.HcclCommInitAll.argtypes = [ctypes.c_uint32, ctypes.POINTER(ctypes.c_int32), ctypes.POINTER(vp)]
        lib.HcclGetCommName.argtypes = [vp, ctypes.c_char_p]
        lib.HcclCommDestroy.argtypes = [vp]
        lib.aclrtSetDevice.argtypes = [ctypes.c_int32]
        self.lib = lib
        self._keep = []

    def group(self, devices=(0,)) -> str:
        """A communicator over ``devices`` (HcclCommInitAll); returns its group name."""
        n = len(devices)
        devs = (ctypes.c_int32 * n)(*devices)
        comms = (ctypes.c_void_p * n)()
        assert self.lib.HcclCommInitAll(n, devs, comms) == 0
        name = ctypes.create_string_buffer(129)
        assert self.lib.HcclGetCommName(comms[0], name) == 0
        for c in comms:
            self.lib.HcclCommDestroy(c)
        return name.value.decode()

    def set_device(self, device: int) -> None:
        assert self.lib.aclrtSetDevice(device) == 0

    def _create(self, t: T | None):
        if t is None:
            return None
        strides = t.strides or contiguous(t.view)
        storage = t.storage or t.view
        nbytes = max(1, int(np.prod(storage)) if storage else 1)
        buf = np.zeros(nbytes, _NP[t.dtype])
        self._keep.append(buf)
        arr = lambda v: (ctypes.c_int64 * max(1, len(v)))(*v)
        h = self.lib.aclCreateTensor(arr(t.view), len(t.view), ACL[t.dtype], arr(strides), 0, t.fmt,
                                     arr(storage), len(storage), buf.ctypes.data)
        assert h, "aclCreateTensor failed"
        return h

    def call(self, *, x1, x2, scale, out, group, bias=None, offset=None, x3=None, reduce_op="sum",
             comm_turn=0, stream_mode=1, group_size=0, run=True) -> tuple[int, str]:
        """GetWorkspaceSize (and the op, when it succeeds and ``run``); (status, message).
        Every descriptor is destroyed afterwards."""
        hs = [self._create(t) for t in (x1, x2, bias, scale, offset, x3, out)]
        try:
            ws = ctypes.c_uint64(0)
            ex = ctypes.c_void_p(None)
            st = self.lib.aclnnWeightQuantMatmulAllReduceGetWorkspaceSize(
                hs[0], hs[1], hs[2], hs[3], hs[4], hs[5], group.encode(), reduce_op.encode(), comm_turn,
                stream_mode, group_size, hs[6], ctypes.byref(ws), ctypes.byref(ex))
            msg = (self.lib.aclGetRecentErrMsg() or b"").decode()
            if st == 0 and run:
                buf = ctypes.create_string_buffer(max(1, ws.value))
                st = self.lib.aclnnWeightQuantMatmulAllReduce(buf, ws.value, ex, None)
                msg = (self.lib.aclGetRecentErrMsg() or b"").decode()
            return st, msg
        finally:
            for h in hs:
                if h:
                    self.lib.aclDestroyTensor(h)
            self._keep.clear()
