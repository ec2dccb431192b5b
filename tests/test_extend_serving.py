"""Long prompts served: a 90%-of-context prompt through the API with chunked prefill and a YaRN-scaled RoPE
gives the same greedy tokens as a full forward, and KV-fit admission sizes the slots to a memory budget."""
from __future__ import annotations

import pytest
import torch

from steplab.config import ModelConfig, RopeConfig
from steplab.data.prepare import load_prepared
from steplab.infer.engine import Engine, EngineError, kv_cache_bytes
from steplab.infer.sampling import SamplingParams, generate
from steplab.models.dense import Step1

pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def long_model(tiny_data):
    tok, _, _, _ = load_prepared(tiny_data)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=64, n_layer=2, n_head=4, n_kv_head=2, max_seq_len=256,
                      rope=RopeConfig(scaling="yarn", factor=4.0, original_max_seq_len=64))
    return Step1(cfg).eval(), tok


def test_kv_budget_sizes_the_slots_and_refuses_what_cannot_fit(long_model):
    model, tok = long_model
    per_slot = kv_cache_bytes(model.cfg, 256)
    assert per_slot == 2 * 2 * 2 * 16 * 256 * 4  # k and v, layers, kv heads, head dim, tokens, fp32
    engine = Engine(model, tok, max_batch=8, kv_budget_bytes=int(2.5 * per_slot))
    assert engine.max_batch == 2 and engine.cache.k.shape[1] == 2
    with pytest.raises(EngineError, match="needs .* MiB but the budget"):
        Engine(model, tok, max_batch=8, kv_budget_bytes=per_slot // 2)


def test_ninety_percent_prompt_served_with_chunked_prefill(long_model):
    from fastapi.testclient import TestClient

    from steplab.serve.app import create_app

    model, tok = long_model
    prompt = torch.randint(10, tok.vocab_size, (int(0.9 * 256),), generator=torch.Generator().manual_seed(1)).tolist()
    want = generate(model, [prompt], SamplingParams(max_new_tokens=8, temperature=0), use_cache=False)[0]
    engine = Engine(model, tok, name="long", max_batch=2, prefill_chunk=64, kv_budget_bytes=2 * kv_cache_bytes(model.cfg, 256))
    with TestClient(create_app({"long": engine}, api_keys=None)) as client:
        resp = client.post("/v1/completions", json={"model": "long", "prompt": prompt, "max_tokens": 8, "temperature": 0,
                                                     "return_token_ids": True})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["usage"]["prompt_tokens"] == len(prompt)
        assert body["choices"][0]["token_ids"] == want  # 4 prefill chunks + cached decode == one full forward
        too_long = client.post("/v1/completions", json={"model": "long", "prompt": prompt + prompt, "max_tokens": 4})
        assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"
    engine.stop()
