"""The thread an engine is built on, and then steps on.

On the CPU, an engine built on one thread and stepped on another decodes about 12 % slower than one
stepped where it was built (single stream, measured side by side on the 2-core dev box: stepped on
another thread 0.88x, built and stepped on the same non-main thread 1.01x; docs/benchmarks.md, "The
serving path"). The difference lies below Python, in per-thread state of the runtime (not pinned
down further; OpenMP thread teams and the BLAS buffers bound to them are the likely ones: OMP_WAIT_POLICY
and GOMP_SPINCOUNT did not change it), not in anything the engine does. So the server builds its engine on
the thread that will run the engine loop, and hands that thread the loop (server.engine.async_engine).
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

T = TypeVar("T")


class EngineThread:
    """A thread that runs the callables given to it, one at a time, in order."""

    def __init__(self, name: str = "engine"):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def call(self, fn: Callable[[], T]) -> T:
        """Run fn on the thread and wait for its result (its exception is raised here)."""
        return self.submit(fn).result()

    def submit(self, fn: Callable[[], T]) -> Future:
        """Run fn on the thread after what was submitted before it; the future settles when it returns."""
        future: Future = Future()
        self._jobs.put((fn, future))
        return future

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def _serve(self) -> None:
        while True:
            fn, future = self._jobs.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn()
            except BaseException as e:  # the caller's to handle, on its own thread
                future.set_exception(e)
            else:
                future.set_result(result)
