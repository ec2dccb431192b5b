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

A foreign tokenizer (an imported Llama's, with its own specials and Jinja template) keeps its template: it is
rendered in a sandbox as transformers renders it, with a placeholder for each content; the template's text is
split at its special tokens (control ids) and the text between them, contents included, is encoded as plain text,
so the ids equal transformers' for contents without marker strings and a marker typed by a user stays text.
Its turn end (the stop token) is the first special token the template writes after an assistant's content; the
assistant mask covers that content through that token (:func:`template_format`).

Packing (:func:`pack`): each conversation starts with <|bos|>; rows of ``row_len`` tokens are filled best-fit
(the longest waiting conversation that still fits, nanochat's BOS-aligned scheme) and the rest padded with
<|pad|> (mask 0). A conversation longer than a row is dropped and counted, never cut mid-answer.
"""
from __future__ import annotations

import bisect
import functools
import json
import re
from dataclasses import dataclass, field
from typing import Iterable

from steplab.errors import DataError

ROLES = ("system", "user", "assistant")
END = "<|end|>"  # closes every turn; a chat reply stops at it
IGNORE_INDEX = -100  # a target the loss skips (torch's cross_entropy default; models/common.py uses this one)

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
    """(ids, assistant mask) of ``messages`` under the tokenizer's chat template (:data:`CHAT_TEMPLATE` for
    steplab's tokenizers); markers are ids, contents plain text."""
    if not builtin(tokenizer):
        return render_template(messages, tokenizer, add_generation_prompt=add_generation_prompt)
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


def render_text(messages: list[dict[str, str]], tokenizer=None, *, add_generation_prompt: bool = False) -> str:
    """The template's text (what transformers renders before tokenizing); for ids use :func:`render`."""
    if tokenizer is not None and not builtin(tokenizer):
        return _jinja_render(tokenizer, messages, add_generation_prompt)
    parts = ["<|bos|>"]
    for i, m in enumerate(messages):
        if m["role"] not in ROLES:
            raise DataError(f"message {i} has unknown chat role {m['role']!r}; use system, user or assistant")
        parts.append(f"<|{m['role']}|>{m['content']}{END}")
    if add_generation_prompt:
        parts.append("<|assistant|>")
    return "".join(parts)


def end_id(tokenizer) -> int | None:
    """The id that closes a turn (``<|end|>``; a foreign template's own, e.g. ``<|im_end|>``), None if it has none."""
    if builtin(tokenizer):
        return tokenizer.special_ids.get(END)
    return template_format(tokenizer).end


def stop_ids(tokenizer) -> frozenset[int]:
    """A reply ends at the turn end (:func:`end_id`) or at the tokenizer's EOS."""
    end = end_id(tokenizer)
    return frozenset({tokenizer.eos_id} | ({end} if end is not None else set()))


def turn_markers(tokenizer) -> frozenset[int]:
    """Ids that open a turn: a reply that emits one has broken the format (it speaks for another role)."""
    if not builtin(tokenizer):
        return template_format(tokenizer).markers | {tokenizer.bos_id}
    return frozenset(tokenizer.special_ids[f"<|{r}|>"] for r in ROLES) | {tokenizer.bos_id}


def reply_stop_ids(tokenizer) -> frozenset[int]:
    """Where generating a reply stops: its end (:func:`stop_ids`) or a turn marker it must not emit (the reply
    would speak for another role); serving, ``steplab chat`` and task evals all stop here."""
    return stop_ids(tokenizer) | turn_markers(tokenizer)


# ---- a tokenizer's own Jinja template (foreign tokenizers) -------------------------------------------------

def builtin(tokenizer) -> bool:
    """Whether ``tokenizer`` chats in :data:`CHAT_TEMPLATE` with steplab's markers (laid out directly by :func:`render`)."""
    return tokenizer.steplab_layout and tokenizer.chat_template in (CHAT_TEMPLATE, *LEGACY_TEMPLATES)


@functools.lru_cache(maxsize=16)
def _compile(source: str):
    """A template compiled as transformers compiles chat templates: sandboxed, trim_blocks/lstrip_blocks, with
    raise_exception, tojson, strftime_now and the ``{% generation %}`` tag (rendered as its plain body)."""
    from datetime import datetime

    from jinja2 import nodes
    from jinja2.exceptions import TemplateError
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise DataError(f"the tokenizer's chat template does not compile: {e}") from None


def _jinja_render(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    from jinja2.exceptions import TemplateError

    if tokenizer.chat_template is None:
        raise DataError("this tokenizer has no chat template (its tokenizer_config.json and chat_template.jinja name "
                        "none), so it cannot format a conversation; use a completion prompt, or add a template")
    names = {"bos_token": tokenizer.token(tokenizer.bos_id), "eos_token": tokenizer.token(tokenizer.eos_id),
             "pad_token": tokenizer.token(tokenizer.pad_id)}
    try:
        return _compile(tokenizer.chat_template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                        **names)
    except TemplateError as e:
        raise DataError(f"chat template: {e}") from None


_SLOT = re.compile("\ue000(\\d+)\ue001")  # a content's placeholder: private-use characters, no whitespace


def render_template(messages: list[dict[str, str]], tokenizer, *, add_generation_prompt: bool = False
                    ) -> tuple[list[int], list[int]]:
    """(ids, assistant mask) of ``messages`` under the tokenizer's own Jinja template; contents are plain text.

    The template is rendered with a placeholder per content, so what it writes around contents (its markers,
    role names, BOS) is known apart from what users wrote. The rendered text is cut at the special tokens the
    template wrote (each becomes its id) and every stretch between them, with the contents put back, is encoded
    as plain text: transformers' ids whenever no content holds a marker string."""
    for i, m in enumerate(messages):
        if m.get("role") not in ROLES:
            raise DataError(f"message {i} has unknown chat role {m.get('role')!r}; use system, user or assistant")
    text = _jinja_render(tokenizer, [{**m, "content": f"\ue000{i}\ue001"} for i, m in enumerate(messages)],
                         add_generation_prompt)
    parts = _SLOT.split(text)  # template text, content index, template text, ...
    contents = _contents_as_rendered(messages, parts, tokenizer, add_generation_prompt)
    markers = _marker_pattern(tokenizer)
    pieces: list[tuple[str, int | None]] = []  # (text, None) stretches and (marker, id) tokens, in order
    spans: list[tuple[int, int]] = []  # assistant contents' character spans in the joined text
    stretch, at = "", 0
    for k, part in enumerate(parts):
        if k % 2:
            content = contents[int(part)]
            if messages[int(part)]["role"] == "assistant":
                spans.append((at, at + len(content)))
            stretch, at = stretch + content, at + len(content)
            continue
        for j, bit in enumerate(markers.split(part) if markers else [part]):
            if j % 2:
                pieces.append((stretch, None))
                pieces.append((bit, tokenizer.special_ids[bit]))
                stretch = ""
            else:
                stretch += bit
            at += len(bit)
    pieces.append((stretch, None))
    starts = [0]
    for piece, _ in pieces:
        starts.append(starts[-1] + len(piece))
    # Each assistant span runs on to the end of the first marker after it when that marker ends a turn: the
    # model must learn to produce it (and the template text before it, e.g. Llama-2's " </s>"), as <|end|>.
    ends = stop_ids(tokenizer) if spans else frozenset()
    for n, (s, e) in enumerate(spans):
        after = next(((start, token_id, len(piece)) for (piece, token_id), start in zip(pieces, starts)
                      if token_id is not None and start >= e), None)
        if after is not None and after[1] in ends:
            spans[n] = (s, after[0] + after[2])
    ids: list[int] = []
    mask: list[int] = []
    for (piece, token_id), at in zip(pieces, starts):
        if token_id is not None:
            ids.append(token_id)
            mask.append(int(_in_spans(at, at + len(piece), spans)))
        elif piece:
            got, offsets = tokenizer.encode_with_offsets(piece)
            ids += got
            mask += [int(_in_spans(at + a, at + b, spans)) for a, b in offsets]
    return ids, mask


def _contents_as_rendered(messages, parts: list[str], tokenizer, add_generation_prompt: bool) -> list[str]:
    """Each content as the template writes it: unchanged, or stripped by a template that trims contents (Llama-2's
    ``| trim``); checked against a render of the real contents. Any other rewrite is refused."""
    if [int(p) for p in parts[1::2]] == list(range(len(messages))):
        real = _jinja_render(tokenizer, messages, add_generation_prompt)
        for contents in ([m["content"] for m in messages], [m["content"].strip() for m in messages]):
            if "".join(p if k % 2 == 0 else contents[int(p)] for k, p in enumerate(parts)) == real:
                return contents
    raise DataError("the tokenizer's chat template drops, repeats, reorders or rewrites message contents; steplab "
                    "inserts each content once, in order, unchanged (or stripped), so that it stays data")


def _in_spans(start: int, end: int, spans: list[tuple[int, int]]) -> bool:
    """Whether the characters [start, end) overlap one of ``spans``."""
    return any(start < e and s < end for s, e in spans)


def _marker_pattern(tokenizer):
    """A regex that splits template text at the tokenizer's special tokens (longest first), None if it has none."""
    names = sorted(tokenizer.special_ids, key=len, reverse=True)
    return re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None


@dataclass(frozen=True)
class TemplateFormat:
    end: int | None  # the special token the template writes right after an assistant's content (its turn end)
    markers: frozenset[int]  # the other special tokens it writes around turns (turn openers, headers)


def template_format(tokenizer) -> TemplateFormat:
    """Probe the template once with a user/assistant/user conversation and a generation prompt: its turn end and
    its markers (cached on the tokenizer)."""
    cached = tokenizer.__dict__.get("_template_format")
    if cached is not None and cached[0] == tokenizer.chat_template:
        return cached[1]
    probe = [{"role": "user", "content": "\ue000"}, {"role": "assistant", "content": "\ue001"},
             {"role": "user", "content": "\ue002"}]
    text = _jinja_render(tokenizer, probe, True)
    markers = _marker_pattern(tokenizer)
    found = [tokenizer.special_ids[m] for m in markers.findall(text)] if markers else []
    after = text.split("\ue001", 1)[-1].split("\ue002", 1)[0]
    closing = markers.search(after) if markers else None
    end = tokenizer.special_ids[closing.group(1)] if closing else None
    out = TemplateFormat(end, frozenset(found) - {end, tokenizer.eos_id})
    tokenizer.__dict__["_template_format"] = (tokenizer.chat_template, out)
    return out


# ---- packing ------------------------------------------------------------------------------------------

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
