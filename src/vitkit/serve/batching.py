"""Micro-batching: inputs of concurrent requests are stacked into one model call.

A request puts its input on a bounded queue and awaits its own result. One task takes the first input waiting,
then whatever else arrives within `max_wait` seconds, up to `max_batch`, and runs the batch on the model thread.
Every model call (batches, and any other work given to `call`) runs on that one thread, one at a time: the
model's own threads use the cores, and two calls side by side would only contend for them.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

In = TypeVar("In")
Out = TypeVar("Out")


class QueueFullError(RuntimeError):
    """The queue holds `capacity` inputs already: the caller should answer "busy" and let the client retry."""


class BatchQueue(Generic[In, Out]):
    """`await queue.submit(x)` -> `run([x, ...])`'s entry for x, with the inputs of concurrent callers batched."""

    def __init__(self, run: Callable[[Sequence[In]], Sequence[Out]], max_batch: int = 16, max_wait: float = 0.005,
                 capacity: int = 256):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if max_wait < 0:
            raise ValueError(f"max_wait must be at least 0 seconds, got {max_wait}")
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.run, self.max_batch, self.max_wait, self.capacity = run, max_batch, max_wait, capacity
        self.batch_sizes: Counter[int] = Counter()
        """How many batches of each size were run."""
        self.rejected = 0
        """Inputs refused because the queue was full."""
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vitkit-model")

    async def start(self) -> None:
        """Start taking inputs (in the event loop that will submit them)."""
        self._queue = asyncio.Queue(self.capacity)
        self._task = asyncio.create_task(self._batches())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._model_thread.shutdown(wait=True)

    @property
    def waiting(self) -> int:
        """Inputs in the queue now."""
        return self._queue.qsize() if self._queue is not None else 0

    async def submit(self, item: In) -> Out:
        """`item`'s result; QueueFullError at once if `capacity` inputs are waiting already."""
        if self._queue is None:
            raise RuntimeError("the batch queue is not started: await start() first")
        future = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait((item, future))
        except asyncio.QueueFull:
            self.rejected += 1
            raise QueueFullError(f"{self.capacity} requests are waiting already") from None
        return await future  # a cancelled caller (a timeout) cancels the future: the batch then leaves it out

    async def call(self, function: Callable[..., Out], *args) -> Out:
        """`function(*args)` on the model thread, between batches."""
        return await asyncio.get_running_loop().run_in_executor(self._model_thread, function, *args)

    async def _batches(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.max_wait
            while len(batch) < self.max_batch:
                if not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except TimeoutError:
                    break
            live = [(item, future) for item, future in batch if not future.done()]
            if live:
                await self._run(live)

    async def _run(self, live: list[tuple[In, asyncio.Future]]) -> None:
        self.batch_sizes[len(live)] += 1
        try:
            results = await self.call(self.run, [item for item, _ in live])
            if len(results) != len(live):
                raise RuntimeError(f"the batch function returned {len(results)} results for {len(live)} inputs")
        except Exception as error:  # one failed batch fails its requests, not the queue
            for _, future in live:
                if not future.done():
                    future.set_exception(error)
            return
        for (_, future), result in zip(live, results):
            if not future.done():
                future.set_result(result)
