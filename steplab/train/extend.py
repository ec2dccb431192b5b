"""Context extension: continued training of a run at a longer length with a scaled RoPE (``steplab extend``).

The recipe (YaRN paper, section 4): take a trained run, switch its RoPE to a scaling with factor s over the
trained length L (``model.rope``), and keep training at length s*L on long documents for a few hundred steps.
Everything after the data is the one trainer's job (``train.trainer.train`` with ``train.init_from``), so
checkpoints, exact resume, metrics and the summary are those of any run.

Data: ``build_long_dataset`` turns a prepared dataset into rows of exactly the new length. The corpus part is
whole documents of at least ``min_doc_tokens`` (e.g. Python modules), concatenated and cut into rows, so a
row holds the end of one document and the start of the next: ``model.doc_mask_token`` = <|bos|> keeps
attention inside each document (a block-diagonal causal mask). An optional share of passkey documents
(``tasks/passkey.py``, train keys only) teaches retrieval at the new length.

Learning rate and batch (the lab's rules): continued training is a short fine-tune of a converged model, so
we keep the base run's peak lr scaled by 1/sqrt(s)... see ``extension_hparams`` for the reasoning it prints.
"""
from __future__ import annotations

import copy
import json
import math
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from steplab.config import RunConfig
from steplab.data.prepare import META, load_prepared
from steplab.data.shards import dtype_for_vocab, write_shards
from steplab.errors import ConfigError, DataError
from steplab.tasks.passkey import Passkey
from steplab.utils import atomic_write_json

METHODS = {"yarn": "yarn", "pi": "linear", "ntk": "dynamic", "llama3": "llama3"}


def build_long_dataset(source: str | Path, out: str | Path, length: int, *, passkey_fraction: float = 0.0,
                       min_doc_tokens: int = 0, max_tokens: int | None = None, seed: int = 0) -> dict:
    """Write a prepared dataset of ``length``-token rows (corpus rows of packed long documents, and passkey
    rows in the share ``passkey_fraction``); validation is the source's held-out split. Returns its meta."""
    if not 0.0 <= passkey_fraction < 1.0:
        raise ConfigError(f"passkey fraction {passkey_fraction} must be in [0, 1)")
    tok, train, val, meta = load_prepared(source)
    tokens = np.asarray(train.tokens)
    starts = np.flatnonzero(tokens == tok.bos_id).tolist() + [len(tokens)]
    docs = [(a, b) for a, b in zip(starts[:-1], starts[1:]) if b - a >= max(min_doc_tokens, 1)]
    if not docs:
        raise DataError(f"{source} has no document of at least {min_doc_tokens} tokens; lower the minimum or bring longer documents")
    stream = np.concatenate([tokens[a:b] for a, b in docs])
    budget = len(stream) if max_tokens is None else min(len(stream), int(max_tokens * (1 - passkey_fraction)))
    n_corpus = budget // length
    if n_corpus < 1:
        raise DataError(f"{source}: {len(stream)} tokens in documents of >= {min_doc_tokens} tokens make no row of {length}")
    rows = [stream[i * length:(i + 1) * length] for i in range(n_corpus)]
    n_passkey = int(round(n_corpus * passkey_fraction / (1 - passkey_fraction)))
    if n_passkey:
        rows += [np.asarray(d) for d in Passkey(tok).documents(n_passkey, length, seed)]
    order = np.random.default_rng(seed).permutation(len(rows))
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise DataError(f"output {out} already exists and is not empty; choose another directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        dtype = dtype_for_vocab(tok.vocab_size)
        write_shards((rows[i].tolist() for i in order), tmp / "train", dtype=dtype)
        shutil.copytree(val.path, tmp / "val")
        shutil.copytree(Path(source) / "tokenizer", tmp / "tokenizer")
        new = dict(meta, source=f"long:{source}", row_tokens=length, passkey_fraction=passkey_fraction,
                   min_doc_tokens=min_doc_tokens, corpus_rows=n_corpus, passkey_rows=n_passkey, long_documents=len(docs))
        new["train"] = {"documents": len(rows), "tokens": len(rows) * length, "bytes": meta["train"]["bytes"]}
        atomic_write_json(tmp / META, new)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return new
