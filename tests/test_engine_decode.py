"""The engine's fixed-shape decode step (steplab/infer/decode.py): the same greedy tokens as the eager path, in
place cache writes that leave other slots alone, and the mode's validation in Engine and `steplab serve`."""
from __future__ import annotations

import argparse
import threading

import pytest
import torch

from steplab.config import ModelConfig, MoEConfig, RopeConfig
from steplab.data.prepare import load_prepared
from steplab.infer.decode import DecodeConfig, FixedDecoder, auto_mode, bucket_sizes
from steplab.infer.engine import Engine, Request
from steplab.models.common import KVCache
from steplab.models.dense import Step1
from steplab.models.moe import Step2

# rows of different lengths: 3 slots for 5 requests, so sequences join while others are far along
PROMPTS = [[5, 9, 3], [17] * 11, [4, 8, 15, 16, 23, 42, 7], [100, 200], list(range(30, 52))]
MAX_TOKENS = [20, 9, 25, 14, 6]


@pytest.fixture(scope="module")
def tok(tiny_data):
    return load_prepared(tiny_data)[0]


def tiny_model(vocab: int, seed: int = 0, **kw) -> Step1:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=vocab, d_model=32, n_layer=2, n_head=4, n_kv_head=2, max_seq_len=64)
    return Step1(ModelConfig(**{**cfg, **kw})).eval()


def tiny_moe(vocab: int) -> Step2:
    return Step2(ModelConfig(vocab_size=vocab, d_model=32, n_layer=1, n_head=2, max_seq_len=32,
                             moe=MoEConfig(n_experts=4, top_k=2, d_expert=16))).eval()


def run(model, tok, decode, max_batch=3, n=1) -> list[list[int]]:
    with Engine(model, tok, max_batch=max_batch, decode=decode) as engine:
        handles = [engine.submit(Request(prompt=p, max_tokens=m, temperature=0, n=n)) for p, m in zip(PROMPTS, MAX_TOKENS)]
        out = []
        for h in handles:
            rows = [[] for _ in range(n)]
            for ev in h:
                rows[ev.index] += ev.tokens
            out += rows
    return out


def test_static_step_gives_the_eager_tokens_on_mixed_batches(tok):
    for seed in (0, 1):
        model = tiny_model(tok.vocab_size, seed)
        eager = run(model, tok, "eager")
        assert [len(r) for r in eager] == MAX_TOKENS
        assert len({tuple(r) for r in eager}) == len(eager)  # random weights: distinct continuations, a real check
        assert run(model, tok, DecodeConfig(mode="static", min_bucket=8)) == eager  # buckets 8, 16, 32, 64
        assert run(model, tok, DecodeConfig(mode="static", buckets=False)) == eager
        assert run(model, tok, "static", max_batch=5) == eager
    model = tiny_model(tok.vocab_size, 2)  # n = 2 choices share a prompt copied between slots
    assert run(model, tok, "static", max_batch=4, n=2) == run(model, tok, "eager", max_batch=4, n=2)


def test_fast_modes_prefill_waiting_prompts_together(tok):
    model = tiny_model(tok.vocab_size, 4)
    want = [run_one(model, tok, p, "eager") for p in PROMPTS[:4]]
    shapes = []
    hook = model.register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    gate = threading.Event()
    try:
        with Engine(model, tok, max_batch=4, decode="static") as engine:
            engine.before_step = gate.wait  # the first step waits until every request is queued
            handles = [engine.submit(Request(prompt=p, max_tokens=12, temperature=0)) for p in PROMPTS[:4]]
            gate.set()
            got = [[t for ev in h for t in ev.tokens] for h in handles]
    finally:
        hook.remove()
    assert got == want
    assert any(b >= 2 and t > 1 for b, t in shapes), shapes  # one padded forward for several prompts


def test_static_step_logits_match_the_model_and_leave_other_slots_alone(tok):
    model = tiny_model(tok.vocab_size)
    ref, cache = KVCache(model.cfg, 3, 64), KVCache(model.cfg, 3, 64)
    with torch.no_grad():
        for c in (ref, cache):  # slot 0: 5 tokens, slot 2: 9 tokens, slot 1: a prefill in progress (4 tokens)
            model(torch.tensor([[1, 2, 3, 4, 5]]), cache=c, slots=torch.tensor([0]))
            model(torch.tensor([[9] * 9]), cache=c, slots=torch.tensor([2]))
            model(torch.tensor([[7, 7, 7, 7]]), cache=c, slots=torch.tensor([1]))
        before = cache.k[:, 1].clone(), cache.v[:, 1].clone()
        want = model(torch.tensor([[11], [12]]), cache=ref, slots=torch.tensor([0, 2]))[:, -1]
        got, top = FixedDecoder(model, cache, DecodeConfig(mode="static", min_bucket=4)).step([0, 2], [11, 12])
    torch.testing.assert_close(got[[0, 2]], want, rtol=1e-5, atol=1e-5)
    assert top[[0, 2]].tolist() == want.argmax(-1).tolist()
    assert cache.lengths.tolist() == ref.lengths.tolist() == [6, 4, 10]
    assert torch.equal(cache.k[:, 1], before[0]) and torch.equal(cache.v[:, 1], before[1])  # the inactive row: untouched
    for s in (0, 2):
        n = int(ref.lengths[s])
        torch.testing.assert_close(cache.k[:, s, :, :n], ref.k[:, s, :, :n], rtol=1e-6, atol=1e-6)


def test_compiled_step_gives_the_eager_tokens(tok):
    # one bucket (the whole 32-token context), two slots: one compile of a tiny graph, done at engine start. The
    # engine's default compile mode ("frozen": freezing + max-autotune) spends ~40 s autotuning even this graph; its
    # tokens are checked by bench/decode.py's "same tokens" column (docs/benchmarks.md), plain inductor here.
    model = tiny_model(tok.vocab_size, 3, max_seq_len=32, n_layer=1)
    prompts, want = [[5, 9, 3], [17, 2, 8, 1, 1, 4, 30]], []
    for p in prompts:
        want.append(run_one(model, tok, p, "eager"))
    with Engine(model, tok, max_batch=2, decode=DecodeConfig(mode="compiled", compile_mode="default", min_bucket=32)) as engine:
        assert engine.decoder.warm and engine.decoder.buckets == [32]  # compiled before the first request
        handles = [engine.submit(Request(prompt=p, max_tokens=12, temperature=0)) for p in prompts]
        got = [[t for ev in h for t in ev.tokens] for h in handles]
    assert got == want


def test_each_compiled_decoder_traces_its_own_code(tok):
    # dynamo caches graphs per code object and would hand one decoder's frozen graph (weights as constants) to
    # another of the same shape, or to the same engine after load_weights: each decoder gets its own copy
    model = tiny_model(tok.vocab_size)
    a, b = (Engine(model, tok, decode="compiled").decoder for _ in range(2))  # not started: nothing compiled yet
    assert not a.warm and a._forward.__func__.__code__ is not b._forward.__func__.__code__


def run_one(model, tok, prompt, decode) -> list[int]:
    with Engine(model, tok, max_batch=1, decode=decode) as engine:
        return engine.generate(Request(prompt=prompt, max_tokens=12, temperature=0))[0].tokens


def test_modes_are_validated_and_auto_picks_per_model(tok):
    dense = tiny_model(tok.vocab_size)
    assert bucket_sizes(64, 8) == [8, 16, 32, 64] and bucket_sizes(80, 64) == [64, 80] and bucket_sizes(80, 64, False) == [80]
    with pytest.raises(ValueError, match="not one of eager, static, compiled"):
        Engine(dense, tok, decode="fast")
    moe = tiny_moe(tok.vocab_size)
    with pytest.raises(ValueError, match="not the dense Step-1 decoder.*decode='eager'"):
        Engine(moe, tok, decode="static")
    dynamic = tiny_model(tok.vocab_size, rope=RopeConfig(scaling="dynamic", factor=2.0))
    with pytest.raises(ValueError, match="dynamic-NTK"):
        Engine(dynamic, tok, decode="compiled")
    assert (auto_mode(dense), auto_mode(moe), auto_mode(dynamic)) == ("compiled", "eager", "eager")
    assert Engine(dense, tok).decode == "eager" and Engine(dense, tok).decoder is None  # the default


def test_serve_decode_flag(tok, capsys):
    from steplab.cli import serve
    from steplab.serve.app import load_engine

    parser = argparse.ArgumentParser(prog="steplab")
    serve.register(parser.add_subparsers(dest="verb"))
    assert parser.parse_args(["serve", "runs/a", "--no-auth"]).decode == "auto"
    assert parser.parse_args(["serve", "runs/a", "--decode", "static"]).decode == "static"
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "runs/a", "--decode", "fast"])
    assert "invalid choice: 'fast'" in capsys.readouterr().err
    dense = tiny_model(tok.vocab_size)
    assert load_engine("m", (dense, tok), decode="static").decode == "static"
    moe = tiny_moe(tok.vocab_size)
    assert load_engine("m", (moe, tok), decode="auto").decode == "eager"
