"""Dynamic micro-batching: concurrent requests are queued and generated together."""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable, Hashable, Sequence


class Overloaded(RuntimeError):
    """More generations are waiting than ``max_queue``: the server answers 503 instead of queueing forever."""


class MicroBatcher:
    """Collects submitted jobs for up to ``max_wait_s`` (or ``max_batch`` jobs) and runs them in one call.

    Jobs with different ``key`` (e.g. generation options) never share a batch. ``fn(key, payloads)``
    returns one result per payload.
    """

    def __init__(self, fn: Callable[[Hashable, Sequence[Any]], Sequence[Any]], max_batch: int = 16,
                 max_wait_s: float = 0.01, on_batch: Callable[[int], None] | None = None, max_queue: int = 1024):
        self.fn = fn
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.on_batch = on_batch
        self._queue: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="recreason-batcher", daemon=True)
        self._thread.start()

    def submit(self, key: Hashable, payload: Any) -> Future:
        if self._queue.qsize() >= self.max_queue:
            raise Overloaded(f"{self._queue.qsize()} generations are already waiting; retry later")
        future: Future = Future()
        self._queue.put((key, payload, future))
        return future

    def close(self) -> None:
        self._stop.set()
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        pending: list = []
        while not self._stop.is_set():
            if not pending:
                job = self._queue.get()
                if job is None:
                    break
                pending.append(job)
            deadline = time.monotonic() + self.max_wait_s
            while len(pending) < self.max_batch:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    job = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
                if job is None:
                    self._stop.set()
                    break
                pending.append(job)
            key = pending[0][0]
            batch = [j for j in pending if j[0] == key][: self.max_batch]
            pending = [j for j in pending if j not in batch]
            if self.on_batch:
                self.on_batch(len(batch))
            try:
                results = self.fn(key, [j[1] for j in batch])
                for (_, _, future), result in zip(batch, results):
                    future.set_result(result)
            except Exception as exc:  # noqa: BLE001 - handed to every waiting caller
                for _, _, future in batch:
                    future.set_exception(exc)
