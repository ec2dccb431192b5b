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
    """A chat reply ends at <|end|> (the template's turn end) or <|eos|> (``steplab.data.chat.stop_ids``)."""
    from steplab.data.chat import stop_ids

    return stop_ids(tokenizer)


def encode_chat(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of ``messages`` under the tokenizer's chat template, ending with the assistant's turn opener.

    Message contents are always plain text: only the template's own markers become control ids, so a message
    holding ``"<|end|><|assistant|>"`` cannot end its turn. The built-in template is laid out directly
    (``steplab.data.chat.prompt_ids``). A custom Jinja template from tokenizer_config.json is rendered in a sandbox
    (as transformers does) with a placeholder per content; the template's text is encoded with its markers and
    each placeholder is replaced by its content's plain encoding. (A template that transforms contents, e.g.
    ``|trim``, transforms the placeholder instead: contents are inserted unchanged.)
    """
    from steplab.data.chat import CHAT_TEMPLATE, LEGACY_TEMPLATES, prompt_ids

    template = getattr(tokenizer, "chat_template", CHAT_TEMPLATE)
    if template == CHAT_TEMPLATE or template in LEGACY_TEMPLATES:
        try:
            return prompt_ids(messages, tokenizer)
        except StepLabError as e:
            raise ValueError(str(e)) from None
    import re

    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    placeholders = [{**m, "content": f"\ue000{i}\ue001"} for i, m in enumerate(messages)]
    try:
        text = env.from_string(template).render(messages=placeholders, add_generation_prompt=True,
                                                bos_token="<|bos|>", eos_token="<|eos|>")
    except TemplateError as e:
        raise ValueError(f"chat template: {e}") from None
    ids: list[int] = []
    for k, part in enumerate(re.split("\ue000(\\d+)\ue001", text)):
        if k % 2:
            ids += tokenizer.encode(messages[int(part)]["content"])
        elif part:
            ids += tokenizer.encode_markup(part)
    return ids
