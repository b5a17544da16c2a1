"""trainer.probes.libnccl against a stand-in library built from tests/unit/fixtures/fake_nccl.c
(NCCL's C signatures, one rank on host memory): the ctypes declarations pass every argument
where NCCL expects it, the unique id travels whole, and NCCL's errors come back named."""

from __future__ import annotations

import ctypes
import ctypes.util

import pytest
import torch
from helpers import fake_nccl_last as last_call

from trainer.probes import libnccl


@pytest.fixture(scope="module")
def fake(fake_nccl):
    return libnccl.Library(fake_nccl)


def test_version_codes():
    assert libnccl.decode_version(22809) == "2.28.9"
    assert libnccl.decode_version(21805) == "2.18.5"
    assert libnccl.decode_version(2708) == "2.7.8"  # the code before 2.9


def test_library_version_and_id(fake):
    assert fake.version == "2.28.9"
    uid = fake.unique_id()
    assert len(uid) == libnccl.UNIQUE_ID_BYTES
    assert uid[3] == 0 and uid[4] == 196  # the zero did not end it


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
def test_all_reduce_out_of_place_and_in_place(fake, dtype):
    comm = fake.communicator(1, fake.unique_id(), 0)
    try:
        send = torch.arange(1000).to(dtype)
        recv = torch.zeros(1000, dtype=dtype)
        before = last_call(fake)[0][7]
        comm.all_reduce_call(send, recv, stream=1234)()
        args, live = last_call(fake)
        assert args == [send.data_ptr(), recv.data_ptr(), 1000, libnccl.DATATYPES[dtype],
                        libnccl.SUM, 1234, 0x6e63636c, before + 1]
        assert live >= 1
        assert torch.equal(recv, send)
        comm.all_reduce_call(recv, recv, stream=0)()
        args, _ = last_call(fake)
        assert args[0] == args[1] == recv.data_ptr() and args[5] == 0
    finally:
        comm.close()


def test_a_wrong_id_and_a_bad_rank_are_named(fake):
    uid = bytearray(fake.unique_id())
    uid[100] ^= 1
    with pytest.raises(libnccl.NcclError, match=r"ncclCommInitRank failed: invalid usage"):
        fake.communicator(1, bytes(uid), 0)
    with pytest.raises(libnccl.NcclError, match=r"invalid argument \(ncclResult_t 4\)"):
        fake.communicator(2, fake.unique_id(), 0)
    with pytest.raises(ValueError, match="128 bytes"):
        fake.communicator(1, b"short", 0)


def test_buffers_are_checked_before_nccl_sees_them(fake):
    comm = fake.communicator(1, fake.unique_id(), 0)
    calls = last_call(fake)[0][7]
    try:
        with pytest.raises(ValueError, match="differ"):
            comm.all_reduce_call(torch.zeros(4), torch.zeros(5), 0)
        with pytest.raises(ValueError, match="contiguous"):
            comm.all_reduce_call(torch.zeros(4, 2).t(), torch.zeros(2, 4).t(), 0)
        with pytest.raises(ValueError, match="no data type"):
            comm.all_reduce_call(torch.zeros(4, dtype=torch.bool),
                                 torch.zeros(4, dtype=torch.bool), 0)
    finally:
        comm.close()
    assert last_call(fake)[0][7] == calls
    with pytest.raises(ValueError, match="closed"):
        comm.all_reduce_call(torch.zeros(4), torch.zeros(4), 0)
    comm.close()  # a second close does nothing


def test_close_destroys_the_communicator(fake):
    _, live = last_call(fake)
    comm = fake.communicator(1, fake.unique_id(), 0)
    assert last_call(fake)[1] == live + 1
    comm.close()
    assert last_call(fake)[1] == live


def test_no_library_is_a_clear_error(tmp_path):
    with pytest.raises(libnccl.NcclUnavailable, match=r"no NCCL library could be loaded"):
        libnccl.Library(str(tmp_path / "libnccl.so.2"))


def test_a_library_without_nccl_is_refused(tmp_path):
    with pytest.raises(libnccl.NcclUnavailable, match=r"has no ncclGetVersion"):
        libnccl.Library(ctypes.util.find_library("m") or "libm.so.6")


def test_candidates_start_with_the_soname_then_nvidia_wheels(tmp_path, monkeypatch):
    lib = tmp_path / "nvidia" / "nccl" / "lib"
    lib.mkdir(parents=True)
    (lib / libnccl.SONAME).write_bytes(b"")
    monkeypatch.setattr("sys.path", [str(tmp_path / "elsewhere"), str(tmp_path)])
    assert libnccl.candidates() == [libnccl.SONAME, str(lib / libnccl.SONAME)]
