"""Step-level batching: one thread owns the model and a `DecodeBatch`; sequences join and leave between steps.

Every step admits waiting sequences (up to `max_batch` rows and `max_prefill_tokens` prompt tokens), samples
one token per row with that row's own settings and seed, hands each row's new text to its request, and
drops finished or cancelled rows before the next forward pass, so their cache slots are free at once. The
waiting queue is bounded: `submit` raises `QueueFull` instead of letting latency grow without limit.
"""
from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from qforge.engine.serve.chat import ChatModel, TextStream
from qforge.engine.generate import DecodeBatch, Pick, Row, SamplingParams

log = logging.getLogger("qforge.serve")


class QueueFull(RuntimeError):
    """More sequences are waiting than the scheduler accepts."""


@dataclass
class Event:
    """What a sequence produced in one step (or its end)."""

    text: str = ""
    picks: list[Pick] = field(default_factory=list)  # only when the sequence asked for logprobs
    finish_reason: str | None = None
    completion_tokens: int = 0
    prompt_logprobs: list[Pick | None] | None = None  # sent once, with the first event
    error: str | None = None


@dataclass(eq=False)
class Job:
    """One sequence to decode; `emit` must be thread-safe (the scheduler thread calls it)."""

    prompt: list[int]
    params: SamplingParams
    stream: TextStream
    emit: Callable[[Event], None]
    prompt_logprobs: int | None = None
    cancelled: bool = False


class Scheduler:
    def __init__(self, chat_model: ChatModel, *, max_batch: int = 16, max_waiting: int = 256,
                 max_prefill_tokens: int = 8192):
        self.chat_model = chat_model
        self.max_batch = max_batch
        self.max_waiting = max_waiting
        self.max_prefill_tokens = max_prefill_tokens
        self.batch = DecodeBatch(chat_model.model, chat_model.suppress_ids)
        self._jobs: dict[Row, Job] = {}
        self._waiting: deque[Job] = deque()
        self._joining: list[Job] = []  # taken from the queue, being prefilled
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="qforge-scheduler", daemon=True)
        self._thread.start()

    @property
    def load(self) -> dict:
        return {"running": len(self._jobs) + len(self._joining), "waiting": len(self._waiting)}

    def submit(self, jobs: list[Job]) -> None:
        """Queues all of `jobs` (the n choices of one request) or none of them."""
        with self._wake:
            if self._closed:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) + len(jobs) > self.max_waiting:
                raise QueueFull(f"{len(self._waiting)} sequences are already waiting (limit {self.max_waiting})")
            self._waiting.extend(jobs)
            self._wake.notify()

    def cancel(self, jobs: list[Job]) -> None:
        """Marks jobs cancelled; the scheduler drops them before its next forward pass."""
        for job in jobs:
            job.cancelled = True
        with self._wake:
            self._wake.notify()

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._waiting and not self._jobs and not self._closed:
                    self._wake.wait()
                if self._closed:
                    for job in [*self._waiting, *self._jobs.values()]:
                        job.emit(Event(error="the server is shutting down"))
                    return
                joining, tokens = [], 0
                while self._waiting and len(self._jobs) + len(joining) < self.max_batch:
                    job = self._waiting[0]
                    if job.cancelled:
                        self._waiting.popleft()
                        continue
                    if joining and tokens + len(job.prompt) > self.max_prefill_tokens:
                        break
                    joining.append(self._waiting.popleft())
                    tokens += len(job.prompt)
                self._joining = joining
            try:
                self._step(joining)
            except Exception as error:  # a failed step fails its sequences, never the server
                log.exception("decoding step failed")
                for job in [*joining, *self._jobs.values()]:
                    job.emit(Event(error=f"{type(error).__name__}: {error}"))
                self._jobs.clear()
                self.batch = DecodeBatch(self.chat_model.model, self.chat_model.suppress_ids)
            finally:
                self._joining = []

    def _step(self, joining: list[Job]) -> None:
        for scoring in (None, *sorted({j.prompt_logprobs for j in joining if j.prompt_logprobs is not None})):
            group = [j for j in joining if j.prompt_logprobs == scoring]
            if group:
                rows = self.batch.add([j.prompt for j in group], [j.params for j in group], prompt_logprobs=scoring)
                self._jobs.update(zip(rows, group))
        self._joining = []
        first = {id(job) for job in joining}
        finished = set()
        for row, job in self._jobs.items():
            if job.cancelled:
                finished.add(row)
            elif job.stream.max_tokens == 0:  # scoring only (echo with max_tokens=0)
                job.emit(Event(finish_reason="length", prompt_logprobs=row.prompt_logprobs))
                finished.add(row)
        self._drop(finished, advance=False)
        if not self._jobs:
            return
        finished = set()
        for row, pick in zip(self.batch.rows, self.batch.sample()):
            job = self._jobs[row]
            text = job.stream.push(pick.token)
            reason = job.stream.finish_reason
            job.emit(Event(text=text, picks=[pick] if job.params.logprobs is not None else [], finish_reason=reason,
                           completion_tokens=job.stream.count,
                           prompt_logprobs=row.prompt_logprobs if id(job) in first else None))
            if reason is not None:
                finished.add(row)
        self._drop(finished, advance=True)

    def _drop(self, finished: set[Row], advance: bool) -> None:
        for row in finished:
            del self._jobs[row]
        if advance:
            self.batch.advance(finished)
        else:
            self.batch.drop(finished)
