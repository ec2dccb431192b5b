"""``steplab data prepare``: raw source -> tokenizer + train/val token shards + meta.json.

Output folder::

    tokenizer/   tokenizer.json, tokenizer_config.json, special_tokens_map.json
    train/       index.json + shard_*.bin   (each document as [bos] + ids + [eos])
    val/         index.json + shard_*.bin
    meta.json    source, vocab_size, and per split: documents, tokens, bytes

Why these choices:
- The split is by document hash (``split_of``), so val text is never seen in training,
  not even by the tokenizer, which is trained on train documents only.
- ``bytes`` counts the UTF-8 bytes of the raw text, so eval can report bits per byte,
  which compares across tokenizers where loss per token does not.
- The source is streamed twice (train tokenizer, then encode) rather than held in RAM.
- Everything is built in a hidden temp folder beside ``out_dir`` and renamed into place
  at the end: a failure leaves no half-written dataset and never harms an old one.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Iterable, Iterator

from tqdm.auto import tqdm

from steplab.data.shards import ShardSet, ShardWriter, dtype_for_vocab
from steplab.data.sources import iter_documents, split_of
from steplab.data.tokenizer import Tokenizer, train_tokenizer
from steplab.errors import DataError
from steplab.utils import atomic_write_json

META = "meta.json"
FORMAT = "steplab-data-v1"
ENCODE_CHUNK_CHARS = 4_000_000  # docs are encoded in batches of about this much text


def assign_splits(docs: Iterable[str], val_fraction: float, seed: int = 0) -> Iterator[tuple[str, str]]:
    """Yield ``(split, doc)``; if hashing puts no document in val, the last one goes there.

    One document of lookahead is enough for that guarantee, so this stays streaming
    and gives the same answer on both passes over the source.
    """
    prev: tuple[str, str] | None = None
    seen_val = False
    for doc in docs:
        if prev is not None:
            yield prev
        split = split_of(doc, val_fraction, seed)
        seen_val = seen_val or split == "val"
        prev = (split, doc)
    if prev is not None:
        yield ("val", prev[1]) if not seen_val else prev


def prepare_data(source: str, out_dir: str | os.PathLike, *, vocab_size: int = 4096, val_fraction: float = 0.05,
                 field: str = "text", max_bytes: int | None = None, tokenizer_dir: str | None = None,
                 seed: int = 0, skip_bad: bool = False, force: bool = False, progress: bool = True) -> dict:
    """Build a prepared dataset in ``out_dir`` and return its meta dict (also in meta.json)."""
    t0 = time.time()
    out = Path(out_dir).expanduser()
    _check_output(out, source, force)
    split_of("", val_fraction)  # validate val_fraction before any work

    def documents(desc: str) -> Iterator[tuple[str, str]]:
        docs = iter_documents(source, field=field, max_bytes=max_bytes, skip_bad=skip_bad)
        bar = tqdm(total=max_bytes, unit="B", unit_scale=True, desc=desc, disable=not progress, leave=False)
        with bar:
            for split, doc in assign_splits(docs, val_fraction, seed):
                bar.update(len(doc.encode("utf-8")))
                yield split, doc

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        # Pass 1: the tokenizer, trained on train documents only.
        if tokenizer_dir is not None:
            tok = Tokenizer.load(tokenizer_dir)
        else:
            tok = train_tokenizer((d for s, d in documents("read (tokenizer)") if s == "train"), vocab_size,
                                  progress=progress)
        tok.save(tmp / "tokenizer")

        # Pass 2: encode every document as [bos] + ids + [eos] into its split's shards.
        dtype = dtype_for_vocab(tok.vocab_size)
        writers = {s: ShardWriter(tmp / s, dtype=dtype) for s in ("train", "val")}
        stats = {s: {"documents": 0, "tokens": 0, "bytes": 0} for s in ("train", "val")}
        batch: list[tuple[str, str]] = []
        batch_chars = 0

        def flush() -> None:
            for (split, doc), ids in zip(batch, tok.encode_batch([d for _, d in batch])):
                writers[split].add([tok.bos_id] + ids + [tok.eos_id])
                st = stats[split]
                st["documents"] += 1
                st["tokens"] += len(ids) + 2
                st["bytes"] += len(doc.encode("utf-8"))
            batch.clear()

        for split, doc in documents("encode"):
            batch.append((split, doc))
            batch_chars += len(doc)
            if batch_chars >= ENCODE_CHUNK_CHARS:
                flush()
                batch_chars = 0
        flush()
        for w in writers.values():
            w.close()
        if stats["train"]["documents"] == 0:
            raise DataError(f"source {source!r} gave {stats['val']['documents']} document(s) and none went to train; "
                            "add more text or lower --val-fraction")

        meta = {
            "format": FORMAT, "source": source, "field": field, "max_bytes": max_bytes, "seed": seed,
            "val_fraction": val_fraction, "tokenizer": tokenizer_dir or "trained", "vocab_size": tok.vocab_size,
            "dtype": dtype, "bos_id": tok.bos_id, "eos_id": tok.eos_id,
            "train": stats["train"], "val": stats["val"], "seconds": round(time.time() - t0, 2),
        }
        atomic_write_json(tmp / META, meta)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _check_output(out: Path, source: str, force: bool) -> None:
    """Refuse to clobber anything that is not an old prepared dataset, and never without --force."""
    src = Path(source).expanduser()
    if src.is_dir() and out.resolve().is_relative_to(src.resolve()):
        raise DataError(f"output {out} is inside the source folder {src}, so it would be read as corpus; "
                        "pass an --out outside the source")
    if not out.exists():
        return
    if not out.is_dir():
        raise DataError(f"output {out} exists and is a file; pass another --out")
    if not any(out.iterdir()):
        return
    if not force:
        raise DataError(f"output {out} already exists and is not empty; pass --force to replace it or another --out")
    if not (out / META).is_file():
        raise DataError(f"output {out} is not a prepared dataset (no {META}), so --force will not delete it; "
                        "pass another --out or remove it yourself")


def _replace_dir(new: Path, out: Path) -> None:
    """Rename ``new`` onto ``out``; an old ``out`` is moved aside first and deleted only after."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
        os.replace(out, old)
        try:
            os.replace(new, out)
        except BaseException:
            os.replace(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, out)


def load_prepared(out_dir: str | os.PathLike) -> tuple[Tokenizer, ShardSet, ShardSet, dict]:
    """Open a folder made by :func:`prepare_data`: (tokenizer, train shards, val shards, meta)."""
    d = Path(out_dir).expanduser()
    meta_path = d / META
    if not meta_path.is_file():
        raise DataError(f"{d} is not a prepared dataset (no {META}); "
                        "create it with `steplab data prepare --source ... --out DIR`")
    try:
        meta = json.loads(meta_path.read_text("utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{meta_path} is corrupt ({e}); re-run `steplab data prepare`") from None
    tok = Tokenizer.load(d / "tokenizer")
    return tok, ShardSet(d / "train"), ShardSet(d / "val"), meta
