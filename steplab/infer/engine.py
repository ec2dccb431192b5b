"""Serving engine: continuous batching over the slot KV cache.

One background thread owns the model and a :class:`~steplab.models.common.KVCache` with ``max_batch`` rows
("slots"). Each turn of its loop:

1. drops cancelled requests (a client went away): their slots go back to the free list at once and each
   gets a final ``cancelled`` event, wherever it was (waiting, prefilling or decoding), so no consumer waits forever;
2. admits waiting requests first-in first-out while enough slots are free (a request asking for ``n``
   choices takes ``n`` slots);
3. prefills: feeds at most ``prefill_chunk`` prompt tokens into the admitted requests' slots, so a long
   prompt is spread over several turns instead of stalling everyone's decoding; when a prompt is complete
   its cache row is copied to the slots of its other ``n - 1`` choices (the prompt is computed once) and
   every choice samples its first token;
4. decodes: one batched forward of the last token of every running sequence, each row at its own position,
   then per-sequence sampling, stop checks and event delivery. Finished sequences leave the batch at once
   and their slot is free for the next turn's admissions. With ``decode="static"`` or ``"compiled"`` that
   forward is a fixed-shape step over every slot (steplab/infer/decode.py; compiled at :meth:`Engine.start`),
   and the greedy rows take their tokens from one argmax over the batch.

Sampling is per sequence: its own temperature/top-p/top-k, presence and frequency penalties, logprobs and
its own ``torch.Generator`` (seeded with ``seed + choice index``), so a seeded request gives the same tokens
whatever else is in the batch. A row is sampled with :func:`steplab.infer.sampling.sample_next`, the function
``steplab sample`` uses, so greedy decoding returns exactly what :func:`~steplab.infer.sampling.generate`
returns for the same prompt (bit-identical when the request runs alone; in a batch, rows of different
lengths share one attention call and float rounding may in principle differ).

Events cross from the engine thread to the caller through the caller's asyncio loop
(``call_soon_threadsafe``) when :meth:`Engine.submit` is called inside one, else through a ``queue.Queue``::

    handle = engine.submit(Request(prompt=ids, max_tokens=64))   # QueueFullError when the queue is full
    async for event in handle:                                   # or `for event in handle` outside a loop
        print(event.text, end="")

Leaving the loop early (``break``, an exception, a cancelled task) cancels the request and frees its slot.

Threads: the waiting/prefilling/running/free containers change only under the engine's lock (``_cond``), so
:meth:`Engine.stats` (read by /health and /metrics from the event loop) always sees a consistent state
(``running + free_slots == max_batch``); the forward passes run outside the lock. ``before_step``, if set, is
called by the engine thread before each step, outside the lock: tests use it to hold the engine at a known point.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from typing import AsyncIterator

import torch

from steplab.infer.decode import DecodeConfig, FixedDecoder, prefill_together
from steplab.infer.requests import (Completion, ContextLengthError, EngineError, EngineStoppedError, Event,  # noqa: F401
                                    Handle, Logprob, QueueFullError, Request)
from steplab.infer.sampling import SamplingParams, sample_next
from steplab.models.common import KVCache

log = logging.getLogger(__name__)


class _Seq:
    """One choice of a request while it holds a slot."""

    def __init__(self, handle: Handle, index: int, slot: int, device: torch.device):
        req = handle.request
        self.handle, self.index, self.slot = handle, index, slot
        self.params = SamplingParams(temperature=req.temperature, top_k=req.top_k, top_p=req.top_p)
        self.generator = None
        if req.temperature > 0:
            self.generator = torch.Generator(device=device)
            if req.seed is not None:
                self.generator.manual_seed(req.seed + index)
            else:
                self.generator.seed()
        self.counts: torch.Tensor | None = None  # token counts for the penalties
        self.tokens: list[int] = []
        self.pending: list[int] = []  # tokens not yet turned into text (part of a UTF-8 character)
        self.text = ""  # all text so far
        self.sent = 0  # characters of ``text`` already delivered


class _Prefill:
    def __init__(self, handle: Handle, seqs: list[_Seq]):
        self.handle, self.seqs, self.pos = handle, seqs, 0
        self.prompt_logprobs: list[Logprob | None] = [None]  # the first token has no context
        self.embeds: torch.Tensor | None = None  # (1, T, d) prompt embeddings of a request with images


class Engine:
    """Continuous-batching generation for one model (serve several models with one engine each)."""

    def __init__(self, model: torch.nn.Module, tokenizer, *, name: str = "model", max_batch: int = 8,
                 max_queue: int = 64, prefill_chunk: int = 512, max_len: int | None = None,
                 kv_budget_bytes: int | None = None, decode: str | DecodeConfig = "eager"):
        decode_cfg = (decode if isinstance(decode, DecodeConfig) else DecodeConfig(mode=decode)).validate()
        if max_batch < 1 or max_queue < 0 or prefill_chunk < 1:
            raise ValueError("max_batch and prefill_chunk must be >= 1 and max_queue >= 0")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        param = next(model.parameters())
        self.device = param.device
        self.vocab_size = model.cfg.vocab_size
        self.context_len = min(max_len or model.cfg.max_seq_len, model.cfg.max_seq_len)
        # KV-fit admission: the cache is reserved up front, one full-context row per slot, so a request admitted
        # into a slot can never run out of KV memory mid-generation. With a memory budget, the slots are as
        # many full-context rows as fit in it; a request that cannot fit in a row is refused (400, see
        # validate), one that finds no free row waits, and a full queue is refused (503).
        self.kv_bytes_per_slot = kv_cache_bytes(model.cfg, self.context_len, param.dtype)
        if kv_budget_bytes is not None:
            fit = int(kv_budget_bytes // self.kv_bytes_per_slot)
            if fit < 1:
                raise EngineError(f"the KV cache of one {self.context_len}-token sequence needs {self.kv_bytes_per_slot / 2**20:.1f} MiB "
                                  f"but the budget is {kv_budget_bytes / 2**20:.1f} MiB; raise the budget or serve a shorter context")
            max_batch = min(max_batch, fit)
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.cache = KVCache(model.cfg, max_batch, self.context_len, device=self.device, dtype=param.dtype)
        # decode="static"/"compiled": one fixed-shape step over every slot (steplab/infer/decode.py); "eager": the
        # model's forward over the running rows only
        self.decode = decode_cfg.mode
        self.decoder = FixedDecoder(model, self.cache, decode_cfg) if decode_cfg.mode != "eager" else None
        self._free = list(range(max_batch - 1, -1, -1))  # pop() hands out slot 0 first
        self._waiting: deque[Handle] = deque()
        self._prefilling: deque[_Prefill] = deque()
        self._running: list[_Seq] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.before_step = None  # test hook: called in the engine thread before each step
        # counters for /metrics
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.finished_total: dict[str, int] = {}
        self.rejected_total = 0
        self.steps_total = 0

    # -- lifecycle
    def start(self) -> "Engine":
        if self.decoder is not None:
            self.decoder.warm_up()  # compile before serving: no request waits for it (a no-op once warm)
        with self._cond:
            if self._thread is None or not self._thread.is_alive():
                self._stopping = False
                self._thread = threading.Thread(target=self._loop, name=f"engine-{self.name}", daemon=True)
                self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Replace the model's weights in place (RL: the policy after an update), only while the engine is idle,
        so no sequence mixes tokens of two policies. The engine's logprobs then match the new weights."""
        with self._cond:
            if self._waiting or self._prefilling or self._running:
                raise EngineError(f"engine {self.name!r} is busy; refresh weights only between rollouts")
            self.model.load_state_dict(state_dict)
            cfg = self.decoder.cfg if self.decoder is not None else None
            if cfg is not None and cfg.mode == "compiled" and cfg.compile_mode == "frozen":
                # a frozen graph holds the old weights as constants: build and compile a new one
                self.decoder = FixedDecoder(self.model, self.cache, self.decoder.cfg)
                self.decoder.warm_up()

    def stats(self) -> dict:
        """A consistent snapshot of the queue, the slots and the counters (taken under the engine's lock)."""
        with self._cond:
            return {"waiting": len(self._waiting), "running": len(self._running) + sum(len(p.seqs) for p in self._prefilling),
                    "free_slots": len(self._free), "max_batch": self.max_batch,
                    "prompt_tokens_total": self.prompt_tokens_total, "generation_tokens_total": self.generation_tokens_total,
                    "rejected_total": self.rejected_total, "finished": dict(self.finished_total),
                    "cancelled_pending": sum(h.cancelled for h in self._waiting) + sum(p.handle.cancelled for p in self._prefilling)
                    + sum(s.handle.cancelled for s in self._running)}

    # -- requests
    def validate(self, request: Request) -> None:
        """Raise EngineError/ValueError for a request that can never run; the API calls it before streaming."""
        n_prompt = len(request.prompt)
        if n_prompt == 0:
            raise ValueError("the prompt is empty; it needs at least one token")
        if any(not 0 <= t < self.vocab_size for t in request.prompt):
            raise ValueError(f"prompt token ids must lie in [0, {self.vocab_size})")
        if not 1 <= request.n <= self.max_batch:
            raise ValueError(f"n={request.n} must be between 1 and the server's batch size {self.max_batch}")
        if request.max_tokens < (0 if request.prompt_logprobs is not None else 1):
            raise ValueError(f"max_tokens={request.max_tokens} must be at least 1 (0 only when scoring the prompt)")
        if n_prompt + request.max_tokens > self.context_len:
            raise ContextLengthError(
                f"this model's maximum context length is {self.context_len} tokens, but {n_prompt + request.max_tokens} "
                f"were requested ({n_prompt} in the prompt + {request.max_tokens} for the completion); "
                f"shorten the prompt or lower max_tokens")
        if request.continuations:
            from steplab.infer.scoring import check_continuations

            check_continuations(self, request, n_prompt)
        if request.images is not None and not hasattr(self.model, "embed"):
            raise ValueError(f"model {self.name!r} does not read images; send text only")
        if request.temperature < 0 or not 0 < request.top_p <= 1 or request.top_k < 0:
            raise ValueError("need temperature >= 0, 0 < top_p <= 1 and top_k >= 0")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(request, name)
            if k is not None and not 0 <= k <= 20:
                raise ValueError(f"{name}={k} must be between 0 and 20")

    def submit(self, request: Request) -> Handle:
        """Queue a request; raises QueueFullError (back-pressure), ContextLengthError, ValueError, EngineStoppedError."""
        self.validate(request)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        handle = Handle(self, request, loop)
        with self._cond:
            if not self.running:
                raise EngineStoppedError(f"engine {self.name!r} is not running")
            if len(self._waiting) >= self.max_queue:
                self.rejected_total += 1
                raise QueueFullError(f"model {self.name!r} is busy: {len(self._waiting)} requests are already waiting; retry shortly")
            self._waiting.append(handle)
            self._cond.notify()
        return handle

    async def stream(self, request: Request) -> AsyncIterator[Event]:
        """``async for event in engine.stream(request)``: submit and yield its events (errors raise on the first step)."""
        async for event in self.submit(request):
            yield event

    def generate(self, request: Request) -> list[Completion]:
        """Blocking convenience: run a request to the end and return its choices."""
        out = [Completion([], "", "", []) for _ in range(request.n)]
        for ev in self.submit(request):
            c = out[ev.index]
            c.tokens += ev.tokens
            c.text += ev.text
            c.logprobs += ev.logprobs
            if ev.prompt_logprobs is not None:
                c.prompt_logprobs = ev.prompt_logprobs
            if ev.finish_reason:
                if ev.error:
                    raise EngineError(ev.error)
                c.finish_reason = ev.finish_reason
        return out

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    # -- the engine thread
    def _loop(self) -> None:
        while True:
            try:
                with self._cond:
                    while not (self._stopping or self._waiting or self._prefilling or self._running):
                        self._cond.wait()
                    if self._stopping:
                        break
                    self._drop_cancelled()
                    self._admit()
                    if not (self._prefilling or self._running):
                        continue  # all that woke the loop was cancelled: no empty step (and no test hook without work)
                if self.before_step is not None:
                    self.before_step()
                with torch.no_grad():
                    self._step()
            except Exception as e:  # keep serving: fail the requests in flight, not the server
                log.exception("engine %s: step failed", self.name)
                self._fail_running(f"internal engine error ({type(e).__name__}); the request was aborted")
        self._fail_running("the server is shutting down")
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
        for handle in waiting:
            for i in range(handle.request.n):
                handle._deliver(Event(i, [], "", finish_reason="error", error="the server is shutting down"))

    def _drop_cancelled(self) -> None:
        """(under the lock) Finish every cancelled request, with a final event for each of its choices."""
        if any(h.cancelled for h in self._waiting):
            dropped = [h for h in self._waiting if h.cancelled]
            self._waiting = deque(h for h in self._waiting if not h.cancelled)
            for handle in dropped:  # never admitted: no slot to free, but the consumer still needs its end
                for i in range(handle.request.n):
                    self.finished_total["cancelled"] = self.finished_total.get("cancelled", 0) + 1
                    handle._deliver(Event(i, [], "", finish_reason="cancelled"))
        for pre in [p for p in self._prefilling if p.handle.cancelled]:
            self._prefilling.remove(pre)
            for seq in pre.seqs:
                self._finish(seq, "cancelled", running=False)
        for seq in [s for s in self._running if s.handle.cancelled]:
            self._finish(seq, "cancelled")

    def _admit(self) -> None:
        while self._waiting and len(self._free) >= self._waiting[0].request.n:
            handle = self._waiting.popleft()
            seqs = [_Seq(handle, i, self._free.pop(), self.device) for i in range(handle.request.n)]
            self.cache.lengths[[s.slot for s in seqs]] = 0
            self._prefilling.append(_Prefill(handle, seqs))

    def _step(self) -> None:
        from steplab.infer.scoring import score_step

        budget = self.prefill_chunk - score_step(self, self.prefill_chunk)  # score-only requests, batched
        if self.decoder is not None:  # the fast decode modes also prefill whole prompts together
            budget -= prefill_together(self, budget)
        while self._prefilling and budget > 0:
            pre = self._prefilling[0]
            if pre.handle.request.continuations:
                break  # scored by score_step only, next turn
            prompt, first = pre.handle.request.prompt, pre.seqs[0]
            chunk = prompt[pre.pos:pre.pos + budget]
            ids = torch.tensor([chunk], device=self.device)
            extra = {}
            if pre.handle.request.images is not None:  # image features for the whole prompt once, fed chunk by chunk
                if pre.embeds is None:
                    pre.embeds = self.model.embed(torch.tensor([prompt], device=self.device),
                                                  pre.handle.request.images.to(self.device, self.cache.k.dtype))
                extra["embeds"] = pre.embeds[:, pre.pos:pre.pos + len(chunk)]
            logits = self.model(ids, cache=self.cache, slots=torch.tensor([first.slot], device=self.device), **extra)
            if pre.handle.request.prompt_logprobs is not None:
                targets = prompt[pre.pos + 1:pre.pos + len(chunk) + 1]  # what each chunk position predicts
                pre.prompt_logprobs += _score(logits[0, :len(targets)], targets, pre.handle.request.prompt_logprobs)
            pre.pos += len(chunk)
            budget -= len(chunk)
            if pre.pos < len(prompt):
                break  # the rest of this prompt next turn, after a decode step for the others
            with self._cond:  # one move, so stats() never sees the sequences in neither container
                self._prefilling.popleft()
                self._running.extend(pre.seqs)
                self.prompt_tokens_total += len(prompt)
            # running before the copy: if a copy fails, _fail_running finds these sequences and frees their slots
            for seq in pre.seqs[1:]:  # n > 1: share the computed prompt
                self._copy_slot(first.slot, seq.slot, len(prompt))
            if pre.handle.request.prompt_logprobs is not None:
                done = pre.handle.request.max_tokens == 0
                for seq in pre.seqs:
                    seq.handle._deliver(Event(seq.index, [], "", finish_reason="length" if done else None,
                                              prompt_logprobs=pre.prompt_logprobs))
                    if done:  # scored, nothing to generate: leave the batch now
                        self._finish(seq, "length", deliver=False)
                if done:
                    continue
            for seq in pre.seqs:
                self._accept(seq, logits[0, -1])
        if self._running:
            batch = list(self._running)
            if self.decoder is None:
                ids = torch.tensor([[s.tokens[-1]] for s in batch], device=self.device)
                slots = torch.tensor([s.slot for s in batch], device=self.device)
                logits = self.model(ids, cache=self.cache, slots=slots)[:, -1]
                rows, argmax = list(range(len(batch))), None
            else:
                logits, argmax = self.decoder.step([s.slot for s in batch], [s.tokens[-1] for s in batch])
                rows = [s.slot for s in batch]
            # greedy rows without penalties: one argmax and one host transfer for all of them instead of one each
            # (per-row overhead is a visible part of a tiny model's step); argmax ties resolve as in sample_next
            greedy: list[int | None] = [None] * len(batch)
            if any(_plain_greedy(s) for s in batch):
                top = (argmax if argmax is not None else logits.argmax(dim=-1)).tolist()
                greedy = [top[r] if _plain_greedy(s) else None for r, s in zip(rows, batch)]
            for i, seq in enumerate(batch):
                self._accept(seq, logits[rows[i]], greedy[i])
        self.steps_total += 1

    def _copy_slot(self, src: int, dst: int, length: int) -> None:
        self.cache.k[:, dst, :, :length] = self.cache.k[:, src, :, :length]
        self.cache.v[:, dst, :, :length] = self.cache.v[:, src, :, :length]
        self.cache.lengths[dst] = length

    def _accept(self, seq: _Seq, logits: torch.Tensor, token: int | None = None) -> None:
        """Sample the next token of ``seq`` from its logits row (V,) (``token``: already chosen greedily), deliver
        it, finish the sequence if done."""
        req, handle = seq.handle.request, seq.handle
        if token is None:
            if req.presence_penalty or req.frequency_penalty:
                if seq.counts is None:
                    seq.counts = torch.zeros(logits.shape[-1], device=logits.device)
                # OpenAI's formula: logit - count * frequency_penalty - (count > 0) * presence_penalty
                logits = logits.float() - req.frequency_penalty * seq.counts - req.presence_penalty * (seq.counts > 0).float()
            token = int(sample_next(logits[None], seq.params, seq.generator)[0])
        logprobs = []
        if req.logprobs is not None:
            logp = torch.log_softmax(logits.float(), dim=-1)
            top = torch.topk(logp, req.logprobs) if req.logprobs else None
            alternatives = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
            logprobs.append(Logprob(token, float(logp[token]), alternatives))
        seq.tokens.append(token)
        if seq.counts is not None:
            seq.counts[token] += 1
        handle.completion_tokens += 1
        self.generation_tokens_total += 1
        if handle.first_token_at is None:
            handle.first_token_at = time.perf_counter()

        finish = None
        if token in req.stop_ids:
            text, finish = self._text(seq, None, final=True), "stop"
        else:
            text, hit = self._text_with_stops(seq, token, final=len(seq.tokens) >= req.max_tokens)
            if hit:
                finish = "stop"
            elif len(seq.tokens) >= req.max_tokens:
                finish = "length"
        handle._deliver(Event(seq.index, [token], text, logprobs, finish_reason=finish))
        if finish:
            self._finish(seq, finish, deliver=False)

    def _text(self, seq: _Seq, token: int | None, final: bool) -> str:
        """Decode new tokens into ``seq.text`` (waiting while a UTF-8 character is incomplete); return new text."""
        if token is not None:
            seq.pending.append(token)
        if seq.pending:
            piece = self.tokenizer.decode(seq.pending, skip_special=True)
            # A byte-level token can end inside a multi-byte character: wait (a character is at most 4 bytes).
            if not (piece.endswith("\ufffd") and len(seq.pending) < 4 and not final):
                seq.text += piece
                seq.pending = []
        if final:
            out, seq.sent = seq.text[seq.sent:], len(seq.text)
            return out
        return ""

    def _text_with_stops(self, seq: _Seq, token: int, final: bool) -> tuple[str, bool]:
        """New text that is safe to send, and whether a stop string was hit (the text is cut before it)."""
        self._text(seq, token, final=False)
        stops, text = seq.handle.request.stop, seq.text
        if stops:
            hits = [i for i in (text.find(s, seq.sent) for s in stops if s) if i >= 0]
            if hits:
                out, seq.sent = text[seq.sent:min(hits)], len(text)
                return out, True
        if final:
            return self._text(seq, None, final=True), False
        hold = 0  # keep back the longest tail that could still grow into a stop string
        for s in stops:
            for k in range(min(len(s) - 1, len(text) - seq.sent), hold, -1):
                if text.endswith(s[:k]):
                    hold = k
                    break
        end = len(text) - hold
        out, seq.sent = text[seq.sent:end], end
        return out, False

    def _finish(self, seq: _Seq, reason: str, *, running: bool = True, deliver: bool = True, error: str | None = None) -> None:
        with self._cond:  # the lock is re-entrant: _drop_cancelled calls this while holding it
            if running:
                self._running.remove(seq)
            self.cache.lengths[seq.slot] = 0
            self._free.append(seq.slot)
            self.finished_total[reason] = self.finished_total.get(reason, 0) + 1
        if deliver:
            seq.handle._deliver(Event(seq.index, [], "", finish_reason=reason, error=error))

    def _fail_running(self, message: str) -> None:
        with self._cond:
            for pre in list(self._prefilling):
                for seq in pre.seqs:
                    self._finish(seq, "error", running=False, error=message)
            self._prefilling.clear()
            for seq in list(self._running):
                self._finish(seq, "error", error=message)


def _plain_greedy(seq: _Seq) -> bool:
    """Greedy without penalties: the token is the row's argmax (what sample_next returns at temperature 0)."""
    req = seq.handle.request
    return seq.generator is None and not (req.presence_penalty or req.frequency_penalty)


def _score(logits: torch.Tensor, targets: list[int], k: int) -> list[Logprob]:
    """Logprob of each target under its logits row (T, V), with the k most likely tokens of the row."""
    if not targets:
        return []
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(-1, torch.tensor(targets, device=logp.device)[:, None])[:, 0].tolist()
    if k:
        top = torch.topk(logp, k, dim=-1)
        tops = [list(zip(i, v)) for i, v in zip(top.indices.tolist(), top.values.tolist())]
    else:
        tops = [[] for _ in targets]
    return [Logprob(t, lp, alt) for t, lp, alt in zip(targets, chosen, tops)]


def kv_cache_bytes(cfg, tokens: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of keys + values for one sequence of ``tokens`` positions."""
    return 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * tokens * torch.tensor([], dtype=dtype).element_size()

