"""GGUF export (export/gguf.py): layout, tokenizer metadata, shape rules, read-back perplexity, llama.cpp."""
from __future__ import annotations

import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install gguf)")

from steplab.errors import ConfigError  # noqa: E402
from steplab.export.gguf import export_gguf, permute_rope, read_gguf, unpermute_rope, verify_gguf  # noqa: E402
from steplab.models.common import apply_rope  # noqa: E402
from steplab.models.rope import rope_tables  # noqa: E402


@pytest.fixture(scope="module")
def tiny_run(tiny_data, tmp_path_factory):
    from steplab.cli import main
    from tests.conftest import tiny_overrides

    run = tmp_path_factory.mktemp("gguf") / "run"
    assert main(["train", "--preset", "step1-nano", "--quiet", "--out", str(run),
                 *sum((["--set", s] for s in tiny_overrides(tiny_data, steps=6)), [])]) == 0
    return run


def test_permutation_turns_rotate_half_rope_into_llama_cpp_pair_rope():
    """llama.cpp's `llama` RoPE rotates adjacent pairs (x[2i], x[2i+1]); ours rotates halves (x[i], x[i+d/2]).
    With q's rows permuted, pair-RoPE of the permuted q equals the permuted rotate-half RoPE of q."""
    torch.manual_seed(0)
    n_head, hd, T = 2, 8, 5
    w = torch.randn(n_head * hd, 16)
    x = torch.randn(T, 16)
    cos, sin = rope_tables(hd, T, 10000.0)
    ours = apply_rope((x @ w.T).view(T, n_head, hd).transpose(0, 1), cos, sin)  # (H, T, hd)
    q = (x @ permute_rope(w, n_head).T).view(T, n_head, hd).transpose(0, 1)
    c, s = cos[:, : hd // 2], sin[:, : hd // 2]  # pair i turns by angle i
    pairs = torch.stack([q[..., 0::2] * c - q[..., 1::2] * s, q[..., 0::2] * s + q[..., 1::2] * c], -1).flatten(-2)
    expected = permute_rope(ours.transpose(0, 1).reshape(T, -1).T, n_head).T.reshape(T, n_head, hd).transpose(0, 1)
    assert torch.allclose(pairs, expected, atol=1e-5)
    assert torch.equal(unpermute_rope(permute_rope(w, n_head), n_head), w)


@pytest.mark.parametrize("kind", ["f16", "q8_0", "q4_0"])
def test_gguf_round_trip_perplexity_and_metadata(tiny_run, tmp_path, kind):
    from steplab.train.checkpoint import load_run

    path = tmp_path / f"m-{kind}.gguf"
    info = export_gguf(tiny_run, path, kind)
    assert path.is_file() and info["bytes"] == path.stat().st_size
    v = verify_gguf(tiny_run, path, batches=2)
    assert v["type"] == kind
    assert abs(v["rel_diff"]) < 1e-3  # the bar: within 0.1%
    assert abs(v["ppl_file"] / v["ppl_fp32"] - 1) < {"f16": 1e-3, "q8_0": 0.01, "q4_0": 0.2}[kind]

    _, _, tok, _ = load_run(tiny_run)
    reader = gguf.GGUFReader(str(path))

    def field(key):
        f = reader.fields[key]
        vals = [f.parts[i] for i in f.data]
        return [bytes(x).decode() if x.dtype == "uint8" else x.tolist()[0] for x in vals]

    assert field("general.architecture") == ["llama"]
    assert field("tokenizer.ggml.model") == ["gpt2"] and field("tokenizer.ggml.pre") == ["gpt-2"]
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == tok.vocab_size and tokens[:2] == ["<|bos|>", "<|eos|>"]
    ids = tok.encode("def f(x):")
    assert [tokens[i] for i in ids] == [tok._tok.id_to_token(i) for i in ids]
    assert field("tokenizer.ggml.token_type")[:8] == [3] * 7 + [1]  # 7 specials are CONTROL
    assert len(field("tokenizer.ggml.merges")) > 100
    assert field("tokenizer.chat_template") == [tok.chat_template]
    assert field("tokenizer.ggml.eot_token_id") == [tok.special_ids["<|end|>"]]
    assert field("llama.rope.dimension_count") == [16] and field("llama.attention.head_count_kv") == [2]


def test_sizes_shrink_with_the_type(tiny_run, tmp_path):
    sizes = {k: export_gguf(tiny_run, tmp_path / f"{k}.gguf", k)["bytes"] for k in ("f32", "q8_0", "q4_0")}
    assert sizes["q8_0"] < 0.30 * sizes["f32"] and sizes["q4_0"] < 0.17 * sizes["f32"]


def test_refusals_name_the_tensor_and_the_rule(tiny_data, tmp_path):
    from steplab.cli import main
    from tests.conftest import tiny_overrides

    run = tmp_path / "odd"
    assert main(["train", "--preset", "step1-nano", "--quiet", "--out", str(run),
                 *sum((["--set", s] for s in tiny_overrides(tiny_data, steps=2, **{"model.d_model": 48})), [])]) == 0
    with pytest.raises(ConfigError, match=r"tensor token_embd\.weight \(\d+, 48\): row length 48 is not a multiple of 32, the q4_0 block size"):
        export_gguf(run, tmp_path / "x.gguf", "q4_0")
    assert not (tmp_path / "x.gguf").exists()
    assert export_gguf(run, tmp_path / "x.gguf", "f16")["tensors"] > 0  # f16 has no block rule
    assert read_gguf(tmp_path / "x.gguf")[1]["llama.embedding_length"] == 48
    assert main(["export", "gguf", str(run), str(tmp_path / "y.gguf"), "--type", "q8_0"]) == 2

    moe = tmp_path / "moe"
    assert main(["train", "--preset", "step1-nano", "--quiet", "--out", str(moe),
                 *sum((["--set", s] for s in tiny_overrides(tiny_data, steps=2, **{"model.moe.n_experts": 4})), [])]) == 0
    with pytest.raises(ConfigError, match="MoE run: llama.cpp has no architecture"):
        export_gguf(moe, tmp_path / "m.gguf", "f16")


def test_scaled_rope_is_written_for_pi_and_refused_for_yarn(tiny_run, tiny_data, tmp_path):
    """An extended run's RoPE scaling must reach llama.cpp: linear (PI) is written, the others are refused rather
    than exported as plain RoPE (which would rotate every position past the trained length wrongly)."""
    import json

    from steplab.cli import main

    pi, yarn = tmp_path / "pi", tmp_path / "yarn"
    for out, method in ((pi, "pi"), (yarn, "yarn")):
        assert main(["extend", str(tiny_run), "--factor", "2", "--method", method, "--steps", "1", "--out", str(out),
                     "--data", str(tiny_data), "--memory", "", "--quiet"]) == 0
    export_gguf(pi, tmp_path / "pi.gguf", "f16")
    meta = read_gguf(tmp_path / "pi.gguf")[1]
    assert meta["llama.rope.scaling.type"] == "linear" and meta["llama.rope.scaling.factor"] == 2.0
    trained = json.loads((tiny_run / "config.json").read_text())["model"]["max_seq_len"]
    assert meta["llama.rope.scaling.original_context_length"] == trained
    export_gguf(tiny_run, tmp_path / "plain.gguf", "f16")
    assert read_gguf(tmp_path / "plain.gguf")[1]["llama.rope.scaling.type"] == "none"
    with pytest.raises(ConfigError, match="model.rope.scaling=yarn.*steplab export hf"):
        export_gguf(yarn, tmp_path / "yarn.gguf", "f16")
    assert not (tmp_path / "yarn.gguf").exists()


def test_edge_preset_dims_are_multiples_of_256():
    from steplab.config import preset

    m = preset("step1-edge").model
    m.vocab_size = 4096
    assert all(d % 256 == 0 for d in (m.d_model, m.d_ff, m.n_head * m.head_dim, m.n_kv_head * m.head_dim, m.vocab_size))


@pytest.mark.slow
def test_llama_cpp_greedy_tokens_match_ours(tiny_run, tmp_path):
    """Load the f32 file in llama.cpp and compare 32 greedy tokens with our KV-cached decoding (argmax ties aside)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (it builds llama.cpp from "
                                                        "source: pip install llama-cpp-python)")
    from steplab.infer.sampling import SamplingParams, generate
    from steplab.train.checkpoint import load_run

    path = tmp_path / "m.gguf"
    export_gguf(tiny_run, path, "f32")
    _, model, tok, _ = load_run(tiny_run)
    prompt = [tok.bos_id] + tok.encode("def main(args):\n    ")
    ours = generate(model, [prompt], SamplingParams(max_new_tokens=32, temperature=0.0))[0]
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_threads=2, verbose=False, logits_all=False)
    theirs = []
    for t in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        theirs.append(t)
        if len(theirs) == 32:
            break
    assert llm.tokenize("def main(args):\n    ".encode(), add_bos=True, special=False) == prompt  # same tokenizer
    assert theirs == ours
