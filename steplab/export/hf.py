"""State-dict adapter between steplab's Step-1 and Hugging Face's Llama (torchtitan's pattern).

Our model fuses q/k/v into ``wqkv`` and gate/up into ``w13``; Llama keeps them apart. Both use the
rotate-half RoPE layout, so the split is a plain slice with no permutation.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from steplab.config import ModelConfig
from steplab.data.chat import stop_ids, template_format
from steplab.errors import CheckpointError, StepLabError
from steplab.utils import atomic_dir
from steplab.models.rope import hf_rope_fields, rope_from_hf


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
        "rms_norm_eps": cfg.norm_eps,
        **hf_rope_fields(cfg),  # rope_theta, rope_parameters, rope_scaling, max_position_embeddings
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


# ---- directories ------------------------------------------------------------------------------------------

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def building(out: Path):
    """A temporary directory renamed onto ``out`` when the export succeeds (``steplab.utils.atomic_dir``)."""
    return atomic_dir(out, CheckpointError)


def export_hf(run_dir, out_dir, *, checkpoint=None) -> Path:
    """Write a Hugging Face directory (config.json, model.safetensors, tokenizer, generation_config.json).

    Built in a temporary directory beside ``out_dir`` and renamed into place, so a failure leaves nothing
    half-written; an existing ``out_dir`` is refused rather than overwritten.
    """
    from steplab.train.checkpoint import load_run

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"target {out} exists and is not empty; choose another directory")
    cfg, model, tokenizer, step = load_run(run_dir, checkpoint=checkpoint)
    if cfg.model.moe.n_experts > 0:
        from steplab.export.hf_moe import export_config_and_weights
        config, weights = export_config_and_weights(model, cfg.model)
    else:
        config, weights = llama_config_dict(cfg.model), to_hf_state_dict(model.state_dict(), cfg.model)
    config.update({"torch_dtype": "float32", "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
                   "pad_token_id": tokenizer.pad_id, "steplab_step": step})
    with building(out) as tmp:
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        # generate() (and vLLM) stop at any of these: a chat reply ends at <|end|>, a document at <|eos|>
        generation = {"bos_token_id": tokenizer.bos_id, "eos_token_id": sorted(stop_ids(tokenizer)), "pad_token_id": tokenizer.pad_id,
                      "do_sample": False, "max_length": cfg.model.max_seq_len}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
        for name in TOKENIZER_FILES:
            if (Path(run_dir) / "tokenizer" / name).exists():  # a foreign tokenizer may have no special_tokens_map
                shutil.copy(Path(run_dir) / "tokenizer" / name, tmp / name)
        add_bos_by_default(tmp, tokenizer.bos_id)
    return out


def add_bos_by_default(tok_dir: Path, bos_id: int) -> None:
    """Make the exported tokenizer's default call prepend BOS, as every training document and ``steplab sample``
    do (and as Llama's tokenizers do): ``AutoTokenizer(...)(text)`` then gives the ids the model was trained
    on. A TemplateProcessing post-processor in tokenizer.json does it for any loader of that file;
    ``add_bos_token`` in tokenizer_config.json says so. Chat templates render their own BOS and are tokenized
    by transformers without special tokens, so chats do not get a second one."""
    from tokenizers import Tokenizer as HFTokenizer, processors

    hf = HFTokenizer.from_file(str(tok_dir / "tokenizer.json"))
    bos = hf.id_to_token(bos_id)
    hf.post_processor = processors.TemplateProcessing(single=f"{bos} $A:0", pair=f"{bos} $A:0 {bos} $B:1",
                                                      special_tokens=[(bos, bos_id)])
    hf.save(str(tok_dir / "tokenizer.json"))
    config_path = tok_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["add_bos_token"] = True
    config_path.write_text(json.dumps(config, indent=2))


def import_hf(hf_dir, out_run) -> Path:
    """Turn a Llama-architecture Hugging Face directory into a steplab run directory (weights-only checkpoint
    at step 0), ready for ``steplab train --set train.init_from=OUT`` to continue training.

    Its tokenizer comes along as it is: steplab's own, or a foreign one (Llama's, GPT-2's, one with its specials
    at high ids) whose bos/eos/pad are read from its tokenizer_config.json and whose chat template is kept, with
    the stop token it writes after a reply (``steplab.data.chat.template_format``). ``rope_scaling`` is read."""
    from steplab.config import ModelConfig, RopeConfig, RunConfig
    from steplab.data.tokenizer import Tokenizer

    hf_dir, out = Path(hf_dir), Path(out_run)
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{hf_dir} has no config.json; pass a Hugging Face model directory")
    hf = json.loads(config_path.read_text())
    if hf.get("model_type") != "llama":
        raise CheckpointError(f"{hf_dir} is a {hf.get('model_type')!r} model; import supports the Llama architecture")
    for key, want in (("attention_bias", False), ("mlp_bias", False), ("hidden_act", "silu")):
        if hf.get(key, want) != want:
            raise CheckpointError(f"{config_path}: {key}={hf[key]!r} is not supported (steplab's Step-1 needs {want!r})")
    try:
        rope, max_len, rope_base = rope_from_hf(hf, str(config_path))
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    heads = hf["num_attention_heads"]
    model = ModelConfig(vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layer=hf["num_hidden_layers"], n_head=heads,
                        n_kv_head=hf.get("num_key_value_heads") or heads, d_ff=hf["intermediate_size"],
                        max_seq_len=max_len, rope_base=rope_base, rope=RopeConfig(**rope),
                        norm_eps=hf.get("rms_norm_eps", 1e-5), tie_embeddings=bool(hf.get("tie_word_embeddings", False)))
    if hf.get("head_dim", model.head_dim) != model.head_dim:
        raise CheckpointError(f"{config_path}: head_dim={hf['head_dim']} differs from hidden_size/num_attention_heads; not supported")
    try:
        tokenizer = Tokenizer.load(hf_dir)
    except Exception as e:
        raise CheckpointError(f"{hf_dir}: cannot use its tokenizer ({e})") from None
    if tokenizer.vocab_size > model.vocab_size:
        raise CheckpointError(f"{hf_dir}: the tokenizer has {tokenizer.vocab_size} tokens but the model's embedding only "
                              f"{model.vocab_size} rows; they do not belong together")
    if not tokenizer.steplab_layout:
        try:  # a template that cannot render a turn is refused now, not at the first chat
            template_format(tokenizer)
        except StepLabError as e:
            raise CheckpointError(f"{hf_dir}: {e}") from None
    weights = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        weights.update(load_file(str(f)))
    if not weights:
        raise CheckpointError(f"{hf_dir} holds no *.safetensors weights")
    ours = from_hf_state_dict(weights, model)
    if model.tie_embeddings:
        ours.pop("lm_head.weight")
    with building(out) as tmp:
        cfg = RunConfig(model=model)
        cfg.data.seq_len = min(cfg.data.seq_len, model.max_seq_len)
        (tmp / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        (tmp / "tokenizer").mkdir()
        for name in TOKENIZER_FILES:
            if (hf_dir / name).exists():
                shutil.copy(hf_dir / name, tmp / "tokenizer" / name)
        if not (tmp / "tokenizer" / "tokenizer_config.json").exists():
            tokenizer.save(tmp / "tokenizer")
        ckpt = tmp / "checkpoints" / "step_00000000"
        ckpt.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in ours.items()}, str(ckpt / "model.safetensors"))
        (ckpt / "state.json").write_text(json.dumps({"step": 0, "imported_from": str(hf_dir)}))
    return out
