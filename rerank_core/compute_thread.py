"""One OS thread for all of an engine's torch work in a process that also runs other threads.

Why: torch's CPU kernels run in OpenMP parallel regions, and the OpenMP runtime (libgomp on Linux)
keeps a team of worker threads for each thread that starts such regions. Once a second thread has
run torch work (say the model loaded in one thread and scored in another, as with
``asyncio.to_thread`` or a framework's worker threads), the process holds more OpenMP threads than
cores, and short parallel regions wait for workers to wake. Measured on 2 cores in bf16: an
elementwise op 1.68 -> 2.77 ms (CPU use 200 % -> 145 %); the 0.6B engine at 0.84x the pairs/s of
loading and scoring on one thread (``bench/threads.py``; ``docs/benchmarks.md``, "One compute
thread"). Large matrix products barely change; the many small ops of a decoder layer do.

So a host that calls the engine from threads (the Serve replica, the Ray Data scoring actor) loads
the model and runs every forward pass through one :class:`ComputeThread`. The main thread of a
plain script needs none of this.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class ComputeThread:
    """Runs callables one at a time, in submission order, on one dedicated thread.

    ``call`` blocks the caller; ``run`` is its awaitable form (the event loop stays free while the
    work runs). An exception raised by the callable is raised to the caller.
    """

    def __init__(self, name: str = "rerank-compute"):
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self.ident: int = self._executor.submit(threading.get_ident).result()

    def call(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """``fn(*args, **kwargs)`` on the compute thread; waits for it."""
        if threading.get_ident() == self.ident:  # already there: queueing behind itself would deadlock
            return fn(*args, **kwargs)
        return self._executor.submit(fn, *args, **kwargs).result()

    async def run(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """``fn(*args, **kwargs)`` on the compute thread, awaited without blocking the event loop."""
        return await asyncio.wrap_future(self._executor.submit(fn, *args, **kwargs))

    def close(self) -> None:
        """Stop accepting work; what was submitted still runs."""
        self._executor.shutdown(wait=False)
