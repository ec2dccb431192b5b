"""The exported tokenizer's default call reproduces the training-time prompt (BOS first), so greedy decoding in
transformers from ``AutoTokenizer(text)`` matches ``steplab sample``; chat templates get one BOS, not two."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_overrides
from steplab.cli import main
from steplab.config import resolve
from steplab.infer.sampling import SamplingParams, generate
from steplab.train.checkpoint import load_run
from steplab.train.trainer import train

transformers = pytest.importorskip("transformers")


def test_default_tokenizer_call_adds_bos_and_greedy_decoding_matches(tiny_data, tmp_path):
    run = tmp_path / "run"
    train(resolve(overrides=tiny_overrides(tiny_data, steps=6)), run, progress=False)
    out = tmp_path / "hf"
    assert main(["export", "hf", str(run), str(out)]) == 0
    _, ours, tokenizer, _ = load_run(run)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()

    prompt = "def add(a, b):"
    ids = hf_tok(prompt)["input_ids"]  # the default call, as a new user writes it
    assert ids == [tokenizer.bos_id] + tokenizer.encode(prompt)  # what steplab sample feeds the model
    new = generate(ours, [[tokenizer.bos_id] + tokenizer.encode(prompt)], SamplingParams(max_new_tokens=24, temperature=0))[0]
    hf_out = hf.generate(**hf_tok(prompt, return_tensors="pt"), max_new_tokens=len(new), do_sample=False, eos_token_id=None)
    assert hf_out[0].tolist() == ids + new

    messages = [{"role": "user", "content": "hi"}]
    chat = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    chat = chat["input_ids"] if hasattr(chat, "keys") else chat
    assert chat == tokenizer.encode_chat(messages, add_generation_prompt=True)
    assert chat.count(tokenizer.bos_id) == 1
