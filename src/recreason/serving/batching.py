"""Dynamic micro-batching: concurrent requests are queued and generated together."""

from __future__ import annotations

import itertools
import queue
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable, Hashable, Sequence


class Overloaded(RuntimeError):
    """More generations are waiting than ``max_queue``: the server answers 503 instead of queueing forever."""


class _Worker:
    """A queue of ``(key, payload, future)`` jobs and the thread that serves it (``_loop``, in subclasses).

    ``threads``: the torch threads the serving thread computes with (torch's thread count is set per thread; the
    service loads its model with one, so that only this thread keeps a pool of compute threads: see
    :class:`~recreason.serving.service.ExplanationService`)."""

    def __init__(self, max_queue: int, name: str, threads: int | None = None):
        self.max_queue = max_queue
        self.threads = threads
        self.busy_s = 0.0  # seconds spent generating (over wall time: how much of it the model was kept working)
        self._queue: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)
        self._loop()

    def _waiting(self) -> int:
        return self._queue.qsize()

    def submit(self, key: Hashable, payload: Any) -> Future:
        waiting = self._waiting()
        if waiting >= self.max_queue:
            raise Overloaded(f"{waiting} generations are already waiting; retry later")
        future: Future = Future()
        self._queue.put((key, payload, future))
        return future

    def close(self) -> None:
        self._stop.set()
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        raise NotImplementedError


class MicroBatcher(_Worker):
    """Collects submitted jobs for up to ``max_wait_s`` (or ``max_batch`` jobs) and runs them in one call.

    Jobs with different ``key`` (e.g. generation options) never share a batch. ``fn(key, payloads)``
    returns one result per payload.
    """

    def __init__(self, fn: Callable[[Hashable, Sequence[Any]], Sequence[Any]], max_batch: int = 16,
                 max_wait_s: float = 0.01, on_batch: Callable[[int], None] | None = None, max_queue: int = 1024,
                 threads: int | None = None):
        super().__init__(max_queue, "recreason-batcher", threads)
        self.fn = fn
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.on_batch = on_batch
        self._thread.start()

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
            start = time.perf_counter()
            try:
                results = self.fn(key, [j[1] for j in batch])
                for (_, _, future), result in zip(batch, results):
                    future.set_result(result)
            except Exception as exc:  # noqa: BLE001 - handed to every waiting caller
                for _, _, future in batch:
                    future.set_exception(exc)
            self.busy_s += time.perf_counter() - start


class ContinuousBatcher(_Worker):
    """Iteration-level batching: the jobs the decoder runs (``accepts(key)``: greedy reasons in a
    :class:`~recreason.generation.engine.ContinuousDecoder`, or candidates to choose among in a
    :class:`~recreason.generation.engine.CandidateDecoder`) decode one token for every running row per step, joining
    between steps and leaving as soon as they end; other jobs are batched whole by ``fn(key, payloads)`` as
    :class:`MicroBatcher` does, between two steps.

    ``start(key, payload)`` gives the arguments of the decoder's ``add`` before its callback (the prompt's token ids,
    its token limit, and for candidates the draws' seeds); ``finish(payload, *decoded)`` turns what the decoder calls
    back with into the job's result. The same ``submit``/``close`` as :class:`MicroBatcher`; ``on_batch`` sees the
    rows of each step."""

    def __init__(self, decoder, accepts: Callable[[Hashable], bool],
                 start: Callable[[Hashable, Any], tuple], finish: Callable[..., Any],
                 fn: Callable[[Hashable, Sequence[Any]], Sequence[Any]], max_batch: int = 16,
                 on_batch: Callable[[int], None] | None = None, max_queue: int = 1024, threads: int | None = None):
        super().__init__(max_queue, "recreason-decoder", threads)
        self.decoder, self.accepts, self.start, self.finish, self.fn = decoder, accepts, start, finish, fn
        self.max_batch, self.on_batch = max_batch, on_batch
        self._running: dict[int, Future] = {}  # decoder jobs not yet answered
        self._ids = itertools.count()
        self._thread.start()

    def _waiting(self) -> int:
        return self._queue.qsize() + len(self.decoder.waiting)

    def _answer(self, job: int, payload: Any, decoded: tuple) -> None:
        future = self._running.pop(job)
        try:
            future.set_result(self.finish(payload, *decoded))
        except Exception as exc:  # noqa: BLE001 - handed to the caller
            future.set_exception(exc)

    def _take(self, block: bool) -> list | None:
        """The queued jobs (waiting for the first when ``block``); None once closed."""
        jobs = []
        try:
            job = self._queue.get() if block else self._queue.get_nowait()
            while True:
                if job is None:
                    return None
                jobs.append(job)
                job = self._queue.get_nowait()
        except queue.Empty:
            return jobs

    def _loop(self) -> None:
        while not self._stop.is_set():
            jobs = self._take(block=not self.decoder.busy)
            if jobs is None:
                break
            whole: dict[Hashable, list] = {}
            for key, payload, future in jobs:
                if not self.accepts(key):
                    whole.setdefault(key, []).append((payload, future))
                    continue
                try:
                    spec = self.start(key, payload)
                    job = next(self._ids)
                    self._running[job] = future
                    self.decoder.add(*spec, lambda *decoded, job=job, payload=payload: self._answer(job, payload, decoded))
                except Exception as exc:  # noqa: BLE001 - handed to the caller
                    self._running = {k: f for k, f in self._running.items() if f is not future}
                    future.set_exception(exc)
            for key, group in whole.items():
                for at in range(0, len(group), self.max_batch):
                    chunk = group[at:at + self.max_batch]
                    start = time.perf_counter()
                    try:
                        for (_, future), result in zip(chunk, self.fn(key, [p for p, _ in chunk])):
                            future.set_result(result)
                    except Exception as exc:  # noqa: BLE001 - handed to every waiting caller
                        for _, future in chunk:
                            future.set_exception(exc)
                    self.busy_s += time.perf_counter() - start
            if self.decoder.busy:
                start = time.perf_counter()
                try:
                    rows = self.decoder.step()
                except Exception as exc:  # noqa: BLE001 - handed to every running caller
                    self.decoder.reset()
                    running, self._running = self._running, {}
                    for future in running.values():
                        future.set_exception(exc)
                    continue
                finally:
                    self.busy_s += time.perf_counter() - start
                if self.on_batch and rows:
                    self.on_batch(rows)
