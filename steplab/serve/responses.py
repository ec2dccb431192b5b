"""Turn an engine Handle into an OpenAI response: one JSON body, or Server-Sent Events when ``stream`` is set.

Shared by the chat and text completion routes (``kind`` is "chat" or "text"). A client that goes away is
noticed by a watcher task (non-streaming) or by the streaming generator being closed; either cancels the
request, which frees its slots and ends the handler.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid

from fastapi import Request as HTTPRequest
from fastapi.responses import Response, StreamingResponse

from steplab.serve.common import state
from steplab.serve.errors import APIError, error_body

log = logging.getLogger("steplab.serve")


def logprobs_json(tab: list, kind: str, entries: list, offset: int = 0) -> dict:
    if kind == "chat":
        def item(token, lp):
            text, raw = tab[token]
            return {"token": text, "logprob": lp, "bytes": raw}
        return {"content": [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries],
                "refusal": None}
    tokens = [tab[e.token][0] for e in entries]
    offsets, pos = [], offset
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{tab[t][0]: lp for t, lp in e.top} for e in entries], "text_offset": offsets}


def usage(handle) -> dict:
    return {"prompt_tokens": handle.prompt_tokens, "completion_tokens": handle.completion_tokens,
            "total_tokens": handle.prompt_tokens + handle.completion_tokens}


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'), ensure_ascii=False)}\n\n"


async def _watch_disconnect(request: HTTPRequest, handle) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            handle.cancel()
            return


async def respond(request: HTTPRequest, kind: str, body, handle):
    st = state(request)
    rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
    obj = "chat.completion" if kind == "chat" else "text_completion"
    now, name, started = int(time.time()), body.model, time.perf_counter()
    want_logprobs = handle.request.logprobs is not None
    tab = st.table(name) if want_logprobs else None
    head = {"id": rid, "object": obj + (".chunk" if kind == "chat" and body.stream else ""), "created": now, "model": name,
            "system_fingerprint": "fp_steplab"}
    watcher = asyncio.ensure_future(_watch_disconnect(request, handle))

    def first_token_seen():
        if handle.first_token_at is not None:
            st.metrics.observe_ttft(name, handle.first_token_at - handle.submitted_at)

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def events():
            offsets = [0] * handle.request.n
            try:
                if kind == "chat":
                    for i in range(handle.request.n):
                        choice = {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                        yield sse({**head, "choices": [choice], **({"usage": None} if include_usage else {})})
                seen_first = False
                async for ev in handle:
                    if not seen_first and ev.tokens:
                        seen_first = True
                        first_token_seen()
                    if ev.error:
                        yield sse(error_body(ev.error, "server_error"))
                        continue
                    if not (ev.text or ev.finish_reason or (want_logprobs and ev.logprobs)):
                        continue
                    lp = logprobs_json(tab, kind, ev.logprobs, offsets[ev.index]) if want_logprobs else None
                    offsets[ev.index] += len(ev.text)
                    if kind == "chat":
                        choice = {"index": ev.index, "delta": {"content": ev.text} if ev.text else {}, "logprobs": lp,
                                  "finish_reason": ev.finish_reason}
                    else:
                        choice = {"index": ev.index, "text": ev.text, "logprobs": lp, "finish_reason": ev.finish_reason}
                    if body.return_token_ids:
                        choice["token_ids"] = ev.tokens
                    yield sse({**head, "choices": [choice], **({"usage": None} if include_usage else {})})
                if include_usage:
                    yield sse({**head, "choices": [], "usage": usage(handle)})
                yield "data: [DONE]\n\n"
            finally:
                watcher.cancel()
                if not handle.done:  # the client went away mid-stream: free the slots now
                    handle.cancel()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    choices = [{"tokens": [], "text": [], "logprobs": [], "finish": None} for _ in range(handle.request.n)]
    errors = []
    try:
        async for ev in handle:
            c = choices[ev.index]
            c["tokens"] += ev.tokens
            c["text"].append(ev.text)
            c["logprobs"] += ev.logprobs
            if ev.error:
                errors.append(ev.error)
            if ev.finish_reason:
                c["finish"] = ev.finish_reason
    finally:
        watcher.cancel()
    if handle.cancelled:  # the client went away (nginx's 499: nobody reads this)
        return Response(status_code=499)
    if errors:
        raise APIError(500, errors[0], type="server_error")
    first_token_seen()
    out = []
    for i, c in enumerate(choices):
        text = "".join(c["text"])
        lp = logprobs_json(tab, kind, c["logprobs"]) if want_logprobs else None
        if kind == "chat":
            choice = {"index": i, "message": {"role": "assistant", "content": text, "refusal": None}, "logprobs": lp,
                      "finish_reason": c["finish"]}
        else:
            choice = {"index": i, "text": text, "logprobs": lp, "finish_reason": c["finish"]}
        if body.return_token_ids:
            choice["token_ids"] = c["tokens"]
        out.append(choice)
    extra = {"prompt_token_ids": handle.request.prompt} if body.return_token_ids else {}
    log.debug("%s %s: %d tokens in %.2f s", rid, name, handle.completion_tokens, time.perf_counter() - started)
    return {**head, "choices": out, "usage": usage(handle), **extra}
