"""Step-1 model: parity with transformers' Llama, KV cache, accounting, sampling."""
from __future__ import annotations

import pytest
import torch

from steplab.config import ModelConfig
from steplab.export.hf import from_hf_state_dict, llama_config_dict, to_hf_state_dict
from steplab.infer.sampling import SamplingParams, filter_logits, generate
from steplab.models.common import KVCache
from steplab.models import count_params, flops_per_token
from steplab.models.dense import Step1


def small_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=300, d_model=64, n_layer=3, n_head=4, n_kv_head=2, max_seq_len=96, rope_base=5000.0)
    base.update(kw)
    return ModelConfig(**base)


def hf_llama(cfg: ModelConfig):
    transformers = pytest.importorskip("transformers")
    fields = {k: v for k, v in llama_config_dict(cfg).items() if k not in ("architectures", "model_type")}
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields)).eval()


@pytest.mark.parametrize("tie,kv", [(False, 2), (True, 4)])
def test_logits_match_transformers_llama(tie, kv):
    torch.manual_seed(0)
    cfg = small_cfg(tie_embeddings=tie, n_kv_head=kv)
    ours = Step1(cfg).eval()
    # Perturb norms so the test also covers their weights (they start at 1).
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    hf = hf_llama(cfg)
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(ours.state_dict(), cfg), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied: HF ties lm_head to the embedding
    idx = torch.randint(0, cfg.vocab_size, (3, 50))
    with torch.no_grad():
        diff = (ours(idx) - hf(idx).logits).abs().max().item()
    assert diff < 1e-4, diff
    # And back: HF -> ours is the identity on our weights.
    back = from_hf_state_dict(to_hf_state_dict(ours.state_dict(), cfg), cfg)
    for k, v in ours.state_dict().items():
        assert torch.equal(back[k], v), k


def test_kv_cache_logits_and_greedy_match_recompute():
    torch.manual_seed(1)
    cfg = small_cfg()
    model = Step1(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 40))
    with torch.no_grad():
        full = model(idx)
        cache = KVCache(cfg, 2, 64)
        pieces = [model(idx[:, :25], cache=cache)]
        for t in range(25, 40):
            pieces.append(model(idx[:, t:t + 1], cache=cache))
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5)
    assert cache.lengths.tolist() == [40, 40]
    prompts = [[1, 5, 9, 200], [1, 7]]  # different lengths: each prefilled into its own slot
    params = SamplingParams(max_new_tokens=30, temperature=0)
    assert generate(model, prompts, params, use_cache=True) == generate(model, prompts, params, use_cache=False)


def test_sampling_is_seeded_and_filters():
    torch.manual_seed(2)
    model = Step1(small_cfg()).eval()
    params = SamplingParams(max_new_tokens=20, temperature=1.0, top_k=20, top_p=0.9, seed=123)
    a = generate(model, [[1, 2, 3]], params)
    assert a == generate(model, [[1, 2, 3]], params)
    assert a != generate(model, [[1, 2, 3]], SamplingParams(max_new_tokens=20, temperature=1.0, seed=124))
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[True, True, False, False]]
    # probs ~ [.03, .09, .24, .64]: top_p 0.7 keeps the two largest
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[True, True, False, False]]


def test_stop_token_ends_generation():
    torch.manual_seed(3)
    model = Step1(small_cfg()).eval()
    first = generate(model, [[1, 2]], SamplingParams(max_new_tokens=5, temperature=0))[0]
    out = generate(model, [[1, 2]], SamplingParams(max_new_tokens=5, temperature=0), stop_ids={first[1]})[0]
    assert out == first[:2]


def test_step_law_parameter_count():
    # references.md: h=960, d_ff=9368, L=7 gives N = 214,663,680 in the Step Law data.
    cfg = ModelConfig(vocab_size=65536, d_model=960, n_layer=7, n_head=15, d_ff=9368)
    assert count_params(cfg)["N"] == 214_663_680
    cfg = small_cfg()
    counted = count_params(cfg)
    assert counted["total"] == sum(p.numel() for p in Step1(cfg).parameters())
    # GQA: k/v projections are n_kv_head * head_dim wide, fewer than 4 d^2 per layer.
    assert counted["N"] == 3 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * cfg.d_ff)
    f = flops_per_token(cfg, 64)
    assert f["6N"] == 6 * counted["N"] and f["model"] > f["6N"]


def test_context_overflow_is_an_error():
    model = Step1(small_cfg(max_seq_len=16)).eval()
    with pytest.raises(ValueError, match="exceeds"):
        generate(model, [[1] * 10], SamplingParams(max_new_tokens=10, temperature=0))


def test_temperatures_too_small_for_float32_sample_greedily():
    # found by the API fuzzer: temperature 5e-324 became 0.0 in float32 and the softmax NaN (500 from the server)
    from steplab.infer.sampling import SamplingParams, sample_next

    logits = torch.tensor([[1.0, 3.0, 2.0], [0.5, -1.0, 0.2]])
    for t in (5e-324, 1e-40, 1e-30):
        assert sample_next(logits, SamplingParams(temperature=t), torch.Generator().manual_seed(0)).tolist() == [1, 0]
