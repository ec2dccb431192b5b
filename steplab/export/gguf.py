"""GGUF export for llama.cpp tooling (`steplab export gguf RUN OUT.gguf --type f16|q8_0|q4_0`), and its check.

Step-1 is Llama (see models/common.py), so the file uses llama.cpp's ``llama`` architecture with the tensor
names and metadata keys of ``convert_hf_to_gguf.py``:

- our fused ``wqkv`` and ``w13`` are split into attn_q/k/v and ffn_gate/up;
- q and k rows are permuted from the rotate-half RoPE layout (ours and Hugging Face's) to the interleaved
  pairs llama.cpp's ``llama`` RoPE rotates (the same ``permute`` as convert_hf_to_gguf's LlamaModel);
- the byte-level BPE tokenizer goes in as ``gpt2`` with its merges, pre-tokenizer ``gpt-2`` (our
  ``ByteLevel(use_regex=True)`` splits with GPT-2's regex), special tokens as CONTROL, bos/eos/pad/eot ids,
  and the chat template.

Quantized types pack weights in blocks of 32 along a row (Q8_0: int8 + one fp16 scale; Q4_0: 4-bit + one
fp16 scale); a row whose length is not a multiple of 32 cannot be stored and is refused naming the tensor.
1-D tensors (RMSNorm weights) stay F32, as llama.cpp's converter keeps them.

Step-2 (MoE) is refused: llama.cpp has no architecture that routes as Step-2 does (the balancing bias
takes part in top-k selection, shared experts beside routed ones, dense first layers in a ``llama`` file).

:func:`verify_gguf` reads the file back with ``GGUFReader``, dequantizes, undoes the permutation, runs our
forward and compares perplexity with the same quantization done in memory.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from steplab.data.chat import end_id
from steplab.errors import CheckpointError, ConfigError

TYPES = ("f32", "f16", "q8_0", "q4_0")
BLOCK = 32  # weights per block for Q8_0 and Q4_0 (llama.cpp's QK8_0 / QK4_0)


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ConfigError("`steplab export gguf` needs the gguf package: pip install gguf") from None
    return gguf


def _qtype(kind: str):
    g = _gguf()
    return {"f32": g.GGMLQuantizationType.F32, "f16": g.GGMLQuantizationType.F16,
            "q8_0": g.GGMLQuantizationType.Q8_0, "q4_0": g.GGMLQuantizationType.Q4_0}[kind]


def _file_type(kind: str):
    g = _gguf()
    return {"f32": g.LlamaFileType.ALL_F32, "f16": g.LlamaFileType.MOSTLY_F16,
            "q8_0": g.LlamaFileType.MOSTLY_Q8_0, "q4_0": g.LlamaFileType.MOSTLY_Q4_0}[kind]


def permute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rotate-half rows -> interleaved-pair rows, per head (convert_hf_to_gguf's LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(state: dict[str, torch.Tensor], mcfg) -> dict[str, torch.Tensor]:
    """Our state dict -> llama.cpp tensor names and layouts (fp32)."""
    hd, nh, nkv, dff = mcfg.head_dim, mcfg.n_head, mcfg.n_kv_head, mcfg.d_ff
    out = {"token_embd.weight": state["tok_emb.weight"], "output_norm.weight": state["norm.weight"]}
    if not mcfg.tie_embeddings:
        out["output.weight"] = state["lm_head.weight"]
    for i in range(mcfg.n_layer):
        p, b = f"layers.{i}.", f"blk.{i}."
        q, k, v = state[p + "attn.wqkv.weight"].split([nh * hd, nkv * hd, nkv * hd])
        gate, up = state[p + "ffn.w13.weight"].split(dff)
        out.update({
            b + "attn_norm.weight": state[p + "attn_norm.weight"], b + "attn_q.weight": permute_rope(q, nh),
            b + "attn_k.weight": permute_rope(k, nkv), b + "attn_v.weight": v,
            b + "attn_output.weight": state[p + "attn.wo.weight"], b + "ffn_norm.weight": state[p + "ffn_norm.weight"],
            b + "ffn_gate.weight": gate, b + "ffn_up.weight": up, b + "ffn_down.weight": state[p + "ffn.w2.weight"],
        })
    return {k: v.detach().float().contiguous() for k, v in out.items()}


def steplab_state(tensors: dict[str, torch.Tensor], mcfg) -> dict[str, torch.Tensor]:
    """Inverse of :func:`gguf_tensors`."""
    nh, nkv = mcfg.n_head, mcfg.n_kv_head
    state = {"tok_emb.weight": tensors["token_embd.weight"], "norm.weight": tensors["output_norm.weight"],
             "lm_head.weight": tensors.get("output.weight", tensors["token_embd.weight"])}
    for i in range(mcfg.n_layer):
        p, b = f"layers.{i}.", f"blk.{i}."
        state.update({
            p + "attn_norm.weight": tensors[b + "attn_norm.weight"], p + "ffn_norm.weight": tensors[b + "ffn_norm.weight"],
            p + "attn.wqkv.weight": torch.cat([unpermute_rope(tensors[b + "attn_q.weight"], nh),
                                               unpermute_rope(tensors[b + "attn_k.weight"], nkv), tensors[b + "attn_v.weight"]]),
            p + "attn.wo.weight": tensors[b + "attn_output.weight"],
            p + "ffn.w13.weight": torch.cat([tensors[b + "ffn_gate.weight"], tensors[b + "ffn_up.weight"]]),
            p + "ffn.w2.weight": tensors[b + "ffn_down.weight"],
        })
    return state


def check_shapes(tensors: dict[str, torch.Tensor], kind: str) -> None:
    """Refuse, with one line naming the tensor and the rule, what the chosen type cannot store."""
    if kind not in TYPES:
        raise ConfigError(f"--type {kind!r} is not one of {', '.join(TYPES)}")
    if kind in ("q8_0", "q4_0"):
        for name, t in tensors.items():
            if t.dim() == 2 and t.shape[1] % BLOCK:
                raise ConfigError(f"tensor {name} {tuple(t.shape)}: row length {t.shape[1]} is not a multiple of {BLOCK}, "
                                  f"the {kind} block size; export with --type f16, or use a shape with dims that are "
                                  f"multiples of 256 (the step1-edge preset)")


def encode_tensor(t: torch.Tensor, kind: str) -> tuple[np.ndarray, object]:
    """(array to write, its GGML type): 1-D stays F32; 2-D in ``kind`` (quantized with gguf's reference code)."""
    g = _gguf()
    a = t.numpy().astype(np.float32)
    if a.ndim == 1 or kind == "f32":
        return a, g.GGMLQuantizationType.F32
    if kind == "f16":
        return a.astype(np.float16), g.GGMLQuantizationType.F16
    return g.quants.quantize(a, _qtype(kind)), _qtype(kind)


def roundtrip_in_memory(tensors: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """What the file will hold, without writing it: each tensor encoded and decoded in memory."""
    g = _gguf()
    out = {}
    for name, t in tensors.items():
        a, qt = encode_tensor(t, kind)
        out[name] = torch.from_numpy(np.asarray(g.quants.dequantize(a, qt), dtype=np.float32).reshape(t.shape).copy())
    return out


def _add_tokenizer(w, tokenizer) -> None:
    import json

    g = _gguf()
    data = json.loads(tokenizer._tok.to_str())
    vocab = data["model"]["vocab"]
    for added in data.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    n = tokenizer.vocab_size
    tokens = [None] * n
    for tok, i in vocab.items():
        if i < n:
            tokens[i] = tok
    if any(t is None for t in tokens):
        raise CheckpointError(f"tokenizer ids are not contiguous 0..{n - 1}; cannot embed it in GGUF")
    special = set(tokenizer.special_ids.values())
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")  # ByteLevel(use_regex=True) == GPT-2's split regex
    w.add_token_list(tokens)
    w.add_token_types([int(g.TokenType.CONTROL if i in special else g.TokenType.NORMAL) for i in range(n)])
    w.add_token_merges(merges)
    w.add_bos_token_id(tokenizer.bos_id)
    w.add_eos_token_id(tokenizer.eos_id)
    w.add_pad_token_id(tokenizer.pad_id)
    end = end_id(tokenizer)  # chat turns end with <|end|> (a foreign template's own turn end)
    if end is not None:
        w.add_eot_token_id(end)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_chat_template(tokenizer.chat_template)


def export_gguf(run_dir, out_path, kind: str = "f16", *, checkpoint=None) -> dict:
    """Write ``out_path`` (atomically: a temporary file beside it, renamed when complete)."""
    from steplab.infer.quant import is_quantized_run
    from steplab.train.checkpoint import load_run

    g = _gguf()
    if kind not in TYPES:
        raise ConfigError(f"--type {kind!r} is not one of {', '.join(TYPES)}")
    if is_quantized_run(run_dir):
        raise ConfigError(f"{run_dir} is a `steplab quantize` run; export the original fp32 run with --type q8_0/q4_0")
    cfg, model, tokenizer, step = load_run(run_dir, checkpoint=checkpoint)
    m = cfg.model
    if m.moe.n_experts > 0:
        raise ConfigError(f"{run_dir} is a Step-2 MoE run: llama.cpp has no architecture that routes like it (balancing "
                          f"bias in top-k, shared experts, dense first layers); use `steplab export hf` instead")
    if m.rope.scaling not in ("none", "linear"):
        raise ConfigError(f"{run_dir} uses model.rope.scaling={m.rope.scaling}: only plain RoPE and linear position interpolation "
                          "are written to GGUF (llama.cpp's reading of the yarn/dynamic/llama3 keys is not verified against "
                          "our forward here, and a silently wrong rotation would corrupt every long prompt); use "
                          "`steplab export hf` for this run")
    tensors = gguf_tensors(model.state_dict(), m)
    check_shapes(tensors, kind)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}")
    w = g.GGUFWriter(str(tmp), "llama")
    w.add_name(Path(run_dir).resolve().name)
    w.add_context_length(m.max_seq_len)
    w.add_embedding_length(m.d_model)
    w.add_block_count(m.n_layer)
    w.add_feed_forward_length(m.d_ff)
    w.add_head_count(m.n_head)
    w.add_head_count_kv(m.n_kv_head)
    w.add_key_length(m.head_dim)
    w.add_value_length(m.head_dim)
    w.add_rope_dimension_count(m.head_dim)
    w.add_rope_freq_base(m.rope_base)
    if m.rope.scaling == "linear":  # position interpolation: llama.cpp scales positions by 1/factor, as we do
        w.add_rope_scaling_type(g.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(m.rope.factor)
        w.add_rope_scaling_orig_ctx_len(m.rope.original_max_seq_len)
    else:
        w.add_rope_scaling_type(g.RopeScalingType.NONE)  # plain RoPE (the -8k/-32k presets change only the base)
    w.add_layer_norm_rms_eps(m.norm_eps)
    w.add_vocab_size(m.vocab_size)
    w.add_file_type(_file_type(kind))
    w.add_quantization_version(g.GGML_QUANT_VERSION)
    w.add_uint32("steplab.step", step)
    _add_tokenizer(w, tokenizer)
    try:
        for name, t in tensors.items():
            a, qt = encode_tensor(t, kind)
            w.add_tensor(name, a, raw_dtype=qt)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    return {"tensors": len(tensors), "bytes": out.stat().st_size, "step": step}


def read_gguf(path) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """(dequantized fp32 tensors in torch layout, a few metadata values) from a GGUF file."""
    g = _gguf()
    try:
        reader = g.GGUFReader(str(path))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable GGUF file ({e})") from None
    names = {g.GGMLQuantizationType.F32: "f32", g.GGMLQuantizationType.F16: "f16",
             g.GGMLQuantizationType.Q8_0: "q8_0", g.GGMLQuantizationType.Q4_0: "q4_0"}
    kinds = {names.get(t.tensor_type, t.tensor_type.name) for t in reader.tensors if len(t.shape) == 2}
    tensors = {}
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(t.shape))  # GGUF lists ne0 (the row length) first
        a = g.quants.dequantize(np.asarray(t.data), t.tensor_type)
        tensors[t.name] = torch.from_numpy(np.asarray(a, dtype=np.float32).reshape(shape).copy())
    meta: dict[str, object] = {"type": kinds.pop() if len(kinds) == 1 else "mixed"}
    for key in ("llama.block_count", "llama.embedding_length", "llama.attention.head_count", "llama.rope.freq_base",
                "llama.rope.scaling.factor", "llama.rope.scaling.original_context_length"):
        f = reader.fields.get(key)
        if f is not None:
            meta[key] = f.parts[f.data[0]].tolist()[0]
    f = reader.fields.get("llama.rope.scaling.type")
    if f is not None:
        meta["llama.rope.scaling.type"] = bytes(f.parts[f.data[0]]).decode()
    return tensors, meta


def perplexity(model, cfg, batches: int) -> float:
    from steplab.data.loader import iter_eval_batches
    from steplab.data.prepare import load_prepared
    from steplab.eval.evaluate import evaluate, token_byte_lengths

    tok, _, val, _ = load_prepared(cfg.data.path)
    data = iter_eval_batches(val, cfg.data.seq_len, cfg.train.batch_size, max_batches=batches)
    return math.exp(evaluate(model, data, token_byte_lengths(tok), dtype="fp32")["val_loss"])


def verify_gguf(run_dir, path, *, batches: int = 4, checkpoint=None, ppl_fp32: float | None = None) -> dict:
    """Perplexity of our forward on the weights read back from ``path`` vs the same type quantized in memory."""
    from steplab.models import build_model
    from steplab.train.checkpoint import load_run

    cfg, model, _, _ = load_run(run_dir, checkpoint=checkpoint)
    m = cfg.model
    tensors, meta = read_gguf(path)
    if meta.get("llama.block_count") != m.n_layer or meta.get("llama.embedding_length") != m.d_model:
        raise CheckpointError(f"{path} does not belong to {run_dir} (metadata {meta})")
    kind = meta["type"]
    ppl_fp32 = perplexity(model, cfg, batches) if ppl_fp32 is None else ppl_fp32
    memory = build_model(m).eval()
    memory.load_state_dict(steplab_state(roundtrip_in_memory(gguf_tensors(model.state_dict(), m), kind), m), strict=False)
    from_file = build_model(m).eval()
    from_file.load_state_dict(steplab_state(tensors, m), strict=False)
    ppl_memory, ppl_file = perplexity(memory, cfg, batches), perplexity(from_file, cfg, batches)
    return {"type": kind, "ppl_fp32": ppl_fp32, "ppl_memory": ppl_memory, "ppl_file": ppl_file,
            "rel_diff": ppl_file / ppl_memory - 1}
