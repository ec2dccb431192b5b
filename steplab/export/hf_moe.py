"""State-dict adapter from Step-2 (MoE) to Hugging Face's GLM-4-MoE (``Glm4MoeForCausalLM``).

Why GLM-4-MoE: of the stock MoE architectures in transformers it is the one that matches Step-2 exactly —
Llama attention (GQA, rotate-half RoPE, no biases, full rotary with ``partial_rotary_factor=1``), sigmoid
router scores with a per-expert ``e_score_correction_bias`` used for *selection only* (DeepSeek-V3's
aux-loss-free balancing, our ``expert_bias``), gates renormalised over the chosen experts, ungated shared
experts, and dense first layers (``first_k_dense_replace``). Group-limited routing is switched off with
``n_group = topk_group = 1``.

The gaps, refused with a clear error rather than exported approximately:
- softmax router scores (``moe.score="softmax"``): GLM-4-MoE only has sigmoid scores; Qwen3-MoE/Mixtral have
  softmax but no selection bias and no shared expert, so no stock model computes the same function;
- MoE only every n-th layer (``moe.every > 1``): GLM-4-MoE makes every layer after the first k MoE.
"""
from __future__ import annotations

import torch

from steplab.config import ModelConfig
from steplab.errors import CheckpointError
from steplab.export.hf import llama_config_dict, to_hf_state_dict


def check_exportable(cfg: ModelConfig) -> None:
    m = cfg.moe
    if m.score != "sigmoid":
        raise CheckpointError("MoE export needs model.moe.score=sigmoid: the matching stock architecture (GLM-4-MoE) "
                              "routes with sigmoid scores; no transformers model has softmax scores with a selection bias")
    if m.every != 1:
        raise CheckpointError(f"MoE export needs model.moe.every=1 (got {m.every}): GLM-4-MoE makes every layer after "
                              f"the first {m.first_dense} an MoE layer")
    if m.n_experts < 2:
        raise CheckpointError("MoE export needs at least 2 routed experts")


def glm4_moe_config(cfg: ModelConfig) -> dict:
    m = cfg.moe
    config = llama_config_dict(cfg)
    config.pop("rope_theta")
    if config.get("rope_scaling"):  # transformers prefers rope_scaling when present: it must say the same
        config["rope_scaling"] = dict(config["rope_scaling"], partial_rotary_factor=1.0)
    config.update({
        "architectures": ["Glm4MoeForCausalLM"],
        "model_type": "glm4_moe",
        "rope_parameters": dict(config["rope_parameters"], partial_rotary_factor=1.0),
        "moe_intermediate_size": m.d_expert or cfg.d_ff,
        "n_routed_experts": m.n_experts,
        "num_experts_per_tok": m.top_k,
        "n_shared_experts": m.n_shared,
        "first_k_dense_replace": m.first_dense,
        "norm_topk_prob": m.top_k > 1,  # Step-2 renormalises the gates only when it picks more than one expert
        "routed_scaling_factor": 1.0,
        "n_group": 1,
        "topk_group": 1,
        "use_qk_norm": False,
        "num_nextn_predict_layers": 0,
    })
    return config


def export_config_and_weights(model: torch.nn.Module, cfg: ModelConfig) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json dict, HF state dict) for a Step-2 model, in the per-expert layout save_pretrained writes."""
    check_exportable(cfg)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    de = cfg.moe.d_expert or cfg.d_ff
    # Attention, norms, embedding and the dense layers map exactly as for Llama; take those keys from the
    # dense adapter by giving it placeholder FFN weights for the MoE layers, then replace their FFN keys.
    moe_layers = {i for i in range(cfg.n_layer) if f"layers.{i}.ffn.router.weight" in state}
    dense_view = dict(state)
    for i in moe_layers:
        dense_view[f"layers.{i}.ffn.w13.weight"] = torch.empty(2 * cfg.d_ff, cfg.d_model)
        dense_view[f"layers.{i}.ffn.w2.weight"] = torch.empty(cfg.d_model, cfg.d_ff)
    out = to_hf_state_dict(dense_view, cfg)
    for i in moe_layers:
        ours, hf = f"layers.{i}.ffn.", f"model.layers.{i}.mlp."
        for name in ("gate_proj", "up_proj", "down_proj"):
            out.pop(hf + f"{name}.weight")
        out[hf + "gate.weight"] = state[ours + "router.weight"].float()
        out[hf + "gate.e_score_correction_bias"] = state[ours + "expert_bias"].float()
        w13, w2 = state[ours + "w13.weight"], state[ours + "w2.weight"]  # (E, d, 2 de), (E, de, d)
        for e in range(cfg.moe.n_experts):
            out[hf + f"experts.{e}.gate_proj.weight"] = w13[e, :, :de].t().contiguous()
            out[hf + f"experts.{e}.up_proj.weight"] = w13[e, :, de:].t().contiguous()
            out[hf + f"experts.{e}.down_proj.weight"] = w2[e].t().contiguous()
        if cfg.moe.n_shared:
            gate, up = state[ours + "shared.w13.weight"].chunk(2, dim=0)
            out[hf + "shared_experts.gate_proj.weight"] = gate.contiguous()
            out[hf + "shared_experts.up_proj.weight"] = up.contiguous()
            out[hf + "shared_experts.down_proj.weight"] = state[ours + "shared.w2.weight"]
    return glm4_moe_config(cfg), out
