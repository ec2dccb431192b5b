"""Step-2 MoE: grouped dispatch vs a per-token reference, dropless top-k, bias balancing, training, resume, KV cache."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

import steplab.models.moe as moe_mod
from steplab.config import ModelConfig, preset, resolve
from steplab.errors import ConfigError
from steplab.infer.sampling import SamplingParams, generate
from steplab.models import build_model, count_params, flops_per_token
from steplab.models.common import KVCache
from steplab.models.moe import MoE, Step2, sort_by_expert
from steplab.train.checkpoint import load_run
from steplab.train.metrics import read_jsonl
from steplab.train.trainer import train


def moe_cfg(**moe) -> ModelConfig:
    cfg = ModelConfig(vocab_size=300, d_model=32, n_layer=3, n_head=4, max_seq_len=96)
    for k, v in dict(n_experts=6, top_k=2, n_shared=1, d_expert=24).items():
        setattr(cfg.moe, k, v)
    for k, v in moe.items():
        setattr(cfg.moe, k, v)
    return cfg


def naive_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Reference: loop over tokens; each goes through its k experts one by one, weighted by its gates."""
    flat = x.reshape(-1, x.shape[-1])
    expert_idx, gates, _, _ = moe.route(flat)
    rows = []
    for t in range(flat.shape[0]):
        y = moe.shared(flat[t]) if moe.shared is not None else torch.zeros_like(flat[t])
        for j in range(moe.top_k):
            e = int(expert_idx[t, j])
            gate, up = (flat[t] @ moe.w13.weight[e]).chunk(2)
            y = y + gates[t, j] * ((F.silu(gate) * up) @ moe.w2.weight[e])
        rows.append(y)
    return torch.stack(rows).view_as(x)


@pytest.mark.parametrize("path", ["grouped_mm", "loop"])
@pytest.mark.parametrize("score,top_k", [("softmax", 2), ("sigmoid", 3), ("sigmoid", 1)])
def test_grouped_dispatch_matches_per_token_reference(monkeypatch, path, score, top_k):
    if path == "loop":
        monkeypatch.setattr(moe_mod, "grouped_mm_works", lambda device_type, dtype: False)
    elif not moe_mod.grouped_mm_works("cpu", torch.float32):
        pytest.skip("torch._grouped_mm is not available on CPU in this build")
    torch.manual_seed(0)
    moe = MoE(moe_cfg(score=score, top_k=top_k))
    for p in moe.parameters():
        torch.nn.init.normal_(p, 0.0, 0.3)
    moe.expert_bias.copy_(torch.tensor([0.0, 0.1, -0.1, 0.05, -10.0, -10.0]))  # experts 4, 5: empty groups
    x = torch.randn(2, 9, 32)
    grads = []
    for fn in (moe, lambda v: naive_moe(moe, v)):
        moe.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        y = fn(xi)
        y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
        grads.append((y.detach(), xi.grad, {n: p.grad.clone() for n, p in moe.named_parameters()}))
    (y1, gx1, gp1), (y2, gx2, gp2) = grads
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx1, gx2, rtol=1e-5, atol=1e-5)
    assert set(gp1) == set(gp2) and gp1["router.weight"].abs().sum() > 0
    for name in gp1:
        torch.testing.assert_close(gp1[name], gp2[name], rtol=1e-5, atol=1e-5, msg=name)
    assert gp1["w13.weight"][4:].abs().sum() == 0  # never-chosen experts get no gradient


@pytest.mark.parametrize("d_expert", [24, 42])  # 42: rows of 84 bytes, which _grouped_mm refuses (16-byte strides)
def test_bf16_autocast_close_to_fp32(d_expert):
    torch.manual_seed(0)
    moe = MoE(moe_cfg(d_expert=d_expert))
    for p in moe.parameters():
        torch.nn.init.normal_(p, 0.0, 0.3)
    x = torch.randn(2, 16, 32)
    ref = moe(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = moe(x)
    assert y.dtype == torch.bfloat16
    assert (y.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_every_token_reaches_exactly_k_distinct_experts():
    torch.manual_seed(0)
    T, k, E = 50, 3, 7
    expert_idx = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    order, token_of, counts = sort_by_expert(expert_idx, E)
    experts_sorted = expert_idx.reshape(-1)[order]
    assert torch.all(experts_sorted[1:] >= experts_sorted[:-1])  # contiguous groups
    assert torch.equal(torch.bincount(token_of, minlength=T), torch.full((T,), k))
    assert len(set(zip(token_of.tolist(), experts_sorted.tolist()))) == T * k
    assert torch.equal(counts, torch.bincount(expert_idx.reshape(-1), minlength=E)) and counts.sum() == T * k

    # Functionally: with all routed experts identical and gates summing to 1, every token gets exactly one
    # expert's worth of output -- a dropped or doubled token would show.
    moe = MoE(moe_cfg(n_shared=0, top_k=k, n_experts=E, score="sigmoid"))
    torch.nn.init.normal_(moe.router.weight, 0.0, 1.0)
    with torch.no_grad():
        moe.w13.weight.copy_(torch.randn(1, 32, 48).expand(E, -1, -1))
        moe.w2.weight.copy_(torch.randn(1, 24, 32).expand(E, -1, -1))
    x = torch.randn(4, 25, 32)
    moe.train()
    y = moe(x)
    gate, up = (x @ moe.w13.weight[0]).chunk(2, dim=-1)
    torch.testing.assert_close(y, (F.silu(gate) * up) @ moe.w2.weight[0], rtol=1e-5, atol=1e-5)
    assert int(moe.load.sum()) == 4 * 25 * k


def test_bias_selects_but_does_not_weight():
    torch.manual_seed(0)
    moe = MoE(moe_cfg(score="sigmoid"))
    moe.expert_bias.copy_(torch.tensor([5.0, 5.0, 0.0, 0.0, 0.0, 0.0]))
    expert_idx, gates, scores, _ = moe.route(torch.randn(20, 32))
    assert sorted(set(expert_idx.reshape(-1).tolist())) == [0, 1]
    picked = scores.gather(-1, expert_idx)
    torch.testing.assert_close(gates, picked / picked.sum(-1, keepdim=True))


@pytest.mark.parametrize("score,rate,steps", [("sigmoid", 5e-3, 150), ("softmax", 2e-2, 300)])
def test_bias_update_balances_a_skewed_router(score, rate, steps):
    """Expert 0 starts with every token; the aux-loss-free bias alone (router frozen) must balance the load."""
    torch.manual_seed(0)
    cfg = moe_cfg(n_experts=8, top_k=2, n_shared=0, d_expert=16, score=score, bias_update_rate=rate)
    moe = MoE(cfg).train()
    with torch.no_grad():
        moe.router.weight.copy_(torch.randn(8, 32) / 32 ** 0.5)
        moe.router.weight[0] += (1.0 if score == "sigmoid" else 0.5) * torch.ones(32) / 32 ** 0.5
    g = torch.Generator().manual_seed(1)
    history = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # hundreds of tiny steps: thread wake-ups would dominate on a busy machine
    try:
        with torch.no_grad():
            for _ in range(steps):
                moe(torch.randn(16, 128, 32, generator=g) + 1.0)  # inputs share a mean direction expert 0 likes
                history.append(moe.update_bias())
    finally:
        torch.set_num_threads(threads)
    assert history[0]["load_max_mean"] > 2.5  # deliberately skewed: expert 0 takes (nearly) every token
    tail = [h["load_max_mean"] for h in history[-50:]]
    assert max(tail) <= 1.2, tail
    assert history[-1]["entropy"] > 0.99 and abs(float(moe.expert_bias.sum())) < 1e-4  # centred
    assert int(moe.load.sum()) == 0  # counts reset after each update


def test_accounting_and_presets():
    cfg = moe_cfg(first_dense=1, every=1)
    model = Step2(cfg)
    c = count_params(cfg)
    assert c["total"] == sum(p.numel() for p in model.parameters())
    d, de, E = 32, 24, 6
    attn = 4 * d * d
    assert c["N"] == 3 * attn + 3 * d * cfg.d_ff + 2 * ((E + 1) * 3 * d * de + d * E)
    assert c["N_active"] == 3 * attn + 3 * d * cfg.d_ff + 2 * ((2 + 1) * 3 * d * de + d * E)
    assert flops_per_token(cfg, 64)["6N"] == 6 * c["N_active"]
    assert [i for i, _ in model.moe_layers()] == [1, 2]
    assert "layers.1.ffn.expert_bias" in model.state_dict()  # persistent: checkpoints carry it
    assert "layers.1.ffn.load" not in model.state_dict()
    for size in ("nano", "micro", "mini"):
        dense, sparse = preset(f"step1-{size}").model, preset(f"step2-{size}").model
        dense.vocab_size = sparse.vocab_size = 4096
        ratio = count_params(sparse)["N_active"] / count_params(dense)["N"]
        assert 0.99 < ratio < 1.01, (size, ratio)
        assert count_params(sparse)["N"] > 2 * count_params(dense)["N"]
    with pytest.raises(ConfigError, match="top_k"):
        Step2(moe_cfg(top_k=7))
    with pytest.raises(ConfigError, match="no MoE layer"):
        Step2(moe_cfg(first_dense=3))


def test_kv_cached_greedy_generation_matches_uncached():
    torch.manual_seed(1)
    cfg = moe_cfg(score="sigmoid")
    cfg.n_kv_head = 2
    model = build_model(cfg).eval()
    assert isinstance(model, Step2)
    for _, moe in model.moe_layers():
        moe.expert_bias.normal_(0.0, 0.05)
    idx = torch.randint(0, cfg.vocab_size, (2, 40))
    with torch.no_grad():
        full = model(idx)
        cache = KVCache(cfg, 2, 64)
        pieces = [model(idx[:, :25], cache=cache)] + [model(idx[:, t:t + 1], cache=cache) for t in range(25, 40)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)
    prompts = [[1, 5, 9, 200], [1, 7]]
    params = SamplingParams(max_new_tokens=30, temperature=0)
    assert generate(model, prompts, params, use_cache=True) == generate(model, prompts, params, use_cache=False)


# ---- end to end through the trainer ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    from steplab.data.prepare import prepare_data

    rng = random.Random(0)
    words = ["the", "expert", "router", "token", "scaling", "law", "sparse", "dense", "load", "balance", "bias", "step"]
    src = tmp_path_factory.mktemp("moe_src")
    for i in range(60):
        (src / f"doc_{i:03d}.txt").write_text(" ".join(rng.choice(words) for _ in range(300)) + "\n")
    out = tmp_path_factory.mktemp("moe_data") / "data"
    prepare_data(source=str(src), out_dir=out, vocab_size=300, progress=False)
    return out


def moe_run_cfg(data, steps: int, **extra):
    base = {
        "data.path": str(data), "data.seq_len": 32, "model.max_seq_len": 64, "model.d_model": 64, "model.n_layer": 3,
        "model.n_head": 4, "model.moe.n_experts": 4, "model.moe.top_k": 2, "model.moe.n_shared": 1,
        "model.moe.d_expert": 64, "model.moe.first_dense": 1, "model.moe.score": "sigmoid",
        "model.moe.bias_update_rate": 1e-2, "model.moe.aux_loss_coef": 1e-3, "model.moe.z_loss_coef": 1e-4,
        "train.batch_size": 4, "train.max_steps": steps, "train.warmup_steps": 2, "train.eval_every": 1000,
        "train.eval_batches": 2, "train.ckpt_every": 4, "train.lr": 3e-3, "train.keep_last": 10,
        "train.schedule": "constant",  # a 4-step run is then a prefix of the 8-step run (cosine depends on max_steps)
    }
    base.update(extra)
    return resolve(overrides=[f"{k}={v}" for k, v in base.items()])


def test_step2_trains_and_logs_router_stats(text_data, tmp_path):
    summary = train(moe_run_cfg(text_data, 30), tmp_path / "run", progress=False)
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    loss = [r["loss"] for r in records]
    assert len(loss) == 30 and sum(loss[-5:]) / 5 < sum(loss[:5]) / 5 - 0.5
    for i in (1, 2):  # layer 0 is dense (first_dense=1)
        for stat in ("load_max_mean", "entropy", "bias_norm"):
            assert f"moe{i}_{stat}" in records[-1]
    assert not any(k.startswith("moe0_") for k in records[-1])
    assert records[-1]["moe1_load_max_mean"] >= 1.0 and 0 < records[-1]["moe1_entropy"] <= 1.0
    assert records[-1]["moe1_bias_norm"] > 0
    assert summary["N_active"] < summary["N"]
    _, model, _, _ = load_run(tmp_path / "run")
    assert isinstance(model, Step2) and model.layers[1].ffn.expert_bias.abs().sum() > 0


def test_step2_exact_resume(text_data, tmp_path):
    train(moe_run_cfg(text_data, 8), tmp_path / "full", progress=False)
    train(moe_run_cfg(text_data, 4), tmp_path / "part", progress=False)
    (tmp_path / "part" / "config.json").unlink()  # max_steps differs; everything else is the same run
    train(moe_run_cfg(text_data, 8), tmp_path / "part", resume=True, progress=False)
    full, part = read_jsonl(tmp_path / "full" / "metrics.jsonl"), read_jsonl(tmp_path / "part" / "metrics.jsonl")
    assert [r["loss"] for r in part] == [r["loss"] for r in full]
    assert [r["moe2_bias_norm"] for r in part] == [r["moe2_bias_norm"] for r in full]
    _, a, _, _ = load_run(tmp_path / "full")
    _, b, _, _ = load_run(tmp_path / "part")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


def test_grouped_mm_probe_works_when_first_called_without_grad():
    """The probe is cached per process; a server or an eval makes its first MoE forward under inference_mode,
    and a probe that needs autograd must not conclude "unsupported" there (it did: serving fell back to the
    slice loop for the whole process)."""
    import subprocess
    import sys

    code = ("import torch, steplab.models.moe as m\n"
            "with torch.inference_mode():\n    a = m.grouped_mm_works('cpu', torch.float32)\n"
            "print(a, hasattr(torch, '_grouped_mm'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    if out[1] == "False":
        pytest.skip("this torch build has no torch._grouped_mm")
    assert out[0] == "True"
