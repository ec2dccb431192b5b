"""Data kind "chat": packed conversations for the one trainer (``steplab sft``).

Each batch is ``(x, y)``: ``batch_size`` rows of ``seq_len`` tokens, packed BOS-aligned best fit by
``steplab.data.chat.Packer``; ``y`` holds the next token where it is an assistant token (the chat template's
mask, never re-derived here) and ``IGNORE_INDEX`` elsewhere. With ``data.chat.mask=false`` every token but
padding is a target (the masking ablation). Validation batches are always masked: their loss is the
assistant-token loss, comparable between masked and unmasked runs.

The row stream is a deterministic function of (source, seed), so the resume state is just the number of rows
served (and the pretraining loader's state when mixing): a resumed run replays the stream to that row.
"""
from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Iterator

import torch

from steplab.data.chat import IGNORE_INDEX, Packer, PackStats, render, targets
from steplab.data.conversations import (SourceStats, builtin_conversations, iter_conversations, parse_mix,
                                        split_conversation)
from steplab.errors import ConfigError, DataError

PACK_BUFFER = 256  # conversations waiting for a row (best fit chooses among them)


class ChatData:
    """TrainData for conversations: ``source`` is "builtin", a .jsonl/.parquet file, or "hf:NAME"."""

    def __init__(self, source: str, tokenizer, seq_len: int, batch_size: int, *, seed: int = 0, mask: bool = True,
                 field: str = "messages", skip_bad: bool = False, eval_rows: int = 64, tokenizer_dir: Path | None = None,
                 mix_loader=None, mix_rows: int = 0, tasks: str = "") -> None:
        if not source:
            raise ConfigError("chat data needs data.path: builtin, a .jsonl/.parquet file of conversations, or hf:NAME")
        if mix_rows >= batch_size:
            raise ConfigError(f"data.chat.mix_fraction leaves no chat rows in a batch of {batch_size}; lower it")
        self.source, self.tokenizer, self.seq_len, self.batch_size = source, tokenizer, seq_len, batch_size
        self.seed, self.mask, self.field, self.skip_bad = seed, mask, field, skip_bad
        self.eval_rows = eval_rows
        self.vocab_size = tokenizer.vocab_size
        self.special_tokens = len(tokenizer.special_ids)
        self.tokenizer_dir = tokenizer_dir
        self.tokens_per_batch = batch_size * seq_len
        self.mix_loader, self.mix_rows = mix_loader, mix_rows
        if tasks and source != "builtin":
            raise ConfigError(f"data.chat.tasks weights the builtin chat set; data.path={source} is a file of conversations")
        self.task_mix = parse_mix(tasks) if source == "builtin" else None
        self.source_stats = SourceStats()
        self._file_train: list | None = None
        self._file_val: list | None = None
        if source != "builtin":
            self._load_file()
        self.rows_served = 0
        self._start()

    # -- conversations
    def _load_file(self) -> None:
        train, val = [], []
        for msgs in iter_conversations(self.source, field=self.field, skip_bad=self.skip_bad, stats=self.source_stats):
            (val if split_conversation(msgs) == "val" else train).append(msgs)
        if not train:
            raise DataError(f"{self.source}: no training conversations (read {self.source_stats.read}, "
                            f"skipped {self.source_stats.skipped}, held out {len(val)})")
        self._file_train, self._file_val = train, val or train[:1]

    def _conversations(self, split: str) -> Iterator[list[dict[str, str]]]:
        if self.source == "builtin":
            return builtin_conversations("train" if split == "train" else "test", self.seed, self.task_mix)
        if split != "train":
            return iter(self._file_val)

        def epochs():
            for epoch in itertools.count():
                order = list(self._file_train)
                random.Random(f"{self.seed}:{epoch}").shuffle(order)
                yield from order
        return epochs()

    def _rendered(self, split: str, mask: bool):
        for msgs in self._conversations(split):
            ids, m = render(msgs, self.tokenizer)
            yield ids, (m if mask else [1] * len(ids))

    def _start(self) -> None:
        self.packer = Packer(self.seq_len + 1, self.tokenizer.pad_id, buffer=PACK_BUFFER)
        self._rows = self.packer.rows(self._rendered("train", self.mask))

    @property
    def pack_stats(self) -> PackStats:
        return self.packer.stats

    # -- TrainData
    def _tensors(self, rows: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = zip(*(targets(ids, m) for ids, m in rows))
        return torch.tensor(xs, dtype=torch.long), torch.tensor(ys, dtype=torch.long)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.batch_size - self.mix_rows
        x, y = self._tensors([next(self._rows) for _ in range(n)])
        self.rows_served += n
        if self.mix_rows:
            mx, my = self.mix_loader.next_batch()
            x, y = torch.cat([x, mx]), torch.cat([y, my])
        return x, y

    def state_dict(self) -> dict:
        state = {"rows": self.rows_served, "seed": self.seed, "source": self.source}
        if self.mix_loader is not None:
            state["mix"] = self.mix_loader.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        if state.get("source", self.source) != self.source or int(state.get("seed", self.seed)) != self.seed:
            raise DataError(f"chat data state was saved for {state.get('source')!r} seed {state.get('seed')}, not "
                            f"{self.source!r} seed {self.seed}; resume with the same data or start fresh")
        self._start()
        for _ in range(int(state["rows"])):  # the stream is deterministic: replay it to the saved row
            next(self._rows)
        self.rows_served = int(state["rows"])
        if self.mix_loader is not None and "mix" in state:
            self.mix_loader.load_state_dict(state["mix"])

    def evaluate(self, model: torch.nn.Module, device: str, dtype: str) -> dict[str, float]:
        """Assistant-token loss over :meth:`eval_batches`, in nats per trained token (summed, not batch means)."""
        import torch.nn.functional as F

        was_training = model.training
        model.eval()
        nats, n = 0.0, 0
        device_type = torch.device(device).type
        try:
            with torch.no_grad(), torch.autocast(device_type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
                for x, y in self.eval_batches():
                    x, y = x.to(device), y.to(device)
                    logits = model(x)
                    nats += float(F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum",
                                                  ignore_index=IGNORE_INDEX))
                    n += int((y != IGNORE_INDEX).sum())
        finally:
            model.train(was_training)
        if n == 0:
            raise DataError(f"{self.source}: the held-out conversations have no assistant tokens to evaluate")
        return {"val_loss": nats / n, "val_tokens": n}

    def eval_batches(self):
        """Held-out conversations (the tasks' test splits, or the file's hashed 5%), masked, the same every call."""
        if not hasattr(self, "_eval"):
            packer = Packer(self.seq_len + 1, self.tokenizer.pad_id, buffer=PACK_BUFFER)
            rows = list(itertools.islice(packer.rows(self._rendered("val", True)), self.eval_rows))
            self._eval = [self._tensors(rows[i:i + self.batch_size]) for i in range(0, len(rows), self.batch_size)]
        return list(self._eval)


def build_chat_data(cfg) -> ChatData:
    """The trainer's builder for data kind "chat" (``steplab.train.data.DATA_MODULES``)."""
    from steplab.data.tokenizer import Tokenizer

    c = cfg.data.chat
    if c.tokenizer:
        tok_dir = Path(c.tokenizer)
    elif cfg.train.init_from:
        src = Path(cfg.train.init_from)
        tok_dir = (src.parent.parent if (src / "state.json").is_file() else src) / "tokenizer"
    else:
        raise ConfigError("chat data needs a tokenizer: set train.init_from to the base run (steplab sft --from RUN) "
                          "or data.chat.tokenizer to a tokenizer directory")
    tokenizer = Tokenizer.load(tok_dir)
    mix_loader, mix_rows = None, 0
    if c.mix_fraction > 0:
        if not c.mix_path:
            raise ConfigError("data.chat.mix_fraction > 0 needs data.chat.mix_path (a prepared pretraining dataset)")
        from steplab.data.loader import TokenLoader
        from steplab.data.prepare import load_prepared

        mix_tok, shards, _, _ = load_prepared(c.mix_path)
        if mix_tok != tokenizer:
            raise ConfigError(f"data.chat.mix_path={c.mix_path} was tokenized with another tokenizer than {tok_dir}")
        mix_rows = max(1, round(c.mix_fraction * cfg.train.batch_size))
        mix_loader = TokenLoader(shards, cfg.data.seq_len, mix_rows, seed=cfg.train.seed)
    return ChatData(cfg.data.path, tokenizer, cfg.data.seq_len, cfg.train.batch_size, seed=cfg.train.seed,
                    mask=c.mask, field=c.field, skip_bad=c.skip_bad, tokenizer_dir=tok_dir,
                    eval_rows=cfg.train.eval_batches * cfg.train.batch_size, mix_loader=mix_loader, mix_rows=mix_rows,
                    tasks=c.tasks)
