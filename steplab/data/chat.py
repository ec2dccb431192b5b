"""The one chat template: conversations -> token ids + assistant mask, and BOS-aligned packing into rows.

Layout (every marker is one special-token id; contents are plain text)::

    <|bos|><|system|>SYS<|end|><|user|>Q<|end|><|assistant|>A<|end|><|user|>...<|end|><|assistant|>

The assistant mask is 1 on each assistant content token and on the ``<|end|>`` that closes it (what a chat
model must learn to produce, stop included) and 0 elsewhere, the ``<|assistant|>`` opener included: it is the
prompt's last token. :data:`CHAT_TEMPLATE` is the same layout in Jinja with ``{% generation %}`` blocks; it
is saved in ``tokenizer_config.json`` so that transformers' ``apply_chat_template(...,
return_assistant_tokens_mask=True, return_dict=True)`` gives identical ids and mask (tests/test_chat_template.py).

Text is data, never control: :func:`render` places the markers as ids and encodes each content with
``Tokenizer.encode`` (which encodes ``"<|end|>"`` typed by a user as seven characters). transformers parses
marker strings inside contents as markers; for contents without marker strings the two agree exactly.

Packing (:func:`pack`): each conversation starts with <|bos|>; rows of ``row_len`` tokens are filled best-fit
(the longest waiting conversation that still fits, nanochat's BOS-aligned scheme) and the rest padded with
<|pad|> (mask 0). A conversation longer than a row is dropped and counted, never cut mid-answer.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Iterable

from steplab.errors import DataError

ROLES = ("system", "user", "assistant")
END = "<|end|>"  # closes every turn; a chat reply stops at it
IGNORE_INDEX = -100  # target at a masked position (torch's cross_entropy default ignore_index)

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown chat role: ' + message['role']) }}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>' }}{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
# Templates older runs saved (same text, no generation blocks): loading one gives CHAT_TEMPLATE.
LEGACY_TEMPLATES = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown chat role: ' + message['role']) }}{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}",
)


def check_messages(messages, where: str = "messages") -> list[dict[str, str]]:
    """``messages`` as a list of {"role", "content"} dicts, or a DataError naming ``where`` and the fault."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: a conversation must be a non-empty list of messages, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: message {i} must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: message {i} has unknown role {m['role']!r}; use system, user or assistant")
        if not isinstance(m["content"], str):
            raise DataError(f"{where}: message {i} content must be a string, got {type(m['content']).__name__}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def render(messages: list[dict[str, str]], tokenizer, *, add_generation_prompt: bool = False
           ) -> tuple[list[int], list[int]]:
    """(ids, assistant mask) of ``messages`` under :data:`CHAT_TEMPLATE`; markers are ids, contents plain text."""
    special = tokenizer.special_ids
    end = special[END]
    ids, mask = [tokenizer.bos_id], [0]
    for i, m in enumerate(messages):
        role = m["role"]
        if role not in ROLES:
            raise DataError(f"message {i} has unknown chat role {role!r}; use system, user or assistant")
        body = tokenizer.encode(m["content"]) + [end]
        ids.append(special[f"<|{role}|>"])
        mask.append(0)
        ids += body
        mask += [int(role == "assistant")] * len(body)
    if add_generation_prompt:
        ids.append(special["<|assistant|>"])
        mask.append(0)
    return ids, mask


def prompt_ids(messages: list[dict[str, str]], tokenizer) -> list[int]:
    """The ids a model continues to reply: the conversation so far plus the ``<|assistant|>`` opener."""
    return render(messages, tokenizer, add_generation_prompt=True)[0]


def render_text(messages: list[dict[str, str]], *, add_generation_prompt: bool = False) -> str:
    """The template's text (what transformers renders before tokenizing); for ids use :func:`render`."""
    parts = ["<|bos|>"]
    for i, m in enumerate(messages):
        if m["role"] not in ROLES:
            raise DataError(f"message {i} has unknown chat role {m['role']!r}; use system, user or assistant")
        parts.append(f"<|{m['role']}|>{m['content']}{END}")
    if add_generation_prompt:
        parts.append("<|assistant|>")
    return "".join(parts)


def stop_ids(tokenizer) -> frozenset[int]:
    """A reply ends at the turn end ``<|end|>`` or at ``<|eos|>``: ids looked up in the tokenizer, by name."""
    ids = {tokenizer.eos_id}
    if END in tokenizer.special_ids:
        ids.add(tokenizer.special_ids[END])
    return frozenset(ids)


def turn_markers(tokenizer) -> frozenset[int]:
    """Ids that open a turn: a reply that emits one has broken the format (it speaks for another role)."""
    return frozenset(tokenizer.special_ids[f"<|{r}|>"] for r in ROLES) | {tokenizer.bos_id}


# ---- packing ----------------------------------------------------------------------------------------------

@dataclass
class PackStats:
    conversations: int = 0  # packed
    dropped: int = 0  # longer than a row
    rows: int = 0
    tokens: int = 0  # conversation tokens placed (padding excluded)
    pad: int = 0
    trained: int = 0  # positions with a target (assistant tokens after the first of a row)

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class Packer:
    """Best-fit packing of (ids, mask) conversations into rows of ``row_len`` tokens, each starting at a <|bos|>.

    Conversations wait in a buffer of ``buffer`` entries; a row takes the longest that fits the room left,
    again and again, then pads. Deterministic for a given input order.
    """

    row_len: int
    pad_id: int
    buffer: int = 256
    stats: PackStats = field(default_factory=PackStats)

    def rows(self, conversations: Iterable[tuple[list[int], list[int]]]):
        """Yield (ids, mask) rows of exactly ``row_len`` tokens."""
        lengths: list[int] = []  # sorted lengths of waiting conversations, parallel to ``waiting``
        waiting: list[tuple[list[int], list[int]]] = []
        source = iter(conversations)
        exhausted = False
        while True:
            while not exhausted and len(waiting) < self.buffer:
                try:
                    ids, mask = next(source)
                except StopIteration:
                    exhausted = True
                    break
                if len(ids) > self.row_len:
                    self.stats.dropped += 1
                    continue
                k = bisect.bisect_right(lengths, len(ids))
                lengths.insert(k, len(ids))
                waiting.insert(k, (ids, mask))
            if not waiting:
                return
            row_ids: list[int] = []
            row_mask: list[int] = []
            while waiting:
                k = bisect.bisect_right(lengths, self.row_len - len(row_ids)) - 1
                if k < 0:
                    break
                lengths.pop(k)
                ids, mask = waiting.pop(k)
                row_ids += ids
                row_mask += mask
                self.stats.conversations += 1
            pad = self.row_len - len(row_ids)
            self.stats.rows += 1
            self.stats.tokens += len(row_ids)
            self.stats.pad += pad
            self.stats.trained += sum(row_mask[1:])
            yield row_ids + [self.pad_id] * pad, row_mask + [0] * pad


def targets(ids: list[int], mask: list[int]) -> tuple[list[int], list[int]]:
    """(inputs, targets) of one row for next-token training: targets are ids[1:] with IGNORE_INDEX wherever the
    predicted token is not an assistant token (prompts, markers, padding, the next conversation's <|bos|>)."""
    return ids[:-1], [t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:])]
