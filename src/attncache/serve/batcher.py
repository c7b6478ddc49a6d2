"""Dynamic batching: a bounded queue and one worker thread that runs the model.

The first request in the queue opens a batch, which closes when it holds ``max_batch`` requests or
``max_wait_ms`` has passed; requests of one kind run together. A full queue answers 503 at once
(backpressure); a request waiting longer than ``timeout_s`` gets 504.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from .config import ServeConfig
from .engine import Engine
from .metrics import Metrics

KINDS = ("score", "embed", "rerank", "classify")


class Batcher:
    def __init__(self, engine: Engine, cfg: ServeConfig, metrics: Metrics):
        self.engine, self.cfg, self.metrics = engine, cfg, metrics
        self.queue: asyncio.Queue | None = None
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="attncache-model")
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.queue = asyncio.Queue(maxsize=self.cfg.max_queue)
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.pool.shutdown(wait=True)

    async def submit(self, kind: str, payload) -> dict:
        fut = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait((kind, payload, fut))
        except asyncio.QueueFull:
            raise OverflowError("the request queue is full") from None
        self.engine.queue_depth = self.queue.qsize()
        return await asyncio.wait_for(fut, self.cfg.timeout_s)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.cfg.max_wait_ms / 1000
            while len(batch) < self.cfg.max_batch:
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), left))
                except TimeoutError:
                    break
            self.engine.queue_depth = self.queue.qsize()
            batch = [b for b in batch if not b[2].done()]  # timed out while queued
            for kind in KINDS:
                part = [b for b in batch if b[0] == kind]
                if part:
                    await self._run(loop, kind, part)

    async def _run(self, loop, kind: str, part: list) -> None:
        fn = getattr(self.engine, kind)
        self.metrics.batch_size(len(part))
        try:
            results = await loop.run_in_executor(self.pool, fn, [b[1] for b in part])
        except Exception as e:  # noqa: BLE001 - reported to each waiting request; the server goes on
            for b in part:
                if not b[2].done():
                    b[2].set_exception(e)
            return
        for b, r in zip(part, results, strict=True):
            if b[2].done():
                continue
            if isinstance(r, Exception):  # that request's own error (an input it cannot run)
                b[2].set_exception(r)
            else:
                b[2].set_result(r)
