"""What crosses the engine's boundary: a :class:`Request` in, a :class:`Handle` to iterate its :class:`Event` s
out (or :class:`Completion` s from ``Engine.generate``), and the errors the API maps to HTTP statuses.
The engine itself (``steplab.infer.engine``) owns the model, the KV cache and the loop."""
from __future__ import annotations

import asyncio
import itertools
import queue
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, AsyncIterator, Iterator

import torch

from steplab.errors import StepLabError

if TYPE_CHECKING:
    from steplab.infer.engine import Engine


class EngineError(StepLabError):
    """A request the engine cannot take (the API maps each subclass to an HTTP status)."""


class QueueFullError(EngineError):
    """The waiting queue is full: back off and retry (the API answers 503 with Retry-After)."""


class ContextLengthError(EngineError):
    """Prompt plus requested completion do not fit in the model's context."""


class EngineStoppedError(EngineError):
    """The engine is not running (not started yet, or shut down)."""


@dataclass
class Request:
    """One generation request; ``n`` choices share the prompt."""

    prompt: list[int]
    max_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # None: off; k: the chosen token's logprob and the k most likely tokens
    stop: tuple[str, ...] = ()  # stop strings (not included in the text)
    stop_ids: frozenset[int] = frozenset()  # stop tokens (counted in usage, not included in the text)
    n: int = 1
    # None: off; k: every prompt token's logprob given the tokens before it (None for the first) and the k most
    # likely tokens there, delivered once per choice before its first token (prompt scoring; max_tokens may be 0).
    prompt_logprobs: int | None = None
    # Step-1V: (n_images, 3, H, W) pixels for the prompt's image slots, in order (models/vision.py); None: text only
    images: torch.Tensor | None = None
    # scoring choices (max_tokens 0, prompt_logprobs set, n = len(continuations)): choice i scores continuation i
    # after the prompt, the prompt computed once; its prompt_logprobs hold the continuation's tokens only
    continuations: tuple[tuple[int, ...], ...] = ()


@dataclass
class Logprob:
    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Event:
    """What one choice produced in one engine step; the last event of a choice has ``finish_reason``."""

    index: int  # which of the n choices
    tokens: list[int]  # new token ids
    text: str  # new text; "" while held back (an unfinished UTF-8 character, a possible stop-string prefix)
    logprobs: list[Logprob] = field(default_factory=list)
    finish_reason: str | None = None  # stop | length | cancelled | error
    error: str | None = None
    prompt_logprobs: list[Logprob | None] | None = None  # set once per choice when the request asked for them


@dataclass
class Completion:
    tokens: list[int]
    text: str
    finish_reason: str
    logprobs: list[Logprob]
    prompt_logprobs: list[Logprob | None] | None = None


_ids = itertools.count(1)


class Handle:
    """A submitted request: iterate it for its events (``async for`` in the loop that submitted it, else ``for``)."""

    def __init__(self, engine: "Engine", request: Request, loop: asyncio.AbstractEventLoop | None):
        self.id = next(_ids)
        self.request = request
        self.prompt_tokens = len(request.prompt)
        self.completion_tokens = 0
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.cancelled = False
        self._engine = engine
        self._loop = loop
        self._aqueue: asyncio.Queue | None = asyncio.Queue() if loop is not None else None
        self._queue: queue.Queue | None = queue.Queue() if loop is None else None
        self._open = request.n  # choices not finished yet (consumer side)

    def cancel(self) -> None:
        """Stop generating (idempotent); the slots are freed on the engine's next turn."""
        if not self.cancelled:
            self.cancelled = True
            self._engine._wake()

    @property
    def done(self) -> bool:
        return self._open == 0

    # -- engine thread side
    def _deliver(self, event: Event) -> None:
        if self._queue is not None:
            self._queue.put(event)
            return
        try:
            self._loop.call_soon_threadsafe(self._aqueue.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancelled = True

    # -- consumer side
    def _consumed(self, event: Event) -> Event:
        if event.finish_reason is not None:
            self._open -= 1
        return event

    async def __aiter__(self) -> AsyncIterator[Event]:
        if self._aqueue is None:
            raise RuntimeError("this request was submitted outside an event loop; iterate it with `for`")
        try:
            while self._open:
                yield self._consumed(await self._aqueue.get())
        finally:
            if self._open:
                self.cancel()

    def __iter__(self) -> Iterator[Event]:
        if self._queue is None:
            raise RuntimeError("this request was submitted inside an event loop; iterate it with `async for`")
        try:
            while self._open:
                yield self._consumed(self._queue.get())
        finally:
            if self._open:
                self.cancel()
