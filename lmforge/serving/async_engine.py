"""Drive the synchronous Engine from one background thread for asyncio callers (the server).

Engine methods run only under one lock; results travel to each request's asyncio queue
with `call_soon_threadsafe`. Python's locks are not fair: a stepping loop that releases and
re-takes the lock at once would keep the server's `open`/`close` (on the event loop) waiting
until every running request finished, and their streams would arrive in one burst at the end;
so the loop lets waiting callers in between steps. A request whose consumer stops (client disconnect) is aborted
and its blocks freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from typing import AsyncIterator

from lmforge.generation.sampling import SamplingParams
from lmforge.serving.engine import Engine, StepOutput
from lmforge.serving.metrics import Metrics


class AsyncEngine:
    """A background stepping loop plus `stream()` for coroutines."""

    def __init__(self, engine: Engine, metrics: Metrics | None = None) -> None:
        self.engine, self.metrics = engine, metrics
        self._lock = threading.Lock()
        self._callers = 0  # server calls waiting for or holding the lock; the loop lets them in first
        self._callers_lock = threading.Lock()
        self._wake = threading.Event()
        self._queues: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="lmforge-engine", daemon=True)
        self._thread.start()

    def open(self, prompt_ids: list[int], params: SamplingParams, logprobs: int = 0) -> "RequestStream":
        """Queue a request now (ValueError if refused); iterate the result for its outputs."""
        return self.open_parallel(prompt_ids, [params], logprobs)[0]

    def open_parallel(self, prompt_ids: list[int], params: list[SamplingParams], logprobs: int = 0,
                      adapter: str | None = None) -> list["RequestStream"]:
        """Queue one prompt sampled len(params) ways (one prefill, forked); one stream per sample."""
        loop = asyncio.get_running_loop()
        with self._turn():
            seqs = self.engine.add_parallel(prompt_ids, params, logprobs=logprobs, adapter=adapter)
            streams = []
            for seq in seqs:
                queue: asyncio.Queue = asyncio.Queue()
                self._queues[seq.seq_id] = (loop, queue)
                streams.append(RequestStream(self, seq, queue))
        self._wake.set()
        return streams

    def locked(self, fn, *args):
        """Run fn(*args) under the engine lock, between steps (loading or unloading an adapter)."""
        with self._turn():
            return fn(*args)

    def close(self, seq) -> None:
        """Forget a request; abort it if it is still running (its client went away)."""
        with self._turn():
            self._queues.pop(seq.seq_id, None)
            if not seq.is_finished:
                self.engine.abort(seq)
                if self.metrics:
                    self.metrics.finished(seq, "abort")

    @contextlib.contextmanager
    def _turn(self):
        """The engine lock for a caller on the event loop, taken before the loop's next step."""
        with self._callers_lock:
            self._callers += 1
        try:
            with self._lock:
                yield
        finally:
            with self._callers_lock:
                self._callers -= 1

    def _run(self) -> None:
        while not self._stop:
            if not self.engine.has_unfinished():
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            while self._callers:  # let waiting open/close calls in (each holds the lock for microseconds)
                time.sleep(0.0002)
            with self._lock:
                outputs = self.engine.step()
                targets = [(out, self._queues.get(out.seq.seq_id)) for out in outputs]
                if self.metrics:
                    self.metrics.observe_step(self.engine, outputs)
            for out, target in targets:
                if target is not None:
                    loop, queue = target
                    loop.call_soon_threadsafe(queue.put_nowait, out)

    def busy(self) -> bool:
        return self.engine.has_unfinished()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Let running requests finish (bounded by `timeout`), then stop the thread."""
        deadline = time.monotonic() + timeout
        while self.engine.has_unfinished() and time.monotonic() < deadline:
            time.sleep(0.05)
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=5)


class RequestStream:
    """The outputs of one request, as an async iterator; closing it early aborts the request."""

    def __init__(self, owner: AsyncEngine, seq, queue: asyncio.Queue) -> None:
        self.owner, self.seq, self.queue = owner, seq, queue

    async def __aiter__(self) -> AsyncIterator[StepOutput]:
        try:
            while True:
                out: StepOutput = await self.queue.get()
                yield out
                if out.finished:
                    return
        finally:
            self.owner.close(self.seq)
