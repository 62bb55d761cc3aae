"""layers.workspace: scratch buffers shared per role within a model's forward, per thread, freed at exit."""
import threading

import pytest
import torch

from vrwkv.layers.workspace import _local, inference_workspace, room, scratch


def test_outside_a_workspace_every_call_is_a_new_tensor():
    like = torch.empty(0, dtype=torch.float64)
    a, b = scratch("role", (3, 4), like), scratch("role", (3, 4), like)
    assert a.shape == (3, 4) and a.dtype == torch.float64 and a.is_contiguous()
    assert a.data_ptr() != b.data_ptr()


def test_inside_one_buffer_per_role_and_dtype_grown_to_the_largest_and_freed_at_exit():
    like32, like64 = torch.empty(0), torch.empty(0, dtype=torch.float64)
    with inference_workspace():
        a = scratch("a", (4, 5), like32)
        assert scratch("a", (2, 10), like32).data_ptr() == a.data_ptr()  # the same role: the same memory
        assert scratch("a", (3,), like32).data_ptr() == a.data_ptr()  # smaller: a view of it
        other = scratch("b", (4, 5), like32)
        assert other.data_ptr() != a.data_ptr()  # another role
        assert scratch("a", (4, 5), like64).data_ptr() != a.data_ptr()  # another dtype
        big = scratch("a", (8, 5), like32)  # larger: grown
        assert big.shape == (8, 5) and big.numel() == 40
        assert scratch("a", (4, 5), like32).data_ptr() == big.data_ptr()
        with inference_workspace():  # nested: the outer buffers
            assert scratch("a", (4, 5), like32).data_ptr() == big.data_ptr()
        assert scratch("a", (4, 5), like32).data_ptr() == big.data_ptr()  # the inner exit freed nothing
    assert _local.buffers is None and _local.depth == 0
    assert scratch("a", (4, 5), like32).data_ptr() != big.data_ptr()


def test_freed_when_the_work_raises():
    with pytest.raises(RuntimeError):
        with inference_workspace():
            scratch("a", (4,), torch.empty(0))
            raise RuntimeError("boom")
    assert _local.buffers is None and _local.depth == 0


def test_each_thread_has_its_own_buffers():
    pointers = {}
    barrier = threading.Barrier(2)

    def work(name):
        with inference_workspace():
            pointers[name] = scratch("a", (1000,), torch.empty(0)).data_ptr()
            barrier.wait()  # both inside their workspace at once

    threads = [threading.Thread(target=work, args=(n,)) for n in ("t1", "t2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert pointers["t1"] != pointers["t2"]


def test_room_is_the_current_size_of_a_roles_buffer():
    like = torch.empty(0)
    assert room("a", like) == 0  # outside a workspace
    with inference_workspace():
        assert room("a", like) == 0  # not used yet
        scratch("a", (6, 5), like)
        assert room("a", like) == 30 and room("a", like.double()) == 0 and room("b", like) == 0
        scratch("a", (2,), like)
        assert room("a", like) == 30  # a smaller request does not shrink it
