"""`steplab serve`: the engine against the reference sampler, the real server driven by the official openai client
(sync, async, streaming, n>1, stop, seeds, logprobs, usage), every error case over raw HTTP, cancellation, the CLI."""
from __future__ import annotations

import argparse
import asyncio
import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from serve_fixtures import Hold, Server, loaded, one_thread, wait_for  # noqa: E402,F401,F811 (pytest fixtures)

from steplab.infer.engine import Engine, QueueFullError, Request  # noqa: E402
from steplab.infer.prompts import chat_stop_ids, encode_chat  # noqa: E402
from steplab.infer.sampling import SamplingParams, generate  # noqa: E402

KEY = "sk-test-0123456789"
HEADERS = {"Authorization": f"Bearer {KEY}"}
MODEL = "step-1-nano"
CHAT = [{"role": "user", "content": "def main():"}]


@pytest.fixture(scope="module")
def server(loaded):
    from steplab.serve.app import create_app

    run, model, tokenizer = loaded
    engine = Engine(model, tokenizer, name=MODEL, max_batch=8, max_queue=64)
    app = create_app({MODEL: engine, "second": (model, tokenizer)}, api_keys={KEY, "sk-other-key"}, max_request_bytes=50_000)
    with Server(app) as srv:
        srv.engine = engine
        srv.app = app
        yield srv
    engine.stop()


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _ids(tokenizer, text):
    return [tokenizer.bos_id] + tokenizer.encode(text)


def _assert_openai_error(resp, status, code=None, param=None):
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"] and "Traceback" not in resp.text
    if code is not None:
        assert body["error"]["code"] == code, body
    if param is not None:
        assert body["error"]["param"] == param, body
    return body["error"]


# ---- engine ---------------------------------------------------------------------------------------------

def test_engine_greedy_equals_generate_alone_and_batched(loaded):
    _, model, tok = loaded
    prompts = [_ids(tok, p) for p in ["def main(", "import os\n", "class Foo:", "x = [", "# comment"]]
    params = SamplingParams(max_new_tokens=40, temperature=0)
    ref = [generate(model, [p], params, stop_ids={tok.eos_id})[0] for p in prompts]
    with Engine(model, tok, max_batch=4, max_queue=8) as engine:
        for p, r in zip(prompts, ref):  # alone in the batch
            out = engine.generate(Request(p, 40, temperature=0, stop_ids=frozenset({tok.eos_id})))[0]
            assert out.tokens == r
            assert out.text == tok.decode(r, skip_special=True)
        # five at once through four slots: joins and leaves mid-batch, rows at different positions
        handles = [engine.submit(Request(p, 40, temperature=0, stop_ids=frozenset({tok.eos_id}))) for p in prompts]
        got = [[t for ev in h for t in ev.tokens] for h in handles]
    assert got == ref


def test_engine_seeded_sampling_matches_generate_and_ignores_neighbours(loaded):
    _, model, tok = loaded
    prompt = _ids(tok, "import sys\n")
    ref = generate(model, [prompt], SamplingParams(max_new_tokens=30, temperature=0.9, top_k=50, seed=1234))[0]
    with Engine(model, tok, max_batch=4) as engine:
        alone = engine.generate(Request(prompt, 30, temperature=0.9, top_k=50, seed=1234))[0].tokens
        noise = [engine.submit(Request(_ids(tok, "x"), 60, temperature=1.0)) for _ in range(3)]
        crowded = engine.generate(Request(prompt, 30, temperature=0.9, top_k=50, seed=1234))[0].tokens
        for h in noise:
            h.cancel()
    assert alone == ref and crowded == ref


def test_engine_serves_moe_models(loaded):
    pytest.importorskip("steplab.models.moe")
    import torch

    from steplab.config import ModelConfig, MoEConfig
    from steplab.models import build_model

    _, _, tok = loaded
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=64, n_layer=2, n_head=4, max_seq_len=128,
                      moe=MoEConfig(n_experts=4, top_k=2, n_shared=1))
    model = build_model(cfg).eval()
    prompts = [_ids(tok, p) for p in ["def f(", "import os", "x"]]
    ref = [generate(model, [p], SamplingParams(max_new_tokens=20, temperature=0))[0] for p in prompts]
    with Engine(model, tok, max_batch=4) as engine:
        assert [engine.generate(Request(p, 20, temperature=0))[0].tokens for p in prompts] == ref
        handles = [engine.submit(Request(p, 20, temperature=0)) for p in prompts]
        assert [[t for ev in h for t in ev.tokens] for h in handles] == ref


def test_engine_queue_full_and_cancel_frees_slot(loaded):
    _, model, tok = loaded
    with Engine(model, tok, max_batch=1, max_queue=1) as engine:
        with Hold(engine) as hold:  # deterministic: nothing can finish while held
            first = engine.submit(Request(_ids(tok, "a"), 200, temperature=1.0))
            hold.wait_reached()
            assert engine.stats()["running"] == 1
            second = engine.submit(Request(_ids(tok, "b"), 200, temperature=1.0))
            with pytest.raises(QueueFullError):
                engine.submit(Request(_ids(tok, "c"), 5))
            first.cancel()
            second.cancel()
        # both end with a final "cancelled" event: the running one and the one still waiting
        assert [ev.finish_reason for ev in first if ev.finish_reason] == ["cancelled"]
        assert [ev.finish_reason for ev in second if ev.finish_reason] == ["cancelled"]
        wait_for(lambda: engine.stats()["free_slots"] == 1, what="the slot to come back")
        assert {k: engine.stats()[k] for k in ("waiting", "running", "free_slots", "max_batch")} == \
            {"waiting": 0, "running": 0, "free_slots": 1, "max_batch": 1}
        assert engine.generate(Request(_ids(tok, "d"), 3, temperature=0))[0].finish_reason == "length"


# ---- the API through the openai client ---------------------------------------------------------------------

def test_api_greedy_equals_steplab_sample(server, loaded, client, capsys):
    from steplab.cli import main

    run, _, tok = loaded
    prompt = "def parse(self"
    assert main(["sample", str(run), "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "40", "--json", "--dtype", "fp32"]) == 0
    sample = json.loads(capsys.readouterr().out)[0]
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0, extra_body={"return_token_ids": True})
    assert r.choices[0].model_extra["token_ids"] == sample["tokens"]
    assert r.choices[0].text == sample["text"]
    assert r.model_extra["prompt_token_ids"] == _ids(tok, prompt)
    # the same through streaming
    stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0, stream=True,
                                       extra_body={"return_token_ids": True})
    chunks = list(stream)
    assert [t for c in chunks for t in c.choices[0].model_extra.get("token_ids", [])] == sample["tokens"]
    assert "".join(c.choices[0].text for c in chunks) == sample["text"]


def test_models_and_health(server, client):
    ids = [m.id for m in client.models.list().data]
    assert ids == [MODEL, "second"]
    assert client.models.retrieve(MODEL).id == MODEL
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and set(health["models"]) == {MODEL, "second"}


def test_chat_sync_usage_and_second_model(server, loaded, client):
    _, _, tok = loaded
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0,
                                       extra_body={"return_token_ids": True})
    choice = r.choices[0]
    assert r.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    prompt = encode_chat(tok, CHAT)
    assert r.usage.prompt_tokens == len(prompt) == len(r.model_extra["prompt_token_ids"])
    assert r.usage.completion_tokens == len(choice.model_extra["token_ids"]) <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # greedy chat equals the reference sampler on the chat-formatted prompt
    ref = generate(server.engine.model, [prompt], SamplingParams(max_new_tokens=12, temperature=0), stop_ids=set(chat_stop_ids(tok)))[0]
    assert choice.model_extra["token_ids"] == ref
    other = client.chat.completions.create(model="second", messages=CHAT, max_completion_tokens=12, temperature=0)
    assert other.choices[0].message.content == choice.message.content and other.model == "second"


def test_chat_streaming_chunks_done_and_usage(server, client):
    kwargs = dict(model=MODEL, messages=CHAT, max_tokens=30, temperature=0.8, seed=5)
    full = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    # the raw wire format: SSE data lines ending in [DONE]
    with httpx.stream("POST", server.url + "/v1/chat/completions", headers=HEADERS,
                      json={**kwargs, "stream": True}) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in resp.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"


def test_async_client_concurrent_and_streaming(server):
    async def main():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        prompts = ["def a(", "class B", "import c", "for i in", "while x", "return y"]
        rs = await asyncio.gather(*[client.completions.create(model=MODEL, prompt=p, max_tokens=20, temperature=0) for p in prompts])
        stream = await client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=15, stream=True, seed=1)
        pieces = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        await client.close()
        return rs, pieces

    rs, pieces = asyncio.run(main())
    assert len(rs) == 6 and all(r.usage.completion_tokens >= 1 for r in rs)
    assert len(pieces) >= 2


def test_n_choices_and_seed_reproducibility(server, client):
    kwargs = dict(model=MODEL, messages=CHAT, max_tokens=20, temperature=1.0, n=3, seed=42)
    a = client.chat.completions.create(**kwargs)
    assert [c.index for c in a.choices] == [0, 1, 2]
    texts = [c.message.content for c in a.choices]
    assert len(set(texts)) > 1  # different generators per choice
    # same seed again, with other requests running alongside: identical
    with httpx.Client(timeout=60) as noise_client:
        import threading

        noise = threading.Thread(target=lambda: noise_client.post(server.url + "/v1/completions", headers=HEADERS,
                                                                  json={"model": MODEL, "prompt": "x", "max_tokens": 60}))
        noise.start()
        b = client.chat.completions.create(**kwargs)
        noise.join()
    assert [c.message.content for c in b.choices] == texts
    assert a.usage.completion_tokens == b.usage.completion_tokens
    assert a.usage.prompt_tokens == b.usage.prompt_tokens  # the prompt is counted once, not n times
    different = client.chat.completions.create(**{**kwargs, "seed": 43, "n": 1})
    assert different.choices[0].message.content != texts[0]
    streamed = list(client.chat.completions.create(**kwargs, stream=True))
    per_choice = ["".join(c.choices[0].delta.content or "" for c in streamed if c.choices and c.choices[0].index == i) for i in range(3)]
    assert per_choice == texts


def test_stop_sequences(server, client):
    base = client.completions.create(model=MODEL, prompt="def main(", max_tokens=40, temperature=0).choices[0].text
    assert len(base) > 10
    stop = base[5:8]
    cut = base[:base.index(stop)]
    r = client.completions.create(model=MODEL, prompt="def main(", max_tokens=40, temperature=0, stop=[stop, "\u2603never"])
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=MODEL, prompt="def main(", max_tokens=40, temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut
    chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=30, temperature=0).choices[0].message.content
    if len(chat) > 6:
        stopped = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=30, temperature=0, stop=chat[3:6])
        assert stopped.choices[0].message.content == chat[:chat.index(chat[3:6])]


def test_logprobs_and_penalties(server, client):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=10, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)  # greedy picks the most likely
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
    c = client.completions.create(model=MODEL, prompt="import", max_tokens=8, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 8 and lp.text_offset[0] == 0
    plain = client.completions.create(model=MODEL, prompt="def main(", max_tokens=40, temperature=0, extra_body={"return_token_ids": True})
    penalised = client.completions.create(model=MODEL, prompt="def main(", max_tokens=40, temperature=0, frequency_penalty=2.0,
                                          presence_penalty=1.0, extra_body={"return_token_ids": True})
    most_common = lambda ids: max(ids.count(t) for t in set(ids))  # noqa: E731
    assert most_common(penalised.choices[0].model_extra["token_ids"]) < most_common(plain.choices[0].model_extra["token_ids"])


# ---- errors over raw HTTP -------------------------------------------------------------------------------------

def test_auth_errors(server):
    url = server.url + "/v1/chat/completions"
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 2}
    _assert_openai_error(httpx.post(url, json=body), 401, "invalid_api_key")
    _assert_openai_error(httpx.post(url, json=body, headers={"Authorization": "Bearer wrong"}), 401, "invalid_api_key")
    _assert_openai_error(httpx.post(url, json=body, headers={"Authorization": KEY}), 401)
    _assert_openai_error(httpx.get(server.url + "/v1/models"), 401)
    _assert_openai_error(httpx.post(url, content=b"{not json"), 401)  # the key is checked before the body
    assert httpx.post(url, json=body, headers={"Authorization": "Bearer sk-other-key"}).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()


@pytest.mark.parametrize("body, param", [
    ({"model": MODEL, "messages": CHAT, "temperature": 5}, "temperature"),
    ({"model": MODEL, "messages": CHAT, "n": 0}, "n"),
    ({"model": MODEL, "messages": CHAT, "max_tokens": "many"}, "max_tokens"),
    ({"model": MODEL, "messages": CHAT, "top_p": 0}, "top_p"),
    ({"model": MODEL, "messages": CHAT, "top_logprobs": 50, "logprobs": True}, "top_logprobs"),
    ({"model": MODEL, "messages": CHAT, "presence_penalty": 3}, "presence_penalty"),
    ({"model": MODEL, "messages": CHAT, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"model": MODEL, "messages": []}, "messages"),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, None),
    ({"model": MODEL, "messages": "hi"}, "messages"),
    ({"messages": CHAT}, "model"),
    ({"model": MODEL, "messages": CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"model": MODEL, "messages": CHAT, "stream": "sometimes"}, "stream"),
    ({"model": MODEL, "messages": CHAT, "stream_options": {"include_usage": "x"}}, "stream_options.include_usage"),
    ({"model": MODEL, "messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ({"model": MODEL, "messages": CHAT, "n": 9}, None),  # more choices than batch slots
])
def test_invalid_fields_are_400(server, body, param):
    err = _assert_openai_error(httpx.post(server.url + "/v1/chat/completions", json=body, headers=HEADERS), 400)
    if param:
        assert err["param"] == param, err


def test_bad_json_unknown_model_route_and_size(server):
    url = server.url + "/v1/chat/completions"
    _assert_openai_error(httpx.post(url, content=b"{oops", headers=HEADERS), 400, "invalid_json")
    _assert_openai_error(httpx.post(url, content=b"[1, 2]", headers=HEADERS), 400)
    _assert_openai_error(httpx.post(url, json={"model": "step-9-1m", "messages": CHAT}, headers=HEADERS), 404, "model_not_found", "model")
    _assert_openai_error(httpx.get(server.url + "/v1/models/step-9-1m", headers=HEADERS), 404, "model_not_found")
    _assert_openai_error(httpx.get(server.url + "/v1/nothing-here", headers=HEADERS), 404)
    big = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 60_000}]}
    _assert_openai_error(httpx.post(url, json=big, headers=HEADERS), 413, "request_too_large")

    def chunked():  # no Content-Length: the limit is enforced while reading
        for _ in range(10):
            yield b" " * 10_000

    _assert_openai_error(httpx.post(url, content=chunked(), headers=HEADERS), 413)
    _assert_openai_error(httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": ["a", "b"], "max_tokens": 0}, headers=HEADERS), 400)
    _assert_openai_error(httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": [1, 99999]}, headers=HEADERS), 400)


def test_prompt_longer_than_context_is_400_with_numbers(server, loaded):
    _, _, tok = loaded
    long = [{"role": "user", "content": "word " * 400}]
    n_prompt = len(encode_chat(tok, long))
    err = _assert_openai_error(httpx.post(server.url + "/v1/chat/completions", json={"model": MODEL, "messages": long},
                                          headers=HEADERS), 400, "context_length_exceeded", "messages")
    assert str(n_prompt) in err["message"] and "256" in err["message"]
    err = _assert_openai_error(httpx.post(server.url + "/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "max_tokens": 300},
                                          headers=HEADERS), 400, "context_length_exceeded")
    n_chat = len(encode_chat(tok, CHAT))
    assert f"{n_chat + 300}" in err["message"] and "256" in err["message"] and "300" in err["message"]
    with pytest.raises(openai.BadRequestError):
        openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0).completions.create(model=MODEL, prompt="a " * 600)


def test_rate_limit_429_with_retry_after(loaded):
    from steplab.serve.app import create_app

    _, model, tok = loaded
    app = create_app({MODEL: (model, tok)}, api_keys={KEY, "sk-b"}, rate_limit="3/min", max_batch=2)
    with Server(app) as srv:
        statuses = [httpx.get(srv.url + "/v1/models", headers=HEADERS).status_code for _ in range(3)]
        assert statuses == [200, 200, 200]
        resp = httpx.get(srv.url + "/v1/models", headers=HEADERS)
        _assert_openai_error(resp, 429, "rate_limit_exceeded")
        assert 1 <= int(resp.headers["retry-after"]) <= 60
        assert httpx.get(srv.url + "/v1/models", headers={"Authorization": "Bearer sk-b"}).status_code == 200  # per key
        with pytest.raises(openai.RateLimitError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0).models.list()


def test_queue_full_is_503_with_retry_after(loaded):
    from steplab.serve.app import create_app

    _, model, tok = loaded
    engine = Engine(model, tok, name=MODEL, max_batch=1, max_queue=1)
    app = create_app({MODEL: engine}, api_keys=None)
    with Server(app) as srv, Hold(engine) as hold:
        busy = engine.submit(Request(_ids(tok, "a"), 250, temperature=1.0))
        hold.wait_reached()  # admitted and held: the one slot stays busy
        queued = engine.submit(Request(_ids(tok, "b"), 5))
        resp = httpx.post(srv.url + "/v1/completions", json={"model": MODEL, "prompt": "c", "max_tokens": 2})
        busy.cancel()
        queued.cancel()
        _assert_openai_error(resp, 503, "server_overloaded")
        assert resp.headers["retry-after"] == "1"
    engine.stop()


def test_cancelled_leftovers_wake_no_empty_step(loaded):
    """Requests cancelled while the engine is busy are dropped without a step of their own: the step hook never
    runs with nothing to do (the disconnect test below once saw a held engine with no request running because a
    previous test's cancelled request had woken the loop)."""
    import threading

    _, model, tok = loaded
    engine = Engine(model, tok, name=MODEL, max_batch=1, max_queue=4).start()
    seen: list[int] = []  # requests running at each step hook
    reached, go = threading.Event(), threading.Event()

    def hook():
        seen.append(engine.stats()["running"])
        if not go.is_set():
            reached.set()
            go.wait()

    engine.before_step = hook
    try:
        first = engine.submit(Request(_ids(tok, "a"), 200, temperature=1.0))
        assert reached.wait(30), "the engine never took the first request"
        second = engine.submit(Request(_ids(tok, "b"), 200, temperature=1.0))  # waits: the one slot is busy
        first.cancel()
        second.cancel()
        go.set()
        wait_for(lambda: engine.stats()["finished"].get("cancelled", 0) == 2, what="both requests to be cancelled")
        assert engine.stats()["waiting"] == engine.stats()["running"] == 0
        assert seen and all(n >= 1 for n in seen), f"a step ran with no request: running per step {seen}"
    finally:
        go.set()
        engine.stop()


def test_client_disconnect_cancels_generation(server):
    """Deterministic (no race between the model stopping and the client leaving): the engine is held with the
    request admitted but before its first step while the client goes away (test_serve_storm covers mid-stream)."""
    engine = server.engine
    cancelled = lambda: engine.stats()["finished"].get("cancelled", 0)  # noqa: E731
    before = cancelled()
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 240, "temperature": 1.0, "seed": 0, "stream": True}
    with Hold(engine) as hold:  # admitted, then held before its first step: it cannot finish on its own
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers=HEADERS) as resp:
            next(line for line in resp.iter_lines() if line.startswith("data: "))  # the role chunk: the handler runs
            hold.wait_reached()
            assert engine.stats()["running"] == 1
        # the connection is closed; the server notices while the engine is still held
        wait_for(lambda: engine.stats()["cancelled_pending"] == 1, what="the disconnect to cancel the request")
    wait_for(lambda: cancelled() == before + 1, what="the cancelled request to finish")
    # a non-streaming request whose client gives up is cancelled too (held: it cannot finish before the timeout)
    with Hold(engine):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/chat/completions", json={**body, "stream": False}, headers=HEADERS, timeout=0.3)
        wait_for(lambda: engine.stats()["cancelled_pending"] == 1, what="the disconnect to cancel the request")
    wait_for(lambda: cancelled() == before + 2, what="the cancelled request to finish")
    wait_for(lambda: engine.stats()["free_slots"] == engine.max_batch, what="all slots free")


def test_metrics_prometheus_format(server, client):
    client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3)
    text = httpx.get(server.url + "/metrics").text
    assert 'steplab_requests_total{endpoint="/v1/chat/completions",status="200"}' in text
    assert 'steplab_queue_depth{model="step-1-nano"} 0.0' in text
    parser = pytest.importorskip("prometheus_client.parser")
    families = {f.name: f for f in parser.text_string_to_metric_families(text)}
    assert {"steplab_requests", "steplab_request_duration_seconds", "steplab_time_to_first_token_seconds",
            "steplab_generation_tokens", "steplab_queue_depth"} <= set(families)
    generated = [s.value for s in families["steplab_generation_tokens"].samples if s.labels["model"] == MODEL]
    assert generated[0] >= 3


def test_page_is_served(server):
    resp = httpx.get(server.url + "/")
    assert resp.status_code == 200 and "text/html" in resp.headers["content-type"] and "/v1/chat/completions" in resp.text


# ---- auth helpers and the CLI -------------------------------------------------------------------------------

def test_keys_and_rate_parsing(tmp_path):
    from steplab.errors import ConfigError
    from steplab.serve.auth import KeyChecker, RateLimiter, load_api_keys, parse_rate

    f = tmp_path / "keys"
    f.write_text("# team keys\nsk-a\n\n  sk-b  # laptop\n")
    assert load_api_keys(f, environ={"STEPLAB_API_KEYS": "sk-c, sk-d"}) == {"sk-a", "sk-b", "sk-c", "sk-d"}
    assert load_api_keys(None, environ={}) == set()
    with pytest.raises(ConfigError):
        load_api_keys(tmp_path / "missing", environ={})
    with pytest.raises(ConfigError):
        KeyChecker(set())
    checker = KeyChecker({"sk-a"})
    assert checker.check("Bearer sk-a")[0] and not checker.check("Bearer sk-b")[0] and not checker.check(None)[0]
    assert [(i.amount, i.get_expiry()) for i in parse_rate("60/min")] == [(60, 60)]
    assert [(i.amount, i.get_expiry()) for i in parse_rate("60/minute;10/10 seconds")] == [(60, 60), (10, 10)]
    for bad in ("lots", "0/min", "5/fortnight", "60/min,burst=x"):
        with pytest.raises(ConfigError):
            parse_rate(bad)
    limiter = RateLimiter("2/hour")
    assert [limiter.acquire("k") for _ in range(2)] == [0.0, 0.0]
    assert 3500 < limiter.acquire("k") <= 3600  # the moving window: the first hit expires in an hour
    assert limiter.acquire("other") == 0.0  # buckets are separate


def _parser():
    from steplab.cli import serve

    parser = argparse.ArgumentParser(prog="steplab")
    serve.register(parser.add_subparsers(dest="verb"))
    return parser


def test_cli_serve_refuses_to_run_without_keys(loaded, monkeypatch, tmp_path):
    from steplab.cli.serve import parse_run_spec
    from steplab.errors import ConfigError

    run, _, _ = loaded
    assert parse_run_spec("runs/A:step-1-8k") == ("runs/A", "step-1-8k")
    assert parse_run_spec(str(run)) == (str(run), run.name)
    monkeypatch.delenv("STEPLAB_API_KEYS", raising=False)
    args = _parser().parse_args(["serve", f"{run}:step-1-nano", "--port", "1"])
    with pytest.raises(ConfigError, match="--no-auth"):
        args.func(args)
    args = _parser().parse_args(["serve", f"{run}:a", f"{run}:a", "--no-auth"])
    with pytest.raises(ConfigError, match="two runs"):
        args.func(args)


def test_cli_chat_repl(loaded, capsys):
    from steplab.cli.serve import cmd_chat

    run, _, _ = loaded
    args = _parser().parse_args(["chat", str(run), "--max-tokens", "8", "--temperature", "0"])
    lines = iter(["hello", "/reset", "def f():", "/quit"])
    assert cmd_chat(args, input_fn=lambda prompt: next(lines)) == 0
    out = capsys.readouterr().out
    assert out.count("assistant> ") == 2 and "(conversation cleared)" in out
