"""Where conversations come from: JSONL, Parquet, Hugging Face datasets, or the built-in multi-task chat set.

Every source yields OpenAI-format conversations (``[{"role": ..., "content": ...}, ...]``) checked by
``steplab.data.chat.check_messages``:

- ``FILE.jsonl``: one JSON object per line with the list in ``field`` (default ``messages``);
- ``FILE.parquet``: a column ``field`` of lists of {role, content} structs;
- ``hf:NAME[:CONFIG][@SPLIT]``: a Hugging Face dataset with that column (NAME may be a ``save_to_disk`` folder:
  works offline);
- ``builtin``: the chat tasks of ``steplab.tasks`` mixed by :data:`BUILTIN_MIX` (no download), train side only
  (:func:`builtin_conversations` gives the held-out side for validation).

A bad row is an error naming the file and line (row) and what is wrong; with ``skip_bad`` it is skipped and
counted in ``SourceStats.skipped`` instead, never dropped silently.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from steplab.data.chat import check_messages
from steplab.data.sources import split_of
from steplab.errors import ConfigError, DataError

# Task -> weight in the built-in chat set (the tasks' train splits; their test splits are the eval sets).
BUILTIN_MIX: dict[str, float] = {"arithmetic": 2.0, "add2": 2.0, "spelling": 2.0, "letter_count": 2.0,
                                 "recall": 2.0, "identity": 0.5, "corpus_qa": 0.5, "repeat": 0.0}
VAL_FRACTION = 0.05  # file sources: conversations held out for validation (by a hash of the conversation)


@dataclass
class SourceStats:
    read: int = 0
    skipped: int = 0  # bad rows skipped with skip_bad


def iter_conversations(source: str, *, field: str = "messages", skip_bad: bool = False,
                       stats: SourceStats | None = None) -> Iterator[list[dict[str, str]]]:
    """The conversations of a file or HF dataset, in file order (see the module docstring)."""
    stats = stats if stats is not None else SourceStats()
    if source.startswith("hf:"):
        rows = _hf_rows(source[3:], field)
    else:
        path = Path(source)
        if not path.is_file():
            raise DataError(f"chat data {source} does not exist; pass a .jsonl or .parquet file, hf:NAME, or builtin")
        if path.suffix.lower() == ".jsonl":
            rows = _jsonl_rows(path, field)
        elif path.suffix.lower() == ".parquet":
            rows = _parquet_rows(path, field)
        else:
            raise DataError(f"chat data {source}: unknown file type {path.suffix!r}; use .jsonl or .parquet")
    for where, row in rows:
        try:
            if isinstance(row, DataError):
                raise row
            msgs = check_messages(row, where)
            if not any(m["role"] == "assistant" for m in msgs):
                raise DataError(f"{where}: the conversation has no assistant message, so nothing to learn")
        except DataError:
            if not skip_bad:
                raise
            stats.skipped += 1
            continue
        stats.read += 1
        yield msgs


def _jsonl_rows(path: Path, field: str):
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                yield where, DataError(f"{where}: bad JSON ({e}); fix or delete that line, or pass --skip-bad")
                continue
            if isinstance(record, dict) and field not in record:
                yield where, DataError(f"{where}: no field {field!r} (fields: {sorted(record)}); each line must "
                                       f"be like {{\"{field}\": [{{\"role\": \"user\", \"content\": \"...\"}}, ...]}}")
                continue
            yield where, record[field] if isinstance(record, dict) else record


def _parquet_rows(path: Path, field: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: cannot read as Parquet ({e}); check the file or re-export it") from None
    if field not in pf.schema_arrow.names:
        raise DataError(f"{path}: no column {field!r} (columns: {pf.schema_arrow.names}); pass --field")
    row = 0
    for batch in pf.iter_batches(batch_size=1024, columns=[field]):
        for value in batch.column(0).to_pylist():
            row += 1
            yield f"{path} row {row}", value


def _hf_rows(spec: str, field: str):
    from steplab.data.sources import hf_dataset

    ds, name = hf_dataset(spec)
    if ds.column_names is not None and field not in ds.column_names:
        raise DataError(f"hf dataset {name!r}: no column {field!r} (columns: {ds.column_names}); pass --field")
    for i, row in enumerate(ds, start=1):
        yield f"hf dataset {name} row {i}", row.get(field)


def split_conversation(msgs: list[dict[str, str]], fraction: float = VAL_FRACTION) -> str:
    """"val" or "train" for a file conversation, by a hash of its content (identical ones land together)."""
    return split_of(json.dumps(msgs, sort_keys=True, ensure_ascii=False), fraction)


# ---- the built-in chat set ---------------------------------------------------------------------------------

def parse_mix(spec: str) -> dict[str, float]:
    """``"spelling=3,recall=3"`` -> BUILTIN_MIX with those weights replaced (0 drops a task); ConfigError naming
    the fault (``data.chat.tasks``)."""
    mix = dict(BUILTIN_MIX)
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, weight = part.partition("=")
        name = name.strip()
        try:
            value = float(weight)
        except ValueError:
            value = float("nan")
        if name not in BUILTIN_MIX or not (0 <= value < float("inf")):
            raise ConfigError(f"data.chat.tasks: {part!r} must be TASK=WEIGHT with a weight >= 0 and TASK one of "
                              f"{', '.join(sorted(BUILTIN_MIX))}")
        mix[name] = value
    if not any(mix.values()):
        raise ConfigError(f"data.chat.tasks={spec!r} gives every task weight 0; keep at least one")
    return {k: v for k, v in mix.items() if v > 0}


def builtin_conversations(split: str = "train", seed: int = 0,
                          mix: dict[str, float] | None = None) -> Iterator[list[dict[str, str]]]:
    """An endless seeded stream of conversations from the chat tasks' ``split`` ("train" or "test")."""
    from steplab.tasks import get_task

    mix = mix or BUILTIN_MIX
    names = sorted(n for n in mix if mix[n] > 0)
    tasks = [get_task(n) for n in names]
    streams = [_task_stream(t, split, seed) for t in tasks]
    weights = [mix[n] for n in names]
    rng = random.Random(f"builtin:{split}:{seed}")
    while True:
        k = rng.choices(range(len(tasks)), weights)[0]
        yield tasks[k].conversation(next(streams[k]))


def _task_stream(task, split: str, seed: int):
    """A task's items of one split forever: a finite pool reshuffled each epoch, an endless generator filtered."""
    if task.finite:
        epoch = 0
        while True:
            items = task.items(split, None, seed=seed * 1000 + epoch)
            if not items:
                raise DataError(f"task {task.name!r} has no {split} items")
            yield from items
            epoch += 1
    for item in task.candidates(seed):
        if task.split_of(item) == split:
            yield item
