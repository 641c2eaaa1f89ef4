"""Pass inputs to the device in one transfer that does not stop the host.

A packed pass needs a handful of integer arrays on the device: token ids, position ids, the rows a
score reads and, on the varlen path, cumulative lengths and gather indices. Built one by one with
``torch.tensor(list, device=...)`` each is a pageable host-to-device copy, and torch waits for the
device after every such copy: the host cannot prepare the next pass while the GPU runs this one,
and the GPU idles while the host builds and launches the next.

:class:`Staging` writes a pass's arrays into one page-locked host buffer and copies it with
``non_blocking=True``: one transfer per pass, queued on the stream behind the work already there,
and the host goes on at once. A buffer must not be rewritten before its copy has run, so buffers
are used in a ring, each with an event recorded after its copy; taking a buffer waits for its
event (which, with a ring of a few, only waits when the host is that many passes ahead).

On a CPU device nothing is copied: the arrays become tensors as they are.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

# Buffers in the ring: how many passes the host may prepare ahead of the device.
DEFAULT_SLOTS = 4


class _Fence:
    """Marks the point of the stream where a buffer's copy was queued (no-op off CUDA)."""

    def __init__(self, device: torch.device):
        self._cuda = device.type == "cuda"
        self._event = None  # made at the first record: a scorer can be built before CUDA starts
        self.recorded = False

    def record(self) -> None:
        if self._cuda:
            if self._event is None:
                self._event = torch.cuda.Event()
            self._event.record()
        self.recorded = True

    def wait(self) -> None:
        if self._event is not None and self.recorded:
            self._event.synchronize()


class Staging:
    """Copies groups of int64 arrays to ``device`` through a ring of reused host buffers.

    Args:
        device: where the tensors go.
        slots: buffers in the ring (>= 1).
        pin: page-lock the host buffers (needed for a copy that does not block the host);
            ``None``: on CUDA only.
        copy: stage and copy even on a CPU device (tests of the buffer ring); ``None``: copy
            only when ``device`` is not the CPU.
    """

    def __init__(self, device: torch.device | str, slots: int = DEFAULT_SLOTS, pin: bool | None = None,
                 copy: bool | None = None):
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.device = torch.device(device)
        self.pin = self.device.type == "cuda" if pin is None else pin
        self.copy = self.device.type != "cpu" if copy is None else copy
        self._buffers: list[torch.Tensor | None] = [None] * slots
        self._fences = [_Fence(self.device) for _ in range(slots)]
        self._next = 0
        # How many times a buffer was (re)allocated: reuse shows as a count that stops growing.
        self.allocations = 0

    def to_device(self, arrays: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """``arrays`` (1-D, int64) as device tensors, in order: views of one copied buffer.

        The returned tensors never alias a host buffer that a later call rewrites.
        """
        arrays = [np.ascontiguousarray(a, dtype=np.int64).reshape(-1) for a in arrays]
        if not self.copy:
            return [torch.from_numpy(a) for a in arrays]
        total = sum(a.size for a in arrays)
        slot = self._next
        self._next = (slot + 1) % len(self._buffers)
        # This buffer's previous copy must have run before it is rewritten.
        self._fences[slot].wait()
        buffer = self._buffers[slot]
        if buffer is None or buffer.numel() < total:
            # Grown to a power of two: a few sizes cover every pass, so growth stops early.
            size = 1 << max(10, (total - 1).bit_length())
            buffer = torch.empty(size, dtype=torch.int64, pin_memory=self.pin)
            self._buffers[slot] = buffer
            self.allocations += 1
        host = buffer.numpy()
        start = 0
        for a in arrays:
            host[start : start + a.size] = a
            start += a.size
        # copy=True: a new tensor even where the device is the CPU, so nothing aliases the buffer.
        device = buffer[:total].to(self.device, non_blocking=self.pin, copy=True)
        self._fences[slot].record()
        out, start = [], 0
        for a in arrays:
            out.append(device[start : start + a.size])
            start += a.size
        return out
