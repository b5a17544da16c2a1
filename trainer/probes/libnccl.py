"""NCCL called directly through ctypes, for the all-reduce probe.

``torch.distributed.all_reduce`` reduces in place only, and every call passes through
ProcessGroupNCCL's work bookkeeping and a hop to its own CUDA stream. nccl-tests'
all_reduce_perf calls ``ncclAllReduce(sendbuff, recvbuff, ...)`` on one stream. This module
does the same from Python, on a communicator of its own, so that the probe can measure
what the fabric gives, out of place without a copy, and compare like with like.

The library is the NCCL that torch loaded (found by its soname, so the process keeps one
copy), else the one in torch's ``nvidia/nccl`` wheel, else the system's. The declarations
below follow nccl.h of NCCL 2.x:

    ncclResult_t ncclGetVersion(int *version);
    ncclResult_t ncclGetUniqueId(ncclUniqueId *uniqueId);
    ncclResult_t ncclCommInitRank(ncclComm_t *comm, int nranks, ncclUniqueId commId, int rank);
    ncclResult_t ncclAllReduce(const void *sendbuff, void *recvbuff, size_t count,
                               ncclDataType_t datatype, ncclRedOp_t op, ncclComm_t comm,
                               cudaStream_t stream);
    ncclResult_t ncclCommDestroy(ncclComm_t comm);
    const char *ncclGetErrorString(ncclResult_t result);

This module must only need torch: the nodes have the trainer package, not dsk_provision.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from collections.abc import Callable
from pathlib import Path

import torch

SONAME = "libnccl.so.2"
UNIQUE_ID_BYTES = 128  # NCCL_UNIQUE_ID_BYTES
SUCCESS = 0  # ncclSuccess
SUM = 0  # ncclSum

# ncclDataType_t
DATATYPES = {
    torch.int8: 0,
    torch.uint8: 1,
    torch.int32: 2,
    torch.int64: 4,
    torch.float16: 6,
    torch.float32: 7,
    torch.float64: 8,
    torch.bfloat16: 9,
}


class NcclUnavailable(RuntimeError):
    """No NCCL library could be loaded, or it lacks a function this module needs."""


class NcclError(RuntimeError):
    """An NCCL call returned something other than ncclSuccess."""


class _UniqueId(ctypes.Structure):
    _fields_ = [("internal", ctypes.c_ubyte * UNIQUE_ID_BYTES)]


def decode_version(code: int) -> str:
    """NCCL_VERSION_CODE as 'major.minor.patch' (major*10000 + minor*100 + patch since 2.9,
    major*1000 + minor*100 + patch before)."""
    if code >= 10000:
        major, rest = divmod(code, 10000)
    else:
        major, rest = divmod(code, 1000)
    minor, patch = divmod(rest, 100)
    return f"{major}.{minor}.{patch}"


def candidates() -> list[str]:
    """Where to look, in order: the soname (the copy torch loaded, or the loader's path),
    then every ``nvidia/nccl/lib`` beside an entry of sys.path (NVIDIA's wheels)."""
    found = [SONAME]
    for entry in sys.path:
        path = Path(entry or ".") / "nvidia" / "nccl" / "lib" / SONAME
        if path.is_file() and str(path) not in found:
            found.append(str(path))
    return found


def _declare(lib: ctypes.CDLL) -> None:
    vp, res = ctypes.c_void_p, ctypes.c_int
    signatures = {
        "ncclGetVersion": ([ctypes.POINTER(ctypes.c_int)], res),
        "ncclGetUniqueId": ([ctypes.POINTER(_UniqueId)], res),
        "ncclCommInitRank": ([ctypes.POINTER(vp), ctypes.c_int, _UniqueId, ctypes.c_int], res),
        "ncclAllReduce": ([vp, vp, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, vp, vp], res),
        "ncclCommDestroy": ([vp], res),
        "ncclGetErrorString": ([res], ctypes.c_char_p),
    }
    for name, (argtypes, restype) in signatures.items():
        try:
            fn = getattr(lib, name)
        except AttributeError as exc:
            raise NcclUnavailable(f"{lib._name} has no {name}") from exc
        fn.argtypes, fn.restype = argtypes, restype


class Library:
    """One loaded NCCL library. ``path`` None searches :func:`candidates`."""

    def __init__(self, path: str | None = None):
        tried = [path] if path else candidates()
        errors = []
        for name in tried:
            try:
                lib = ctypes.CDLL(name)
            except OSError as exc:
                errors.append(f"{name}: {exc}")
                continue
            _declare(lib)
            self.lib, self.path = lib, name
            break
        else:
            raise NcclUnavailable("no NCCL library could be loaded (" + "; ".join(errors) + ")")
        code = ctypes.c_int()
        self.check(self.lib.ncclGetVersion(ctypes.byref(code)), "ncclGetVersion")
        self.version = decode_version(code.value)

    def check(self, result: int, call: str) -> None:
        if result != SUCCESS:
            text = self.lib.ncclGetErrorString(result) or b"unknown error"
            raise NcclError(f"{call} failed: {text.decode(errors='replace')} "
                            f"(ncclResult_t {result})")

    def unique_id(self) -> bytes:
        """A new communicator's id, made on one rank and handed to all (ncclGetUniqueId)."""
        uid = _UniqueId()
        self.check(self.lib.ncclGetUniqueId(ctypes.byref(uid)), "ncclGetUniqueId")
        return bytes(uid)  # all 128 bytes: an id may hold zeros

    def communicator(self, nranks: int, uid: bytes, rank: int) -> Communicator:
        """Join the communicator ``uid`` as ``rank`` of ``nranks``; every rank must call this
        (ncclCommInitRank blocks until all have). On a GPU, the current CUDA device's."""
        if len(uid) != UNIQUE_ID_BYTES:
            raise ValueError(f"an NCCL unique id has {UNIQUE_ID_BYTES} bytes, got {len(uid)}")
        comm = ctypes.c_void_p()
        self.check(self.lib.ncclCommInitRank(ctypes.byref(comm), int(nranks),
                                             _UniqueId.from_buffer_copy(uid), int(rank)),
                   "ncclCommInitRank")
        return Communicator(self, comm)


class Communicator:
    """An NCCL communicator made by :meth:`Library.communicator`."""

    def __init__(self, library: Library, handle: ctypes.c_void_p):
        self.library, self.handle = library, handle

    def all_reduce_call(self, send: torch.Tensor, recv: torch.Tensor,
                        stream: int) -> Callable[[], None]:
        """A call that sums ``send`` over the ranks into ``recv`` on ``stream`` (a
        cudaStream_t; 0 is the legacy default stream). ``send is recv`` reduces in place.
        The arguments are checked and converted once, so each call costs what NCCL's does."""
        if send.dtype != recv.dtype or send.numel() != recv.numel():
            raise ValueError(f"send and receive buffers differ: {send.dtype} x {send.numel()} "
                             f"against {recv.dtype} x {recv.numel()}")
        if send.device != recv.device:
            raise ValueError(f"send is on {send.device}, receive on {recv.device}")
        if not (send.is_contiguous() and recv.is_contiguous()):
            raise ValueError("NCCL needs contiguous buffers")
        if send.dtype not in DATATYPES:
            raise ValueError(f"NCCL has no data type for {send.dtype}")
        if self.handle is None:
            raise ValueError("the communicator is closed")
        fn = functools.partial(
            self.library.lib.ncclAllReduce, ctypes.c_void_p(send.data_ptr()),
            ctypes.c_void_p(recv.data_ptr()), ctypes.c_size_t(send.numel()),
            ctypes.c_int(DATATYPES[send.dtype]), ctypes.c_int(SUM), self.handle,
            ctypes.c_void_p(stream))
        check = self.library.check

        def call() -> None:
            check(fn(), "ncclAllReduce")
        return call

    def close(self) -> None:
        if self.handle is not None:
            handle, self.handle = self.handle, None
            self.library.check(self.library.lib.ncclCommDestroy(handle), "ncclCommDestroy")
