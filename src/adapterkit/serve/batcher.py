"""Dynamic batching: requests that arrive within a short window run as one batch.

A ``Job`` carries a batch key (jobs batch only with jobs of an equal key: all classify requests
share one, generate requests share one per ``max_new_tokens`` and ``temperature``), its number of
examples and its longest example in tokens. The loop takes the oldest job, waits up to the window
for company, then takes the waiting jobs of the same key, oldest first, while the batch stays
within ``max_batch`` examples and ``max_batch_tokens`` (examples x longest); a job larger than
either runs alone. Batches run one at a time on the single worker thread. A job whose request
has gone (timeout, client disconnected) before its batch starts is dropped: it costs no work.
A batch that fails runs again one job at a time, so that one request's failure (its exception)
reaches that request only: the others get the answers they would have got alone.
The queue holds ``queue_size`` jobs; ``submit`` refuses one more (``QueueFull``).
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Optional

from .metrics import Metrics


class QueueFull(Exception):
    """The batcher's queue is full; the request should be retried later (429)."""


@dataclass
class Job:
    key: Hashable
    size: int  # examples
    tokens: int  # the longest example, in tokens
    payload: Any
    future: "asyncio.Future[Any]" = field(default=None)  # type: ignore[assignment]
    arrived: float = field(default_factory=time.monotonic)


class Batcher:
    """Collects jobs and runs them in batches with ``run(key, payloads) -> results`` (one result
    per payload) on ``executor``."""

    def __init__(self, run: Callable[[Hashable, list[Any]], list[Any]], executor: Executor, *, window: float,
                 max_batch: int, max_batch_tokens: int, queue_size: int, metrics: Optional[Metrics] = None):
        self._run, self._executor = run, executor
        self.window, self.max_batch, self.max_batch_tokens = window, max_batch, max_batch_tokens
        self.queue_size, self.metrics = queue_size, metrics
        self._pending: list[Job] = []
        self._arrival = asyncio.Event()
        self._task: Optional[asyncio.Task] = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for job in self._pending:
            job.future.cancel()
        self._pending.clear()

    @property
    def depth(self) -> int:
        """Jobs waiting for a batch."""
        self.prune()
        return len(self._pending)

    def prune(self) -> None:
        """Drop the jobs whose request has gone (their futures are done), and say so in the gauge."""
        self._pending = [j for j in self._pending if not j.future.done()]
        self._gauge()

    def submit(self, job: Job) -> "asyncio.Future[Any]":
        """Queue ``job``; its future gets the result. Raises ``QueueFull``."""
        self._pending = [j for j in self._pending if not j.future.done()]  # gone requests free their place
        if len(self._pending) >= self.queue_size:
            raise QueueFull()
        job.future = asyncio.get_running_loop().create_future()
        self._pending.append(job)
        self._gauge()
        self._arrival.set()
        return job.future

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self._pending))

    def _take(self) -> list[Job]:
        """The next batch: the oldest live job and the live jobs of its key that fit with it."""
        self.prune()
        if not self._pending:
            return []
        first = self._pending[0]
        batch, size, longest = [first], first.size, first.tokens
        for job in self._pending[1:]:
            if job.key != first.key:
                continue
            grown, long_ = size + job.size, max(longest, job.tokens)
            if grown > self.max_batch or grown * long_ > self.max_batch_tokens:
                continue
            batch.append(job)
            size, longest = grown, long_
        taken = {id(j) for j in batch}
        self._pending = [j for j in self._pending if id(j) not in taken]
        self._gauge()
        return batch

    def _full(self) -> bool:
        first = self._pending[0]
        return sum(j.size for j in self._pending if j.key == first.key) >= self.max_batch

    async def _loop(self) -> None:
        while True:
            if not self._pending:
                self._arrival.clear()
                await self._arrival.wait()
                continue
            wait = self._pending[0].arrived + self.window - time.monotonic()
            if wait > 0 and not self._full():
                await asyncio.sleep(min(wait, self.window))
            batch = self._take()
            if not batch:
                continue
            kind = getattr(batch[0].key, "kind", "batch")
            if self.metrics is not None:
                self.metrics.batch_size.labels(kind).observe(sum(j.size for j in batch))
            start = time.perf_counter()
            try:
                await self._answer(batch)
            finally:
                if self.metrics is not None:
                    self.metrics.batch_seconds.labels(kind).observe(time.perf_counter() - start)

    async def _answer(self, batch: list[Job]) -> None:
        """Run ``batch`` and settle its futures; when it fails, run each live job alone (each
        request then gets its own answer or its own exception)."""
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(self._executor, self._run, batch[0].key, [j.payload for j in batch])
        except Exception as err:
            live = [j for j in batch if not j.future.done()]
            if len(batch) == 1 or not live:
                for job in live:  # handed to the request, which answers it
                    job.future.set_exception(err)
                return
            for job in live:
                await self._answer([job])
            return
        for job, result in zip(batch, results):
            if not job.future.done():
                job.future.set_result(result)
