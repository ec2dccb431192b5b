"""Byte-level BPE tokenizer: a thin wrapper over Hugging Face ``tokenizers``.

Why byte-level BPE with all 256 bytes in the base alphabet: every UTF-8 string encodes
without an unknown token and ``decode(encode(s)) == s`` exactly (leading spaces, tabs,
``\\r\\n``, emoji, CJK). No normalizer and ``add_prefix_space=False`` keep it that way.

Why the Rust library: training on megabytes and batch-encoding run in parallel native
code, and the saved ``tokenizer.json`` plus ``tokenizer_config.json`` load unchanged in
``transformers.AutoTokenizer``, so exported models need no tokenizer conversion.

Special tokens take ids 0..6 in the order of :data:`SPECIAL_TOKENS`. A foreign tokenizer (an imported Llama's,
GPT-2's: ``steplab import hf``) keeps its own: bos/eos/pad are named by its tokenizer_config.json (a missing BOS or
pad falls back to EOS), its chat template is kept (``steplab.data.chat.render_template``), and :meth:`save` writes
its config back unchanged.

Text is data, never control: :meth:`Tokenizer.encode` encodes the literal string ``"<|end|>"`` as ordinary
bytes, so text from users (chat messages, completion prompts, ``steplab sample --prompt``, SFT and pretraining
documents) can never close a turn or open one for another role. Control ids come only from the code that
builds a layout: :meth:`Tokenizer.encode_chat` places the template's markers as ids around plainly encoded
contents, and :meth:`Tokenizer.encode_markup` parses marker strings for text the program itself wrote.
transformers' tokenizer parses marker text everywhere; for text without marker strings the ids are identical.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from steplab.errors import ConfigError, DataError
from steplab.utils import atomic_write, atomic_write_json

SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
MIN_VOCAB = len(SPECIAL_TOKENS) + 256  # specials + the byte alphabet
TEMPLATE_FILE = "chat_template.jinja"  # a foreign tokenizer's chat template, as transformers saves it

# The one chat template lives in steplab/data/chat.py (ids, assistant mask, packing); the tokenizer saves it.
from steplab.data.chat import CHAT_TEMPLATE, LEGACY_TEMPLATES  # noqa: E402


class Tokenizer:
    """Encode/decode text to token ids; build with :func:`train_tokenizer` or :meth:`load`."""

    def __init__(self, hf_tokenizer, chat_template: str | None = CHAT_TEMPLATE, config: dict | None = None) -> None:
        self._tok = hf_tokenizer
        self.chat_template = chat_template
        # steplab's own layout (specials at ids 0..6), or a foreign tokenizer (an imported Llama's, GPT-2's) whose
        # bos/eos/pad come from its tokenizer_config.json, kept verbatim in ``config`` for :meth:`save`.
        self.config = None if config is None or _steplab_layout(hf_tokenizer) else config
        if self.config is None:
            self.special_ids: dict[str, int] = {}
            for expected_id, token in enumerate(SPECIAL_TOKENS):
                got = hf_tokenizer.token_to_id(token)
                if got != expected_id:
                    raise DataError(f"tokenizer has {token!r} at id {got}, expected {expected_id}; "
                                    "re-train it with `steplab tokenizer train`, or keep the tokenizer_config.json "
                                    "(bos_token/eos_token) that came with a foreign tokenizer")
                self.special_ids[token] = got
            self._bos, self._eos, self._pad = (self.special_ids[t] for t in SPECIAL_TOKENS[:3])
        else:
            self.special_ids = {t.content: i for i, t in sorted(hf_tokenizer.get_added_tokens_decoder().items()) if t.special}
            self._bos, self._eos, self._pad = _foreign_specials(hf_tokenizer, self.config)
        # A twin that encodes special-token strings as plain text (tokenizers' ``encode_special_tokens``; not
        # part of the saved file). ``_tok`` keeps parsing markers, for the template's own text and for decoding.
        from tokenizers import Tokenizer as HFTokenizer

        self._plain = HFTokenizer.from_str(hf_tokenizer.to_str())
        self._plain.encode_special_tokens = True
        # encode_batch_fast (tokenizers>=0.21) skips offset bookkeeping we never use.
        self._batch = getattr(self._plain, "encode_batch_fast", self._plain.encode_batch)

    @property
    def steplab_layout(self) -> bool:
        """True for steplab's own tokenizers (specials at ids 0..6, the built-in chat template's markers)."""
        return self.config is None

    # -- ids
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return self._bos

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def pad_id(self) -> int:
        return self._pad

    def token(self, token_id: int) -> str:
        """The vocabulary string of one id (a special token's name, e.g. ``"<|eos|>"`` or ``"</s>"``)."""
        return self._tok.id_to_token(token_id)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """:meth:`encode` plus each token's (start, end) character span in ``text``."""
        e = self._plain.encode(text, add_special_tokens=False)
        return e.ids, e.offsets

    # -- text <-> ids
    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of ``text`` as plain text: ``"<|end|>"`` in ``text`` is seven characters, never the control id."""
        ids = self._plain.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts at once on all cores as plain text (no bos/eos added)."""
        return [e.ids for e in self._batch(list(texts), add_special_tokens=False)]

    def encode_markup(self, text: str) -> list[int]:
        """Token ids of text the *program* wrote, where marker strings (``<|user|>``...) become control ids.
        Never pass user text here: use :meth:`encode` or :meth:`encode_chat`."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_chat(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = False) -> list[int]:
        """Ids of the chat template (``steplab.data.chat.render``): markers are control ids, contents plain text."""
        from steplab.data.chat import render

        return render(messages, self, add_generation_prompt=add_generation_prompt)[0]

    def decode(self, ids: list[int], *, skip_special: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    def render_chat(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = False) -> str:
        """The chat template's text (``steplab.data.chat.render_text``); for ids use :meth:`encode_chat`."""
        from steplab.data.chat import render_text

        return render_text(messages, self, add_generation_prompt=add_generation_prompt)

    # -- files
    def save(self, out_dir: str | Path) -> None:
        """Write tokenizer.json + tokenizer_config.json + special_tokens_map.json (transformers-loadable)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "tokenizer.json", lambda tmp: self._tok.save(tmp))
        if self.config is not None:  # a foreign tokenizer keeps its own config verbatim, its template beside it
            atomic_write_json(out / "tokenizer_config.json", {k: v for k, v in self.config.items() if k != "chat_template"})
            if self.chat_template is not None:  # transformers >= 4.50 reads chat_template.jinja
                atomic_write(out / TEMPLATE_FILE, lambda tmp: Path(tmp).write_text(self.chat_template, "utf-8"))
            return
        extra = SPECIAL_TOKENS[3:]
        added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                          "single_word": False, "special": True} for i, t in enumerate(SPECIAL_TOKENS)}
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>", "unk_token": None,
            "additional_special_tokens": extra,
            "add_bos_token": False, "add_eos_token": False, "add_prefix_space": False,
            "clean_up_tokenization_spaces": False, "model_max_length": 1_000_000_000,
            "added_tokens_decoder": added,
            "chat_template": self.chat_template,
        }
        atomic_write_json(out / "tokenizer_config.json", config)
        atomic_write_json(out / "special_tokens_map.json", {
            "bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>",
            "additional_special_tokens": extra})

    @classmethod
    def load(cls, tok_dir: str | Path) -> "Tokenizer":
        """Load a tokenizer saved by :meth:`save` (DataError if missing or corrupt)."""
        from tokenizers import Tokenizer as HFTokenizer

        d = Path(tok_dir)
        path = d / "tokenizer.json" if d.is_dir() or not d.suffix == ".json" else d
        if not path.is_file():
            raise DataError(f"no tokenizer at {path}; train one with `steplab tokenizer train` "
                            "or point at a folder holding tokenizer.json")
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a bare Exception
            raise DataError(f"{path} is not a valid tokenizer file ({str(e)[:200]}); re-train or re-copy it") from None
        config: dict | None = None
        config_path = path.parent / "tokenizer_config.json"
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text("utf-8"))
            except json.JSONDecodeError as e:
                raise DataError(f"{config_path} is not valid JSON ({e}); delete it or re-save the tokenizer") from None
            if not isinstance(config, dict):
                raise DataError(f"{config_path} must hold a JSON object; delete it or re-save the tokenizer")
        template = (config or {}).get("chat_template")
        if (path.parent / TEMPLATE_FILE).is_file():  # where transformers >= 4.50 saves it
            template = (path.parent / TEMPLATE_FILE).read_text("utf-8")
        if isinstance(template, list):  # transformers' named templates: [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        if template is None and (config is None or _steplab_layout(hf)):
            template = CHAT_TEMPLATE
        if template in LEGACY_TEMPLATES:  # same layout, saved before it carried generation blocks
            template = CHAT_TEMPLATE
        return cls(hf, chat_template=template, config=config)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tokenizer) and self._tok.to_str() == other._tok.to_str()

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size})"


def _steplab_layout(hf) -> bool:
    return all(hf.token_to_id(t) == i for i, t in enumerate(SPECIAL_TOKENS))


def _foreign_specials(hf, config: dict) -> tuple[int, int, int]:
    """(bos, eos, pad) ids of a foreign tokenizer from its tokenizer_config.json. A tokenizer without a BOS (GPT-2)
    starts documents with its EOS, as GPT-2 was trained; one without a pad pads with EOS (padding is masked)."""
    def lookup(key: str) -> int | None:
        value = config.get(key)
        name = value.get("content") if isinstance(value, dict) else value
        if name is None:
            return None
        token_id = hf.token_to_id(name)
        if token_id is None:
            raise DataError(f"tokenizer_config.json: {key}={name!r} is not in the vocabulary of tokenizer.json")
        return token_id

    eos = lookup("eos_token")
    if eos is None:
        raise DataError("this tokenizer has neither steplab's special tokens (ids 0..6) nor an eos_token in its "
                        "tokenizer_config.json; add \"eos_token\" there or train one with `steplab tokenizer train`")
    bos, pad = lookup("bos_token"), lookup("pad_token")
    return (eos if bos is None else bos), eos, (eos if pad is None else pad)


def train_tokenizer(texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2,
                    progress: bool = False) -> Tokenizer:
    """Train a byte-level BPE tokenizer of at most ``vocab_size`` tokens on ``texts``.

    The result can be smaller than ``vocab_size`` when the corpus has too few
    distinct pairs seen ``min_frequency`` times.
    """
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < MIN_VOCAB:
        raise ConfigError(f"vocab_size {vocab_size} is too small: byte-level BPE needs at least {MIN_VOCAB} "
                          f"({len(SPECIAL_TOKENS)} special tokens + 256 bytes); pass --vocab-size {MIN_VOCAB} or more")
    if vocab_size > 2**31 - 1:
        raise ConfigError(f"vocab_size {vocab_size} is too large; pass a value below 2**31")
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=progress)
    hf.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(hf)
