"""Per-model execution: a bounded queue in front of a thread pool, each thread with its own OpenVINO request.

Each model version gets as many threads as its compiled model's optimal number of infer requests, and one
InferRequest per thread: OpenVINO releases the GIL while it infers (and OpenCV while it decodes, resizes and
blurs), so requests to one model overlap up to that count and requests to different models run at once, on
pools of their own. Admission is counted per model: running + waiting at most threads + queue_size; one more
is refused at once (Overloaded -> 503), not queued without bound. A request that waits longer than its timeout
is answered (TimedOut -> 504); if it has not started it is dropped, if it has it finishes and frees its slot.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

import openvino as ov

from ssn_edge.runtime.engine import Engine


class Overloaded(Exception):
    pass


class TimedOut(Exception):
    pass


class ModelWorker:
    def __init__(self, engine: Engine, queue_size: int, label: str, threads: int | None = None):
        if queue_size < 0:
            raise ValueError(f"queue size must be >= 0, got {queue_size}")
        # a tiled bundle's runner holds its own requests and is one per engine: one image at a time
        self.threads = 1 if engine.tiling is not None else max(1, threads or engine.optimal_requests)
        self.engine = engine
        self.capacity = self.threads + queue_size
        self._requests: queue.SimpleQueue[ov.InferRequest | None] = queue.SimpleQueue()
        for _ in range(self.threads):
            self._requests.put(engine.compiled.create_infer_request() if engine.tiling is None else None)
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix=f"ssn-serve-{label}")
        self._lock = threading.Lock()
        self.pending = 0

    def _release(self, _future: Future) -> None:
        with self._lock:
            self.pending -= 1

    def _call(self, fn: Callable[[ov.InferRequest | None], Any]) -> Any:
        request = self._requests.get()
        try:
            return fn(request)
        finally:
            self._requests.put(request)

    async def run(self, fn: Callable[[ov.InferRequest | None], Any], timeout_s: float) -> Any:
        """fn(infer_request) in this model's pool; Overloaded when the queue is full, TimedOut after timeout_s."""
        with self._lock:
            if self.pending >= self.capacity:
                raise Overloaded(f"{self.pending} requests in flight, queue full ({self.threads} running + "
                                 f"{self.capacity - self.threads} waiting); retry later")
            self.pending += 1
        future = self._pool.submit(self._call, fn)
        future.add_done_callback(self._release)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout_s)
        except asyncio.TimeoutError:
            raise TimedOut(f"no result within the {timeout_s:g} s request timeout") from None

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
