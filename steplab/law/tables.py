"""Runs tables: read our own CSV/JSONL runs tables and the public scaling suites into one shape.

A ``RunsTable`` is a dict of numpy arrays under canonical names, so every fit reads the same columns
whatever the source:

    N               parameters the law is fitted in (non-embedding where the source reports it)
    N_total         all parameters, where the source reports them separately
    N_active        active parameters per token (MoE)
    n_experts, top_k  the MoE layout (routed experts, experts per token; 0 for dense), where given
    D               training tokens
    C               training FLOPs; 6*N*D when the source gives none
    budget          nominal compute of the run's IsoFLOP group, where the source has one
    loss            the loss to fit (smoothed final training loss where the source has it)
    loss_raw        the unsmoothed loss, where both exist
    lr              peak learning rate
    batch_tokens    batch size in tokens (batch_sequences * seq_len when given in sequences)
    batch_sequences, seq_len
    dataset, label  strings: which data distribution / which run

Each adapter is a declarative mapping from canonical names to candidate source columns (first one present
wins) plus an optional clean-up step; ``columns={"loss": "loss_openlm"}`` overrides any entry, and
``where={"dataset": "rpj"}`` keeps matching rows. Missing or unparsable cells become NaN here; the fits
decide what to do about them (``RunsTable.invalid``), so loading never silently drops a run.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from steplab.errors import DataError

NUMERIC = ("N", "N_total", "N_active", "D", "C", "budget", "loss", "loss_raw", "lr",
           "batch_tokens", "batch_sequences", "seq_len", "n_experts", "top_k")
STRINGS = ("dataset", "label")
CANONICAL = NUMERIC + STRINGS


@dataclass
class RunsTable:
    data: dict[str, np.ndarray]
    source: str = "<memory>"
    adapter: str = "runs"
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(next(iter(self.data.values()))) if self.data else 0

    def __contains__(self, name: str) -> bool:
        return name in self.data

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.data:
            raise DataError(
                f"{self.source}: no column for '{name}' (have: {', '.join(sorted(self.data)) or 'none'}); "
                f"map one with --map {name}=COLUMN")
        return self.data[name]

    def require(self, *names: str) -> None:
        for name in names:
            self[name]

    def subset(self, mask: np.ndarray, note: str | None = None) -> "RunsTable":
        notes = self.notes + ([note] if note else [])
        return RunsTable({k: v[mask] for k, v in self.data.items()}, self.source, self.adapter, notes)

    def invalid(self, *names: str) -> np.ndarray:
        """Rows where any of ``names`` is NaN, infinite or not positive: unusable in a log-log fit."""
        self.require(*names)
        bad = np.zeros(len(self), dtype=bool)
        for name in names:
            v = self.data[name]
            bad |= ~np.isfinite(v) | (v <= 0)
        return bad

    def describe(self) -> str:
        return f"{self.source} ({self.adapter}, {len(self)} runs)"


# ---------------------------------------------------------------------------------------------- reading

def _to_float(s: object) -> float:
    if s is None:
        return math.nan
    if isinstance(s, (int, float)) and not isinstance(s, bool):
        return float(s)
    s = str(s).strip()
    if s == "" or s.lower() in ("nan", "none", "null", "na"):
        return math.nan
    return float(s)  # raises ValueError for text; the caller then keeps the column as strings


def _columnise(rows: list[dict], source: str) -> dict[str, np.ndarray]:
    """Rows -> one array per column: float where every non-empty cell parses, str otherwise."""
    if not rows:
        raise DataError(f"{source}: the table has no rows; write at least one run per line")
    names: list[str] = []
    for row in rows:
        names.extend(k for k in row if k not in names)
    out: dict[str, np.ndarray] = {}
    for name in names:
        cells = [row.get(name) for row in rows]
        try:
            out[name] = np.array([_to_float(c) for c in cells], dtype=float)
        except (TypeError, ValueError):
            out[name] = np.array(["" if c is None else str(c) for c in cells], dtype=object)
    return out


def _read_rows(path: Path) -> list[dict]:
    if path.is_dir():  # Gadre et al. ship one JSON per model
        files = sorted(path.glob("*.json"))
        if not files:
            raise DataError(f"{path}: directory has no *.json run files; pass a CSV/JSONL table instead")
        return [_flatten_gadre_json(json.loads(f.read_text()), f) for f in files]
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        rows = []
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{i}: not valid JSON ({e.msg}); one JSON object per line") from None
        return rows
    if path.suffix.lower() == ".json":
        obj = json.loads(path.read_text())
        return obj if isinstance(obj, list) else [obj]
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _flatten_gadre_json(obj: dict, path: Path) -> dict:
    try:
        hp = obj["hyperparameters"]
        row = {"name": obj["name"], "dataset": obj["dataset_name"], "model_config": Path(str(hp["model"])).stem,
               **{k: hp.get(k) for k in ("params", "params_no_embed", "tokens", "chinchilla_multiplier",
                                          "lr", "global_bs")}}
        for res in obj["results"]:
            # .../eval_data/val_tok_mult/paloma_ptb/00000001.tar -> loss_paloma_ptb, as gadre_models_flat.csv
            parts = Path(res["val_data"][0]).parts
            row[f"loss_{parts[-2]}"] = res["loss"]
        return row
    except (KeyError, IndexError, TypeError) as e:
        raise DataError(f"{path}: not a Gadre et al. model JSON (missing {e}); use a CSV runs table") from None


# --------------------------------------------------------------------------------------------- adapters

@dataclass(frozen=True)
class Adapter:
    mapping: dict[str, tuple[str, ...]]      # canonical -> candidate source columns, first present wins
    signature: tuple[tuple[str, ...], ...] = ()  # auto-detection: all columns of any one tuple present
    defaults: dict[str, float] = field(default_factory=dict)
    clean: Callable[[RunsTable, dict], RunsTable] | None = None


def _clean_epoch(t: RunsTable, raw: dict) -> RunsTable:
    # Epoch (Besiroglu et al. 2024) drop the 5 highest losses as digitisation outliers; so do we.
    if "epoch_excluded_top5_loss" in raw:
        drop = raw["epoch_excluded_top5_loss"] == 1
    else:
        loss = t["loss"]
        drop = loss >= np.sort(loss)[-5] if len(loss) > 5 else np.zeros(len(loss), bool)
    return t.subset(~drop, f"dropped the {int(drop.sum())} highest-loss points, as Epoch's refit does")


def _clean_misfitting(t: RunsTable, raw: dict) -> RunsTable:
    # scaling_results.csv also holds intermediate checkpoints; only finished runs are (N, D) points.
    if "portion_steps_elapsed" in raw:
        done = raw["portion_steps_elapsed"] == 1.0
        if not done.all():
            return t.subset(done, f"kept the {int(done.sum())} final checkpoints (portion_steps_elapsed == 1)")
    return t


def _clean_open_athena(t: RunsTable, raw: dict) -> RunsTable:
    if "outlier" in raw:
        out = np.array([str(v).strip().lower() == "true" for v in raw["outlier"]])
        if out.any():
            return t.subset(~out, f"dropped {int(out.sum())} rows flagged as outliers by Open-Athena")
    return t


ADAPTERS: dict[str, Adapter] = {
    "epoch": Adapter(
        {"N": ("N_params", "Model Size"), "D": ("D_tokens",), "C": ("C_flop", "Training FLOP"), "loss": ("loss",)},
        signature=(("Training FLOP",), ("N_params", "D_tokens", "C_flop")), clean=_clean_epoch),
    "steplaw": Adapter(
        {"N": ("N",), "N_active": ("Na",), "D": ("D",), "lr": ("lr",), "batch_sequences": ("bs",),
         "seq_len": ("seq_len",), "loss": ("smooth loss",), "loss_raw": ("loss",), "label": ("exp_name",)},
        signature=(("smooth loss", "bs", "lr"),), defaults={"seq_len": 2048.0}),
    "gadre": Adapter(
        {"N": ("params_no_embed",), "N_total": ("params",), "D": ("tokens",), "loss": ("loss_c4_val",),
         "lr": ("lr",), "batch_sequences": ("global_bs",), "dataset": ("dataset",), "label": ("name",)},
        signature=(("params_no_embed", "chinchilla_multiplier"),), defaults={"seq_len": 2048.0}),
    "misfitting": Adapter(
        {"N": ("N_no_emb",), "N_total": ("N",), "D": ("D",), "loss": ("loss",), "lr": ("peak_lr",),
         "label": ("model",)},
        signature=(("N_no_emb", "portion_steps_elapsed"),), clean=_clean_misfitting),
    "open_athena": Adapter(
        {"N": ("params",), "D": ("tokens",), "budget": ("budget",), "loss": ("loss",),
         "dataset": ("experiment",), "label": ("model",)},
        signature=(("budget", "experiment", "params"),), clean=_clean_open_athena),
    "runs": Adapter(
        {"N": ("N", "n_params"), "N_total": ("N_total",), "N_active": ("N_active", "N_a", "Na"),
         "D": ("D", "tokens", "train_tokens"), "C": ("C", "flops", "compute"), "budget": ("budget",),
         "loss": ("loss", "val_loss", "final_val_loss", "smooth_loss", "smooth loss", "train_loss"),
         "lr": ("lr", "peak_lr", "learning_rate"), "batch_tokens": ("batch_tokens",),
         "batch_sequences": ("batch_sequences", "batch_size", "bs"), "seq_len": ("seq_len", "sequence_length"),
         "n_experts": ("n_experts",), "top_k": ("top_k",), "dataset": ("dataset",), "label": ("name", "run", "label", "exp_name")}),
}


def detect_adapter(raw: dict) -> str:
    for name, ad in ADAPTERS.items():
        if any(all(col in raw for col in cols) for cols in ad.signature):
            return name
    return "runs"


def _numeric(raw: dict, col: str, source: str) -> np.ndarray:
    v = raw[col]
    if v.dtype != object:
        return v
    bad = next((x for x in v if x != "" and not _is_number(x)), "?")
    raise DataError(f"{source}: column '{col}' is not numeric (e.g. {bad!r}); map another with --map")


def _is_number(x: str) -> bool:
    try:
        float(x)
        return True
    except ValueError:
        return False


def _apply_where(raw: dict, where: dict[str, str], source: str) -> dict:
    keep = np.ones(len(next(iter(raw.values()))), dtype=bool)
    for col, want in where.items():
        if col not in raw:
            raise DataError(f"{source}: --where column '{col}' not in the table (have: {', '.join(raw)})")
        v = raw[col]
        keep &= (v == float(want)) if v.dtype != object and _is_number(want) else (v.astype(str) == str(want))
    if not keep.any():
        raise DataError(f"{source}: no rows match --where {where}; check the column values")
    return {k: v[keep] for k, v in raw.items()}


def load_table(path: str | Path, adapter: str = "auto", columns: dict[str, str] | None = None,
               where: dict[str, str] | None = None) -> RunsTable:
    """Read a runs table (CSV, JSONL, JSON or a Gadre model-JSON directory) into a ``RunsTable``.

    ``adapter`` is one of ``auto``, ``runs``, ``epoch``, ``steplaw``, ``gadre``, ``misfitting``,
    ``open_athena``; ``columns`` maps canonical names to source columns and overrides the adapter.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such table; pass a CSV/JSONL runs table or a shared dataset file")
    try:
        raw = _columnise(_read_rows(path), str(path))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot read as a runs table ({e}); expected CSV with a header, or JSONL") from None
    return table_from_columns(raw, adapter=adapter, columns=columns, where=where, source=str(path))


def table_from_columns(raw: dict[str, np.ndarray], adapter: str = "auto", columns: dict[str, str] | None = None,
                       where: dict[str, str] | None = None, source: str = "<memory>") -> RunsTable:
    """The adapter step alone, for columns already in memory (tests, sweeps that hold their results)."""
    raw = {k: (np.asarray(v) if np.asarray(v).dtype.kind in "OUS" else np.asarray(v, dtype=float))
           for k, v in raw.items()}
    raw = {k: (v.astype(object) if v.dtype.kind in "US" else v) for k, v in raw.items()}
    name = detect_adapter(raw) if adapter == "auto" else adapter
    if name not in ADAPTERS:
        raise DataError(f"unknown adapter '{adapter}'; choose one of auto, {', '.join(ADAPTERS)}")
    ad = ADAPTERS[name]
    columns = dict(columns or {})
    unknown = set(columns) - set(CANONICAL)
    if unknown:
        raise DataError(f"--map {sorted(unknown)[0]}=...: not a column we fit; use one of {', '.join(CANONICAL)}")
    if where:
        raw = _apply_where(raw, where, source)
    n = len(next(iter(raw.values())))

    data: dict[str, np.ndarray] = {}
    for canon in CANONICAL:
        if canon in columns:
            if columns[canon] not in raw:
                raise DataError(f"{source}: --map {canon}={columns[canon]}: no such column (have: {', '.join(raw)})")
            col = columns[canon]
        else:
            col = next((c for c in ad.mapping.get(canon, ()) if c in raw), None)
        if col is None:
            continue
        data[canon] = raw[col].astype(str) if canon in STRINGS else _numeric(raw, col, source)
    for canon, value in ad.defaults.items():
        data.setdefault(canon, np.full(n, value))
    _derive(data)
    table = RunsTable(data, source, name, [])
    return ad.clean(table, raw) if ad.clean else table


def _derive(data: dict[str, np.ndarray]) -> None:
    """Fill the columns that follow from others: D from C, C from N and D, batch in tokens."""
    if "D" not in data and "C" in data and "N" in data:
        data["D"] = data["C"] / (6.0 * data["N"])  # Epoch's derivation: D = C / (6 N)
    if "C" not in data and "N" in data and "D" in data:
        data["C"] = 6.0 * data["N"] * data["D"]
    if "batch_tokens" not in data and "batch_sequences" in data and "seq_len" in data:
        data["batch_tokens"] = data["batch_sequences"] * data["seq_len"]


def parse_pairs(pairs: list[str] | None, flag: str) -> dict[str, str]:
    """``["N=Model Size", "loss=val"]`` -> dict; the CLI's --map and --where."""
    out: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise DataError(f"{flag} {pair!r}: expected KEY=VALUE, e.g. {flag} N=params")
        out[key.strip()] = value.strip()
    return out


def best_per_cell(table: RunsTable, keys: tuple[str, ...] = ("N", "D")) -> tuple[RunsTable, int]:
    """Keep the lowest-loss run of each (N, D) cell: a Chinchilla-style law describes well-tuned runs,
    so an lr x batch sweep contributes its best point per cell. Returns (table, number of cells merged)."""
    loss = table["loss"]
    stacked = np.stack([table[k] for k in keys], axis=1)
    _, inverse = np.unique(stacked, axis=0, return_inverse=True)
    inverse = inverse.ravel()
    order = np.lexsort((np.where(np.isfinite(loss), loss, np.inf), inverse))
    first = np.ones(len(order), dtype=bool)
    first[1:] = inverse[order][1:] != inverse[order][:-1]
    keep = np.zeros(len(loss), dtype=bool)
    keep[order[first]] = True
    merged = len(loss) - int(keep.sum())
    if not merged:
        return table, 0
    return table.subset(keep, f"kept the best-loss run of each of {int(keep.sum())} (N, D) cells "
                              f"({merged} other runs are the lr/batch sweep around it)"), merged
