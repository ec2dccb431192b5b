"""Step-1V through /v1/chat/completions (issue 19): OpenAI image parts, their limits, answers equal to the eval's."""
from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from serve_fixtures import Server
from steplab.config import preset
from steplab.data import images as I
from steplab.data.tokenizer import Tokenizer
from steplab.eval.vqa import answer
from steplab.infer.engine import Engine
from steplab.models.vision import Step1V
from steplab.serve.app import create_app
from steplab.tasks import vqa

KEY = "sk-vision-test"
HEADERS = {"Authorization": f"Bearer {KEY}"}


def png(pixels: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def user(text: str, *urls: str) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls] + [{"type": "text", "text": text}]
    return [{"role": "user", "content": parts}]


@pytest.fixture(scope="module")
def served():
    torch.manual_seed(0)
    tok = Tokenizer.load(I.build_tokenizer())
    cfg = preset("step1v-nano").model
    cfg.vocab_size = tok.vocab_size
    cfg.d_model, cfg.n_layer, cfg.d_ff, cfg.vision.n_layer = 64, 2, 128, 1
    model = Step1V(cfg).eval()
    app = create_app({"step-1v": (model, tok)}, api_keys={KEY}, max_request_bytes=50_000, auth_failure_limit=None)
    with Server(app) as srv:
        yield srv, model, tok


def chat(srv, messages, **kw):
    body = {"model": "step-1v", "messages": messages, "temperature": 0, "max_tokens": 12, **kw}
    return httpx.post(srv.url + "/v1/chat/completions", json=body, headers=HEADERS, timeout=60)


def test_api_answers_equal_the_eval_answers(served):
    srv, model, tok = served
    samples = I.held_out_samples(6, "vqa", seed=1)
    pixels = [I.draw(s.image) for s in samples]
    with Engine(model, tok, max_batch=4) as engine:
        expected = answer(engine, tok, samples, pixels, model.cfg.vision.n_tokens, model.cfg.vision.image_place)
    for s, p, want in zip(samples, pixels, expected):
        r = chat(srv, user(s.prompt, png(p)), max_tokens=32)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == want
    # the image matters: the same question with another image, and without one, is not the same request
    r1 = chat(srv, user(samples[0].prompt, png(pixels[0])), logprobs=True, top_logprobs=1, max_tokens=1)
    r2 = chat(srv, user(samples[0].prompt, png(I.draw(("scene", 20)))), logprobs=True, top_logprobs=1, max_tokens=1)
    lp = lambda r: r.json()["choices"][0]["logprobs"]["content"][0]["logprob"]  # noqa: E731
    assert lp(r1) != lp(r2)


def _error(r, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    if code:
        assert err["code"] == code, err
    return err


def test_bad_images_are_openai_400s(served):
    srv, model, tok = served
    good = png(I.draw(("scene", 10)))
    err = _error(chat(srv, user("hi", "data:image/png;base64,@@@not-base64@@@")), 400, "invalid_image")
    assert err["param"] == "messages[0].content[0]" and "base64" in err["message"]
    err = _error(chat(srv, user("hi", "data:image/png;base64," + base64.b64encode(b"just some text").decode())), 400, "invalid_image")
    assert "not a PNG or JPEG" in err["message"]
    _error(chat(srv, user("hi", "https://example.com/cat.png")), 400, "remote_image_refused")
    _error(chat(srv, user("hi", "file:///etc/passwd")), 400, "invalid_image")
    _error(chat(srv, user("hi", *[good] * 5)), 400, "too_many_images")
    # a decompression bomb: 5000 x 4000 one-bit pixels compress to a few KB; refused from the header
    buf = io.BytesIO()
    Image.new("1", (5000, 4000)).save(buf, format="PNG")
    assert len(buf.getvalue()) < 50_000
    bomb = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    err = _error(chat(srv, user("hi", bomb)), 400, "image_too_large")
    assert "5000x4000" in err["message"]
    truncated = base64.b64decode(good.split(",")[1])[:60]
    _error(chat(srv, user("hi", "data:image/png;base64," + base64.b64encode(truncated).decode())), 400)
    err = _error(chat(srv, [{"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": good}}]},
                            {"role": "user", "content": "hi"}]), 400)
    assert "user messages only" in err["message"]
    _error(chat(srv, [{"role": "user", "content": [{"type": "video", "video": "x"}]}]), 400)


def test_jpeg_and_other_sizes_are_resized(served):
    srv, model, tok = served
    buf = io.BytesIO()
    Image.fromarray(np.kron(I.draw(("scene", 30)), np.ones((2, 2, 1), dtype=np.uint8))).save(buf, format="JPEG")
    url = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    r = chat(srv, user("what shape is the red object?", url))
    assert r.status_code == 200, r.text


def test_request_size_limit_is_per_route(served):
    srv, model, tok = served
    noisy = np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    big = png(np.asarray(Image.fromarray(noisy).resize((160, 160))))  # ~75 KB: over the text routes' 50 KB
    assert len(big) > 50_000
    assert chat(srv, user("describe the image.", big)).status_code == 200
    r = httpx.post(srv.url + "/v1/completions", json={"model": "step-1v", "prompt": "x" * 60_000}, headers=HEADERS)
    _error(r, 413, "request_too_large")


def test_text_model_refuses_images(served):
    from steplab.models.dense import Step1

    _, vision_model, tok = served
    text_model = Step1(preset("step1-nano").model.__class__(vocab_size=tok.vocab_size, d_model=64, n_layer=1, n_head=2)).eval()
    app = create_app({"text": (text_model, tok)}, api_keys={KEY}, max_request_bytes=50_000, auth_failure_limit=None)
    with Server(app) as srv:
        body = {"model": "text", "messages": user("hi", png(I.draw(("scene", 10)))), "max_tokens": 2}
        r = httpx.post(srv.url + "/v1/chat/completions", json=body, headers=HEADERS, timeout=60)
        _error(r, 400, "images_not_supported")
        body["messages"] = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
        assert httpx.post(srv.url + "/v1/chat/completions", json=body, headers=HEADERS, timeout=60).status_code == 200


def test_eval_answer_order_matches_samples():
    assert vqa.grade(vqa.Sample(("scene", 0), "q", "red", "colour"), " red ")
