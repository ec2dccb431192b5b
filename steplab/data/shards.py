"""Token shards on disk: flat little-endian integer arrays, read back through np.memmap.

Why raw arrays and not a container format: a shard is memory-mapped in microseconds,
the OS page cache shares it between processes (data-parallel ranks, eval), and any
tool can read it (``np.fromfile(path, "<u2")``). ``index.json`` records the dtype and
each shard's token count, so truncated or missing files are caught on open instead of
turning into silent garbage mid-run.

Layout of a shard folder::

    index.json        {"format", "dtype", "shards": [{"file", "tokens", "bytes"}], "total_tokens", "documents"}
    shard_00000.bin   tokens of concatenated documents (the caller adds bos/eos)
    shard_00001.bin   ...
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np

from steplab.errors import DataError
from steplab.utils import atomic_write, atomic_write_json

INDEX = "index.json"
FORMAT = "steplab-shards-v1"
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


def dtype_for_vocab(vocab_size: int) -> str:
    """The smallest dtype that holds every token id (uint16 halves disk and page-cache use)."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


class ShardWriter:
    """Append documents; full shards go to disk as they fill, ``close()`` writes the index.

    A push-style writer lets one pass over a corpus feed several outputs (train and val).
    Every file is written to a temp name and renamed, so a crash never leaves a torn shard.
    """

    def __init__(self, out_dir: str | Path, *, dtype: str = "uint16", shard_tokens: int = 2**24) -> None:
        if dtype not in DTYPES:
            raise DataError(f"unknown shard dtype {dtype!r}; use one of {sorted(DTYPES)}")
        if shard_tokens <= 0:
            raise DataError(f"shard_tokens must be positive, got {shard_tokens}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.dtype = dtype
        self.np_dtype = DTYPES[dtype]
        self.max_id = np.iinfo(self.np_dtype).max
        self.shard_tokens = shard_tokens
        self.shards: list[dict] = []
        self.documents = 0
        self.total_tokens = 0
        self._buf: list[np.ndarray] = []
        self._buffered = 0

    def add(self, tokens: list[int] | np.ndarray) -> None:
        arr = np.asarray(tokens, dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() > self.max_id):
            raise DataError(f"token id out of range for {self.dtype} shards (min {arr.min()}, max {arr.max()}) "
                            f"in {self.out_dir}; use dtype uint32 or a smaller vocabulary")
        self.documents += 1
        if arr.size == 0:
            return
        self._buf.append(arr.astype(self.np_dtype))
        self._buffered += arr.size
        self.total_tokens += arr.size
        while self._buffered >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def _flush(self, n: int) -> None:
        flat = np.concatenate(self._buf) if len(self._buf) > 1 else self._buf[0]
        shard, rest = flat[:n], flat[n:]
        self._buf, self._buffered = ([rest] if rest.size else []), rest.size
        name = f"shard_{len(self.shards):05d}.bin"
        atomic_write(self.out_dir / name, lambda tmp: shard.tofile(tmp))
        self.shards.append({"file": name, "tokens": int(shard.size), "bytes": int(shard.nbytes)})

    def close(self) -> dict:
        """Flush the last partial shard and write index.json; returns the index."""
        if self._buffered:
            self._flush(self._buffered)
        index = {"format": FORMAT, "dtype": self.dtype, "shards": self.shards,
                 "total_tokens": int(self.total_tokens), "documents": int(self.documents)}
        atomic_write_json(self.out_dir / INDEX, index)
        return index


def write_shards(token_docs: Iterable[list[int]], out_dir: str | Path, *, dtype: str | None = None,
                 vocab_size: int | None = None, shard_tokens: int = 2**24) -> dict:
    """Write documents (lists of token ids) into ``out_dir`` as shards + index.json; return the index.

    ``dtype`` defaults to the smallest that fits ``vocab_size`` (uint32 when neither is given).
    """
    if dtype is None:
        dtype = dtype_for_vocab(vocab_size) if vocab_size is not None else "uint32"
    writer = ShardWriter(out_dir, dtype=dtype, shard_tokens=shard_tokens)
    for doc in token_docs:
        writer.add(doc)
    return writer.close()


class ShardSet:
    """Read-only view of a shard folder as one long token sequence.

    ``len(shardset)`` is the token count; ``get(start, length)`` returns a copy that may
    span shard boundaries. Opening checks every shard's size against the index.
    """

    def __init__(self, shard_dir: str | Path) -> None:
        self.path = Path(shard_dir)
        index_path = self.path / INDEX
        if not index_path.is_file():
            raise DataError(f"{self.path} is not a token shard folder (no {INDEX}); "
                            "run `steplab data prepare --source ... --out DIR` to create one")
        try:
            index = json.loads(index_path.read_text("utf-8"))
            self.dtype: str = index["dtype"]
            entries = [(e["file"], int(e["tokens"])) for e in index["shards"]]
            self.documents = int(index.get("documents", 0))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise DataError(f"{index_path} is corrupt ({type(e).__name__}: {e}); "
                            "re-run `steplab data prepare` to rebuild it") from None
        if self.dtype not in DTYPES:
            raise DataError(f"{index_path}: unknown dtype {self.dtype!r}; re-run `steplab data prepare`")
        np_dtype = DTYPES[self.dtype]
        self._maps: list[np.memmap] = []
        for name, tokens in entries:
            f = self.path / name
            if not f.is_file():
                raise DataError(f"shard {f} listed in {INDEX} is missing; re-run `steplab data prepare` to rebuild it")
            expected, actual = tokens * np_dtype.itemsize, f.stat().st_size
            if actual != expected:
                raise DataError(f"shard {f} has {actual} bytes, expected {expected} ({tokens} tokens of {self.dtype}); "
                                "it is truncated or was changed, re-run `steplab data prepare` to rebuild it")
            if tokens:
                self._maps.append(np.memmap(f, dtype=np_dtype, mode="r", shape=(tokens,)))
        sizes = [len(m) for m in self._maps]
        # _starts[i] is the global offset of shard i; the final entry is the total.
        self._starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)
        self.total_tokens = int(self._starts[-1])

    def __len__(self) -> int:
        return self.total_tokens

    def __repr__(self) -> str:
        return f"ShardSet({str(self.path)!r}, tokens={self.total_tokens}, shards={len(self._maps)}, dtype={self.dtype})"

    @property
    def tokens(self) -> np.ndarray:
        """All tokens as one array: the memmap itself for one shard, else a concatenated copy in RAM."""
        if len(self._maps) == 1:
            return self._maps[0]
        if not self._maps:
            return np.zeros(0, dtype=DTYPES[self.dtype])
        return np.concatenate(self._maps)

    def get(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` as a fresh array (crossing shards if needed)."""
        if start < 0 or length < 0 or start + length > self.total_tokens:
            raise IndexError(f"tokens [{start}, {start + length}) out of range for {self.total_tokens} tokens")
        if length == 0:
            return np.zeros(0, dtype=DTYPES[self.dtype])
        i = int(np.searchsorted(self._starts, start, side="right")) - 1
        offset = start - int(self._starts[i])
        if offset + length <= len(self._maps[i]):
            return np.array(self._maps[i][offset:offset + length])  # common case: one shard
        parts, need = [], length
        while need > 0:
            m = self._maps[i]
            take = min(need, len(m) - offset)
            parts.append(m[offset:offset + take])
            need -= take
            i, offset = i + 1, 0
        return np.concatenate(parts)
