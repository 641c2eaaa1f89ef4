"""Pass inputs staged through a ring of reused host buffers (rerank_core.staging).

Pinned memory and non-blocking copies exist on CUDA only; here the ring runs with ``copy=True``
on CPU, which exercises the same buffer reuse, growth and slicing.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rerank_core.staging import Staging


def test_arrays_arrive_in_order_as_one_buffer():
    staging = Staging("cpu", slots=2, copy=True)
    a, b, c = np.arange(5), np.array([7, 8]), np.array([], dtype=np.int64)
    out = staging.to_device([a, b, c])
    assert [t.tolist() for t in out] == [[0, 1, 2, 3, 4], [7, 8], []]
    assert all(t.dtype == torch.int64 for t in out)
    # Views of one device tensor: one transfer per call.
    assert out[0].untyped_storage().data_ptr() == out[1].untyped_storage().data_ptr()


def test_buffers_are_reused_around_the_ring_and_results_never_alias_them():
    staging = Staging("cpu", slots=2, copy=True)
    first = staging.to_device([np.full(100, 1)])[0]
    second = staging.to_device([np.full(100, 2)])[0]
    third = staging.to_device([np.full(100, 3)])[0]  # rewrites the first slot's buffer
    assert staging.allocations == 2  # two slots, each allocated once
    # A later call rewriting a buffer leaves earlier results as they were.
    assert first.tolist() == [1] * 100 and second.tolist() == [2] * 100 and third.tolist() == [3] * 100
    for _ in range(10):
        staging.to_device([np.arange(500)])
    assert staging.allocations == 2  # 500 fits the first sizes (powers of two from 1024)


def test_a_buffer_grows_when_a_pass_needs_more():
    staging = Staging("cpu", slots=1, copy=True)
    staging.to_device([np.arange(10)])
    big = staging.to_device([np.arange(3000), np.arange(2000)])
    assert staging.allocations == 2
    assert big[0].tolist() == list(range(3000)) and big[1].tolist() == list(range(2000))
    staging.to_device([np.arange(4000)])
    assert staging.allocations == 2  # grown to 8192, which still fits


def test_cpu_devices_take_the_arrays_without_a_copy():
    staging = Staging("cpu")
    assert not staging.copy and not staging.pin
    array = np.arange(4)
    (tensor,) = staging.to_device([array])
    assert tensor.tolist() == [0, 1, 2, 3] and staging.allocations == 0


def test_pinned_and_copied_on_cuda_only():
    assert Staging("cuda").pin and Staging("cuda").copy
    with pytest.raises(ValueError, match="slots"):
        Staging("cpu", slots=0)
