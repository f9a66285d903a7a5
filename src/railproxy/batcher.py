"""Micro-batching: concurrent async checks share one model call.

One worker thread drains a queue. A request appends its item and awaits a
future on its own event loop; the worker takes whatever is queued (at most
`max_batch`), calls `process` once for all of it off every event loop, and
hands each result back with `call_soon_threadsafe`. An idle worker starts at
once, so a lone request waits for nothing; under load the requests that arrive
while one batch runs form the next, which is how throughput approaches the
model's batch throughput. `max_wait` (default 0) optionally holds a batch that
is not full for up to that many seconds.

Cancellation is per request: a request that times out or is cancelled stops
waiting; its item is skipped if its batch has not started, and its result is
dropped if it has. The batch and the other requests in it are unaffected.

The worker exits after `idle_exit` seconds without work and restarts on the
next request, so an unused batcher holds no thread. On an event loop other
than asyncio (trio) each request runs `process` alone in a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import anyio.to_thread

from railproxy.decide import Decision
from railproxy.errors import GuardUnavailable, InputError, RailproxyError

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

# process(items) -> one result or exception per item, in order
Process = Callable[[list[T]], Sequence[R | BaseException]]


@dataclass(eq=False, slots=True)
class _Job(Generic[T, R]):
    item: T
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[R]
    abandoned: bool = False


class MicroBatcher(Generic[T, R]):
    """Runs `process` on batches of concurrently submitted items, in one worker thread."""

    def __init__(
        self,
        process: Process[T, R],
        *,
        max_batch: int = 32,
        max_wait: float = 0.0,
        idle_exit: float = 10.0,
        name: str = "railproxy-batcher",
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.process = process
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.idle_exit = idle_exit
        self.name = name
        self.batches = 0  # batches run, and items in them: batch size = items / batches
        self.items = 0
        self._queue: deque[_Job[T, R]] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    async def submit(self, item: T) -> R:
        """The result for `item`, computed in a batch with whatever else is queued."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not asyncio: no shared worker, one call per request
            return await anyio.to_thread.run_sync(self._alone, item, abandon_on_cancel=True)
        job: _Job[T, R] = _Job(item, loop, loop.create_future())
        with self._cond:
            self._queue.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name=self.name, daemon=True)
                self._thread.start()
            self._cond.notify()
        try:
            return await job.future
        finally:
            job.abandoned = True  # read by the worker: skip the item if not yet started

    def _alone(self, item: T) -> R:
        result = self._run([item])[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def _run(self, items: list[T]) -> Sequence[R | BaseException]:
        try:
            results = self.process(items)
            if len(results) != len(items):
                raise RuntimeError(f"{len(results)} results for {len(items)} items")
        except Exception as exc:  # process promises one result per item; fail them all
            logger.exception("batch failed")
            return [exc] * len(items)
        return results

    def _next_batch(self) -> list[_Job[T, R]] | None:
        """Wait for work; None when idle for `idle_exit` seconds (the thread then ends)."""
        with self._cond:
            while not self._queue:
                if not self._cond.wait(self.idle_exit) and not self._queue:
                    self._thread = None
                    return None
            if self.max_wait > 0 and len(self._queue) < self.max_batch:
                deadline = time.monotonic() + self.max_wait
                while len(self._queue) < self.max_batch:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            batch: list[_Job[T, R]] = []
            while self._queue and len(batch) < self.max_batch:
                job = self._queue.popleft()
                if not job.abandoned:
                    batch.append(job)
            return batch

    def _work(self) -> None:
        try:
            while (batch := self._next_batch()) is not None:
                if not batch:
                    continue
                self.batches += 1
                self.items += len(batch)
                results = self._run([job.item for job in batch])
                for job, result in zip(batch, results, strict=True):
                    try:
                        job.loop.call_soon_threadsafe(_deliver, job.future, result)
                    except RuntimeError:  # that request's event loop has closed
                        pass
        finally:  # normally already None; after a BaseException, let the next submit restart
            with self._cond:
                if self._thread is threading.current_thread():
                    self._thread = None


def _deliver(future: asyncio.Future[R], result: R | BaseException) -> None:
    if future.done():  # cancelled: the request stopped waiting
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


class Checker(Protocol):
    """The part of Guard a batch needs."""

    def prepare(self, text: str) -> str: ...

    def check_many(self, texts: Sequence[str]) -> list[Decision]: ...


def check_batch(guard: Checker, texts: list[str]) -> list[Decision | RailproxyError]:
    """Decisions for `texts` in one `check_many` call; never raises.

    A text that is unusable (InputError: empty, too long) fails alone; any other
    failure (model, index, NaN) fails every text of the batch with
    GuardUnavailable, so each request fails closed.
    """
    try:
        return list(guard.check_many(texts))
    except InputError as exc:
        if len(texts) == 1:
            return [exc]
    except Exception as exc:
        return list(_unavailable(exc, len(texts)))
    # Some text is unusable: set those aside and check the rest together.
    outcomes: list[Decision | RailproxyError | None] = [None] * len(texts)
    good: list[int] = []
    for i, text in enumerate(texts):
        try:
            guard.prepare(text)
            good.append(i)
        except InputError as exc:
            outcomes[i] = exc
        except Exception as exc:
            outcomes[i] = _unavailable(exc, 1)[0]
    if good:
        try:
            decided: Sequence[Decision | RailproxyError] = guard.check_many(
                [texts[i] for i in good]
            )
        except Exception as exc:
            decided = _unavailable(exc, len(good))
        for i, outcome in zip(good, decided, strict=True):
            outcomes[i] = outcome
    return [o if o is not None else GuardUnavailable("the guard lost a result") for o in outcomes]


def _unavailable(exc: BaseException, count: int) -> list[RailproxyError]:
    """One GuardUnavailable per request (an exception object is raised by one task only)."""
    message = (
        str(exc) if isinstance(exc, RailproxyError) else f"the guard failed: {type(exc).__name__}"
    )
    if not isinstance(exc, RailproxyError):
        logger.error("guard failure in a batch of %d", count, exc_info=exc)
    errors: list[RailproxyError] = []
    for _ in range(count):
        error = GuardUnavailable(message)
        error.__cause__ = exc
        errors.append(error)
    return errors
