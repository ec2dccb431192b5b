"""Where raw text comes from: one iterator of documents over every kind of source.

Everything downstream (tokenizer training, the train/val split, shard writing) sees
only ``Iterator[str]``, so adding a source kind means adding one generator here.
Sources are read lazily and in a fixed order, so the same call yields the same
documents on every run and every machine: prepare reads a source twice (once to
train the tokenizer, once to encode) instead of holding the corpus in memory.

Source kinds (``source`` argument of :func:`iter_documents`):

- ``"stdlib"``: the running Python's standard library ``.py`` files. Present on every
  machine, so quickstart and tests never need a download.
- a directory: every file below it, sorted by relative path (hidden files/dirs and
  ``__pycache__`` skipped). Each file is one document (big files are cut into chunks).
- ``*.jsonl``: one JSON object per line, text in ``field``.
- ``*.parquet``: text in column ``field``.
- any other single file: UTF-8 text, cut into ~64 KiB documents at paragraph breaks
  (one huge document could not be split into train and val).
- ``"hf:NAME[:CONFIG][@SPLIT]"``: a Hugging Face dataset (``pip install datasets``);
  NAME may be a local directory written by ``Dataset.save_to_disk``.
"""
from __future__ import annotations

import hashlib
import json
import os
import sysconfig
import warnings
from pathlib import Path
from typing import Iterator

from steplab.errors import DataError

CHUNK_CHARS = 64 * 1024  # big text files become documents of about this size
BINARY_SNIFF_BYTES = 8192  # a NUL byte in this prefix marks a file as binary
# Text-like extensions we expect in a corpus folder; other files are accepted too
# when they decode as UTF-8 (the check is on content, the list is documentation).
TEXT_EXTENSIONS = {".txt", ".md", ".py", ".rst", ".json", ".jsonl", ".html", ".htm", ".xml",
                   ".csv", ".tsv", ".c", ".h", ".cpp", ".js", ".ts", ".tex", ".yaml", ".yml", ".toml"}
# Standard-library folders that are test suites or third-party code, not "the stdlib".
STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def iter_documents(source: str, *, field: str = "text", max_bytes: int | None = None,
                   skip_bad: bool = False) -> Iterator[str]:
    """Yield the documents of ``source`` (see the module docstring for the kinds).

    Documents that are empty or only whitespace are dropped. ``max_bytes`` stops after
    that many UTF-8 bytes in total (the last document is cut to fit). ``skip_bad``
    turns unreadable files (binary, not UTF-8) from an error into a warning.
    Raises DataError for a missing path or a source without any text.
    """
    if max_bytes is not None and max_bytes <= 0:
        raise DataError(f"max_bytes must be positive, got {max_bytes}; pass a positive --max-bytes or leave it unset")
    total = 0
    count = 0
    for doc in _raw_documents(source, field=field, skip_bad=skip_bad):
        if not doc.strip():
            continue
        if max_bytes is not None:
            encoded = doc.encode("utf-8")
            if total + len(encoded) > max_bytes:
                # Cut the last document at a character boundary so the total stays ~max_bytes.
                doc = encoded[: max_bytes - total].decode("utf-8", errors="ignore")
                if doc.strip():
                    count += 1
                    yield doc
                return
            total += len(encoded)
        count += 1
        yield doc
        if max_bytes is not None and total >= max_bytes:
            return
    if count == 0:
        raise DataError(f"source {source!r} contains no text (no non-empty documents); "
                        "point --source at a folder or file with text in it")


def split_of(doc: str, val_fraction: float, seed: int = 0) -> str:
    """Return ``"train"`` or ``"val"`` for ``doc``, decided by a hash of its content.

    Hashing (not position) keeps the split stable when the corpus grows or is reordered,
    and identical documents always land on the same side, so val never leaks into train.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}; pass e.g. --val-fraction 0.05")
    h = hashlib.blake2b(doc.encode("utf-8", errors="surrogatepass"), digest_size=8,
                        key=str(seed).encode("utf-8"))
    return "val" if int.from_bytes(h.digest(), "little") / 2.0**64 < val_fraction else "train"


# ---------------------------------------------------------------------------- dispatch


def _raw_documents(source: str, *, field: str, skip_bad: bool) -> Iterator[str]:
    if source == "stdlib":
        yield from _stdlib_documents()
        return
    if source.startswith("hf:"):
        yield from _hf_documents(source[3:], field=field)
        return
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"source {source!r} not found: no such file or directory; pass an existing folder, "
                        "a .jsonl/.parquet/.txt file, 'stdlib', or 'hf:NAME'")
    if path.is_dir():
        yield from _dir_documents(path, skip_bad=skip_bad)
    elif path.suffix.lower() == ".jsonl":
        yield from _jsonl_documents(path, field=field)
    elif path.suffix.lower() == ".parquet":
        yield from _parquet_documents(path, field=field)
    else:
        text = _read_text(path, skip_bad=skip_bad)
        if text is not None:
            yield from chunk_text(text)


# ---------------------------------------------------------------------------- text files


def chunk_text(text: str, chunk_chars: int = CHUNK_CHARS) -> Iterator[str]:
    """Cut ``text`` into pieces of about ``chunk_chars`` at paragraph (else line) breaks.

    The pieces concatenate back to ``text`` exactly; breaks stay with the piece before.
    """
    pos = 0
    while len(text) - pos > 2 * chunk_chars:
        lo, hi = pos + chunk_chars, pos + 2 * chunk_chars
        cut = text.find("\n\n", lo, hi)
        if cut >= 0:
            cut += 2
        else:
            cut = text.find("\n", lo, hi)
            cut = cut + 1 if cut >= 0 else lo
        yield text[pos:cut]
        pos = cut
    if pos < len(text):
        yield text[pos:]


def _read_text(path: Path, *, skip_bad: bool) -> str | None:
    """Read a file as UTF-8; binary or undecodable files raise (or warn and return None)."""
    data = path.read_bytes()
    nul = data.find(b"\x00", 0, BINARY_SNIFF_BYTES)
    if nul >= 0:
        problem = f"looks binary (NUL byte at byte offset {nul})"
    else:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            problem = f"is not UTF-8 text (byte 0x{data[e.start]:02x} at byte offset {e.start})"
    if skip_bad:
        warnings.warn(f"skipping {path}: {problem}", stacklevel=3)
        return None
    raise DataError(f"{path} {problem}; remove the file, convert it to UTF-8, or pass --skip-bad to skip such files")


def _dir_documents(root: Path, *, skip_bad: bool) -> Iterator[str]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Hidden folders (.git, our own .tmp build dirs) and caches are never corpus text.
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__pycache__"]
        files += [Path(dirpath, f) for f in filenames if not f.startswith(".")]
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    for f in files:
        text = _read_text(f, skip_bad=skip_bad)
        if text is not None:
            yield from chunk_text(text)


def _stdlib_documents() -> Iterator[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise DataError(f"Python standard library not found at {root}; pass a folder or file with --source instead")
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        dirnames[:] = [d for d in dirnames if d not in STDLIB_SKIP_DIRS and not d.startswith(".")
                       and not (rel.as_posix() == "lib2to3" and d == "tests")]
        files += [Path(dirpath, f) for f in filenames if f.endswith(".py")]
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    for f in files:
        try:
            yield f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a handful of stdlib files may be latin-1 or unreadable; the corpus is what remains


# ---------------------------------------------------------------------------- records


def _jsonl_documents(path: Path, *, field: str) -> Iterator[str]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DataError(f"{path}:{lineno}: bad JSON ({e}); fix or delete that line") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}; "
                                "each line must be an object like {\"text\": \"...\"}")
            if field not in record:
                raise DataError(f"{path}:{lineno}: no field {field!r} (fields present: {sorted(record)}); "
                                "pass --field with one of those")
            value = record[field]
            if value is None:
                continue
            if not isinstance(value, str):
                raise DataError(f"{path}:{lineno}: field {field!r} is {type(value).__name__}, not a string; "
                                "pass --field naming a text field")
            yield value


def _parquet_documents(path: Path, *, field: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: cannot read as Parquet ({e}); check the file or re-export it") from None
    columns = pf.schema_arrow.names
    if field not in columns:
        raise DataError(f"{path}: no column {field!r} (columns: {columns}); pass --field with one of those")
    if not pa.types.is_string(pf.schema_arrow.field(field).type) and \
            not pa.types.is_large_string(pf.schema_arrow.field(field).type):
        raise DataError(f"{path}: column {field!r} has type {pf.schema_arrow.field(field).type}, not string; "
                        "pass --field naming a text column")
    for batch in pf.iter_batches(batch_size=1024, columns=[field]):
        for value in batch.column(0).to_pylist():
            if value is not None:
                yield value


def hf_dataset(spec: str):
    """The rows of ``NAME[:CONFIG][@SPLIT]`` (a datasets Dataset or IterableDataset) and NAME; NAME may be a
    ``save_to_disk`` folder (works offline). DataError with what to do when it cannot be loaded."""
    try:
        import datasets
    except ImportError:
        raise DataError("source 'hf:...' needs the Hugging Face datasets library; run `pip install datasets` "
                        "or export the data to .jsonl/.parquet") from None
    split = "train"
    if "@" in spec:
        spec, split = spec.rsplit("@", 1)
    name, config = spec, None
    if not Path(name).expanduser().is_dir() and ":" in name:
        name, config = name.split(":", 1)
    if not name:
        raise DataError(f"bad source 'hf:{spec}': expected hf:NAME[:CONFIG][@SPLIT], e.g. hf:roneneldan/TinyStories")
    local = Path(name).expanduser()
    if local.is_dir():
        try:
            ds = datasets.load_from_disk(str(local))
        except Exception as e:  # the library raises several unrelated types here
            raise DataError(f"{local}: not a dataset saved with save_to_disk ({e}); "
                            "pass a folder written by Dataset.save_to_disk") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{local}: no split {split!r} (splits: {list(ds)}); add @SPLIT to the source")
            ds = ds[split]
    else:
        offline = bool(datasets.config.HF_HUB_OFFLINE or datasets.config.HF_DATASETS_OFFLINE)
        try:
            # Online we stream, so max_bytes can stop early without downloading the whole dataset;
            # offline streaming is impossible, so we read the local cache.
            ds = datasets.load_dataset(name, config, split=split, streaming=not offline)
        except Exception as e:
            where = "offline and not in the local cache" if offline else "could not be loaded"
            raise DataError(f"hf dataset {name!r} {where} ({type(e).__name__}: {str(e)[:200]}); download it into "
                            "the HF cache (HF_HOME) first, or save it with Dataset.save_to_disk and pass hf:/that/dir") from None
    return ds, name


def _hf_documents(spec: str, *, field: str) -> Iterator[str]:
    ds, name = hf_dataset(spec)
    columns = ds.column_names
    if columns is not None and field not in columns:
        raise DataError(f"hf dataset {name!r}: no column {field!r} (columns: {columns}); pass --field with one of those")
    for row in ds:
        value = row.get(field)
        if isinstance(value, str):
            yield value
        elif value is not None:
            raise DataError(f"hf dataset {name!r}: column {field!r} holds {type(value).__name__}, not text; "
                            "pass --field naming a text column")
