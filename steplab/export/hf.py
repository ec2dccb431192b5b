"""State-dict adapter between steplab's Step-1 and Hugging Face's Llama (torchtitan's pattern).

Our model fuses q/k/v into ``wqkv`` and gate/up into ``w13``; Llama keeps them apart. Both use the
rotate-half RoPE layout, so the split is a plain slice with no permutation.
"""
from __future__ import annotations

import torch

from steplab.config import ModelConfig


def llama_config_dict(cfg: ModelConfig) -> dict:
    """The ``config.json`` fields of an equivalent ``LlamaConfig``."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_base,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
        "initializer_range": cfg.init_std,
    }


def to_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    q_dim, kv_dim = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    out = {"model.embed_tokens.weight": state["tok_emb.weight"], "model.norm.weight": state["norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    for i in range(cfg.n_layer):
        ours, hf = f"layers.{i}.", f"model.layers.{i}."
        q, k, v = state[ours + "attn.wqkv.weight"].split([q_dim, kv_dim, kv_dim], dim=0)
        gate, up = state[ours + "ffn.w13.weight"].split(cfg.d_ff, dim=0)
        out.update({
            hf + "input_layernorm.weight": state[ours + "attn_norm.weight"],
            hf + "self_attn.q_proj.weight": q,
            hf + "self_attn.k_proj.weight": k,
            hf + "self_attn.v_proj.weight": v,
            hf + "self_attn.o_proj.weight": state[ours + "attn.wo.weight"],
            hf + "post_attention_layernorm.weight": state[ours + "ffn_norm.weight"],
            hf + "mlp.gate_proj.weight": gate,
            hf + "mlp.up_proj.weight": up,
            hf + "mlp.down_proj.weight": state[ours + "ffn.w2.weight"],
        })
    return {k: v.contiguous() for k, v in out.items()}


def from_hf_state_dict(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = {"tok_emb.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"]}
    out["lm_head.weight"] = hf["model.embed_tokens.weight"] if cfg.tie_embeddings else hf["lm_head.weight"]
    for i in range(cfg.n_layer):
        ours, h = f"layers.{i}.", f"model.layers.{i}."
        out.update({
            ours + "attn_norm.weight": hf[h + "input_layernorm.weight"],
            ours + "attn.wqkv.weight": torch.cat([hf[h + f"self_attn.{p}_proj.weight"] for p in "qkv"], dim=0),
            ours + "attn.wo.weight": hf[h + "self_attn.o_proj.weight"],
            ours + "ffn_norm.weight": hf[h + "post_attention_layernorm.weight"],
            ours + "ffn.w13.weight": torch.cat([hf[h + "mlp.gate_proj.weight"], hf[h + "mlp.up_proj.weight"]], dim=0),
            ours + "ffn.w2.weight": hf[h + "mlp.down_proj.weight"],
        })
    return out
