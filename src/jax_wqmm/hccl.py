"""HCCL communicator groups per mesh axis and device, for the native path.

The fused kernel names its communicator by the HCCL group name (``HcclGetCommName``). The
custom call carries the mesh axis; the handler maps (axis, local device ordinal) to a group
name through a registry that this module fills:

- :func:`register_group`: a name the user already has (e.g. from torch_npu);
- :func:`create_groups`: one communicator per group of devices along a mesh axis (a 2-D
  (dp, tp) mesh has one tp group per dp index), with ``HcclCommInitAll`` when the group's
  devices are all in this process, else ``HcclGetRootInfo`` + ``HcclCommInitRootInfo`` with
  the root info exchanged through jax.distributed's key-value store.
"""

from __future__ import annotations

import atexit
import base64
import itertools
import threading
from typing import Sequence

import jax
import numpy as np

from . import native
from .spec import normalize_axis_name

__all__ = ["register_group", "create_groups", "destroy_groups", "registered_groups", "device_ordinal",
           "live_communicators"]

_comms: list[int] = []
_lock = threading.Lock()
# create_groups calls in this process, in order: every process makes the same calls, so the
# n-th call's key-value keys match across processes and are never those of an earlier call.
_calls = itertools.count()


def live_communicators() -> int:
    """Communicators :func:`create_groups` made and :func:`destroy_groups` has not destroyed."""
    with _lock:
        return len(_comms)


def device_ordinal(device: jax.Device) -> int:
    """The local device ordinal XLA hands the handler (``DeviceOrdinal``), which the handler
    makes current (``aclrtSetDevice``) as CANN's logical device id."""
    if device.platform == "cpu":  # XLA's CPU client hands FFI handlers the global device id
        return int(device.id)
    hw = getattr(device, "local_hardware_id", None)  # accelerators: the local ordinal
    return int(device.id if hw is None else hw)


def register_group(axis_name: str | Sequence[str], device: jax.Device | int, name: str) -> None:
    """Registers an existing HCCL group ``name`` for ``device`` along ``axis_name``."""
    axes = normalize_axis_name(axis_name)
    ordinal = device if isinstance(device, int) else device_ordinal(device)
    native.extension().register_group(native.axis_key(axes), ordinal, name)


def registered_groups() -> dict[tuple[str, int], str]:
    """{(axis key, local device ordinal): group name}."""
    return dict(native.extension().groups())


def _groups_along(mesh: jax.sharding.Mesh, axes: tuple[str, ...]) -> list[list[jax.Device]]:
    """Device groups that reduce together over ``axes``: one per index of the other axes."""
    names = list(mesh.axis_names)
    for a in axes:
        if a not in names:
            raise ValueError(f"axis_name={axes}: {a!r} is not an axis of the mesh {tuple(names)}")
    order = [names.index(a) for a in names if a not in axes] + [names.index(a) for a in axes]
    devs = np.transpose(mesh.devices, order)
    size = int(np.prod([mesh.shape[a] for a in axes]))
    return [list(row) for row in devs.reshape(-1, size)]


def create_groups(mesh: jax.sharding.Mesh, axis_name: str | Sequence[str]) -> dict[jax.Device, str]:
    """Creates and registers one HCCL communicator per group of devices along ``axis_name``.

    Returns {device: group name} for this process's devices. Multi-process groups need
    ``jax.distributed.initialize`` (its key-value store carries the root info).
    """
    native.load_cann()
    ext = native.extension()
    axes = normalize_axis_name(axis_name)
    key = native.axis_key(axes)
    me = jax.process_index()
    call = next(_calls)
    out: dict[jax.Device, str] = {}
    for gi, group in enumerate(_groups_along(mesh, axes)):
        local = [d for d in group if d.process_index == me]
        if not local:
            continue
        if len(local) == len(group):
            comms = ext.hccl_comm_init_all([device_ordinal(d) for d in group])
            results = list(zip(group, comms))
        else:
            root = _exchange_root_info(ext, f"jax_wqmm/hccl/{call}/{key}/{gi}", group[0].process_index == me,
                                       device_ordinal(local[0]))
            results = _init_root_info(ext, group, local, root)
        for d, (handle, name) in results:
            with _lock:
                _comms.append(handle)
            ext.register_group(key, device_ordinal(d), name)
            out[d] = name
    return out


def _exchange_root_info(ext, kv_key: str, is_root: bool, device: int = 0) -> bytes:
    """The group's root info: made on ``device`` (current on this thread for HCCL) by the
    group's first process and published under ``kv_key``; read from there by the others."""
    from jax._src import distributed
    client = distributed.global_state.client
    if client is None:
        raise RuntimeError("create_groups: a group spans processes; call jax.distributed.initialize() first")
    if is_root:
        root = ext.hccl_get_root_info(device)
        client.key_value_set(kv_key, base64.b64encode(root).decode())
        return root
    return base64.b64decode(client.blocking_key_value_get(kv_key, 120_000))


def _init_root_info(ext, group, local, root: bytes):
    results, errors = {}, []

    def init(d):
        try:
            results[d] = ext.hccl_comm_init_root_info(device_ordinal(d), len(group), root, group.index(d))
        except Exception as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=init, args=(d,)) for d in local]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return [(d, results[d]) for d in local]


def _destroy_at_exit() -> None:
    """Communicators still alive at interpreter exit are destroyed (HCCL frees its resources,
    and the other processes' ranks see this one leave instead of a hang)."""
    try:
        destroy_groups()
    except Exception:  # noqa: BLE001 - the libraries may already be gone at exit
        pass


def destroy_groups() -> None:
    """Destroys every communicator :func:`create_groups` made and clears the registry."""
    ext = native.extension()
    with _lock:
        handles = list(_comms)
        _comms.clear()
    for h in handles:
        ext.hccl_comm_destroy(h)
    ext.clear_groups()


atexit.register(_destroy_at_exit)
