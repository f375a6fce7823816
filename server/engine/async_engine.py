"""Runs the engine loop on its own thread so the asyncio event loop (HTTP) stays responsive.

Requests, aborts and "fail every request" (a shutdown) cross into the engine thread through a queue
and are applied between steps; each request's outputs come back through its own asyncio.Queue. An
engine built on an EngineThread (`LLMEngine.thread`, as `hotswap serve` builds it) runs its loop
there: where it was built.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from concurrent.futures import Future, wait
from dataclasses import dataclass

from server.engine.llm_engine import ENGINE_FAILED, LLMEngine
from server.engine.sequence import RequestFailed, Sequence, TokenLogprob

log = logging.getLogger(__name__)


@dataclass(slots=True)
class RequestOutput:
    text: str  # new text since the previous output
    token_ids: list[int]  # new tokens since the previous output
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    logprobs: list[TokenLogprob] | None = None  # one per new token, where the request asked (SamplingParams.logprobs)
    prompt_logprobs: list[TokenLogprob] | None = None  # prompt tokens 1.. in the first output (SamplingParams.prompt_logprobs)


class AsyncEngine:
    def __init__(self, engine: LLMEngine, on_step=None):
        self.engine = engine
        self.on_step = on_step  # callback(StepStats, engine) on the engine thread, for metrics
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._thread: threading.Thread | None = None
        self._loop_done: Future | None = None  # the loop's run on the engine's own EngineThread
        self._stopping = False
        self._refusal: RequestFailed | None = None  # fail_all(refuse_new=True): every later sequence fails with it
        self.error: BaseException | None = None

    def start(self) -> None:
        home = getattr(self.engine, "thread", None)
        if home is not None:
            self._loop_done = home.submit(self._loop)
            return
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._inbox.put(("wake", None))
        if self._thread:
            self._thread.join(timeout=10)
        if self._loop_done is not None:
            wait([self._loop_done], timeout=10)

    @property
    def healthy(self) -> bool:
        if self.error is not None:
            return False
        if self._loop_done is not None:
            return not self._loop_done.done() and self.engine.thread.is_alive()
        return self._thread is not None and self._thread.is_alive()

    @property
    def sequences_in_flight(self) -> int:
        """Sequences submitted whose outputs are still coming (one per choice of a request)."""
        return len(self._streams)

    def fail_all(self, error: RequestFailed, refuse_new: bool = False) -> None:
        """Fail every sequence in the engine, running or waiting, with `error` (each stream raises it),
        between steps on the engine thread. With refuse_new every sequence submitted later fails the same
        way at once: the server is shutting down. Only enqueues, so a signal handler may call it."""
        self._inbox.put(("fail_all", (error, refuse_new)))

    async def generate(self, seq: Sequence) -> AsyncIterator[RequestOutput]:
        """Yields outputs until the sequence finishes; RequestFailed if it failed. Leaving early (client gone) aborts it."""
        loop = asyncio.get_running_loop()
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[seq.seq_id] = (loop, stream)
        self._inbox.put(("add", seq))
        finished = False
        try:
            while not finished:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            self._streams.pop(seq.seq_id, None)
            if not finished:
                self._inbox.put(("abort", seq))

    async def call(self, fn):
        """Run fn(engine) on the engine thread between steps (adapter pools are only touched there)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._inbox.put(("call", (fn, loop, future)))
        return await future

    def _loop(self) -> None:
        engine = self.engine
        while not self._stopping:
            try:
                block = not engine.has_work()
                while True:
                    try:
                        kind, seq = self._inbox.get(block=block, timeout=0.5 if block else None)
                    except queue.Empty:
                        break
                    block = False
                    if kind == "add":
                        if self._refusal is None:
                            engine.add(seq)
                        else:
                            self._emit(seq.seq_id, _copy(self._refusal))
                    elif kind == "abort":
                        engine.abort(seq)
                    elif kind == "call":
                        self._run_call(*seq)
                    elif kind == "fail_all":
                        error, refuse_new = seq
                        if refuse_new:
                            self._refusal = error
                        self._fail_all(error)
                if not engine.has_work():
                    continue
                updates = engine.step()
                for u in updates:
                    if u.seq.finish_reason == "error":  # this request alone failed
                        self._emit(u.seq.seq_id, u.seq.error or RequestFailed(ENGINE_FAILED))
                        continue
                    self._emit(
                        u.seq.seq_id,
                        RequestOutput(u.text, u.new_token_ids, u.finished, u.seq.finish_reason, len(u.seq.prompt_token_ids), len(u.seq.output_token_ids),
                                      u.logprobs, u.prompt_logprobs),
                    )
                if self.on_step is not None and engine.last_step is not None:
                    self.on_step(engine.last_step, engine)
            except Exception:  # a bug outside any one request must not hang every client: fail them, keep serving
                log.exception("engine step failed")
                self._fail_all()

    def _run_call(self, fn, loop: asyncio.AbstractEventLoop, future: asyncio.Future) -> None:
        try:
            result = fn(self.engine)
        except Exception as e:
            loop.call_soon_threadsafe(_settle, future, None, e)
        else:
            loop.call_soon_threadsafe(_settle, future, result, None)

    def _emit(self, seq_id: int, item) -> None:
        target = self._streams.get(seq_id)
        if target is not None:
            loop, stream = target
            loop.call_soon_threadsafe(stream.put_nowait, item)

    def _fail_all(self, error: RequestFailed | None = None) -> None:
        sched = self.engine.scheduler
        for seq in list(sched.running) + list(sched.waiting) + sched.take_failed():
            self.engine.abort(seq)
            self._emit(seq.seq_id, _copy(error) if error is not None else RequestFailed(ENGINE_FAILED))


def _copy(error: RequestFailed) -> RequestFailed:
    """One exception object per stream: each is raised, and gains a traceback, in its own task."""
    return RequestFailed(str(error), error.status, error.code)


def _settle(future: asyncio.Future, result, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
