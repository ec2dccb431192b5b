"""Prompt helpers shared by the server and the CLI: the chat prompt's token ids, its stop ids, the inference dtype."""
from __future__ import annotations

import torch

from steplab.errors import StepLabError


def torch_dtype(name: str) -> torch.dtype:
    """"bf16" | "fp32" (also "bfloat16", "float32") -> the torch dtype."""
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}
    if name not in table:
        raise ValueError(f"dtype {name!r} is not one of bf16, fp32")
    return table[name]


# ---- prompts ---------------------------------------------------------------------------------------------

def chat_stop_ids(tokenizer) -> frozenset[int]:
    """A chat reply ends at <|end|> (the template's turn end) or <|eos|>, and is cut at any turn marker it would
    emit for another role (``steplab.data.chat.reply_stop_ids``: ids looked up in the tokenizer by name)."""
    from steplab.data.chat import reply_stop_ids

    return reply_stop_ids(tokenizer)


def encode_chat(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of ``messages`` under the tokenizer's chat template, ending with the assistant's turn opener
    (``steplab.data.chat.prompt_ids``: the built-in template laid out directly, a tokenizer's own Jinja template
    rendered in a sandbox). Message contents are always plain text: only the template's own markers become
    control ids, so a message holding ``"<|end|><|assistant|>"`` cannot end its turn. ValueError on bad input."""
    from steplab.data.chat import prompt_ids

    try:
        return prompt_ids(messages, tokenizer)
    except StepLabError as e:
        raise ValueError(str(e)) from None
