"""Context extension: continued training of a run at a longer length with a scaled RoPE (``steplab extend``).

The recipe (YaRN paper, section 4): take a trained run, switch its RoPE to a scaling with factor s over the
trained length L (``model.rope``), and keep training at length s*L on long documents for a few hundred steps.
Everything after the data is the one trainer's job (``train.trainer.train`` with ``train.init_from``), so
checkpoints, exact resume, metrics and the summary are those of any run.

Data: ``build_long_dataset`` turns a prepared dataset into rows of exactly the new length. The corpus part is
whole documents of at least ``min_doc_tokens`` (e.g. Python modules), concatenated and cut into rows, so a
row holds the end of one document and the start of the next: ``model.doc_mask_token`` = <|bos|> keeps
attention inside each document (a block-diagonal causal mask). An optional share of passkey documents
(``tasks/passkey.py``, train keys only) teaches retrieval at the new length; packed as documents of mixed lengths
(``passkey_min_length``) they also train the short key-to-question distances, which a rescaled RoPE otherwise
loses first (docs/LOG.md, issue 17 second session).

Learning rate and batch: ``extension_plan`` derives them from the base run and says why (the CLI prints it
beside Step Law's numbers): the batch keeps the base run's tokens per step (rows shrink as the length grows),
and the peak lr is the lr the base run annealed to (lr x min_lr_ratio), so continued training neither
re-heats the converged weights (which costs perplexity at the original length) nor stalls.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from steplab.config import RunConfig
from steplab.data.prepare import META, load_prepared
from steplab.data.shards import dtype_for_vocab, write_shards
from steplab.errors import ConfigError, DataError
from steplab.models.rope import describe_yarn
from steplab.tasks.passkey import Passkey
from steplab.utils import atomic_dir, atomic_write_json

METHODS = {"yarn": "yarn", "pi": "linear", "ntk": "dynamic", "llama3": "llama3"}


def build_long_dataset(source: str | Path, out: str | Path, length: int, *, passkey_fraction: float = 0.0,
                       min_doc_tokens: int = 0, max_tokens: int | None = None, seed: int = 0,
                       passkey_min_length: int = 0) -> dict:
    """Write a prepared dataset of ``length``-token rows (corpus rows of packed long documents, and passkey
    rows in the share ``passkey_fraction``); validation is the source's held-out split. Returns its meta.
    ``passkey_min_length`` > 0 packs each passkey row with documents of mixed lengths from that minimum up to
    ``length`` (``Passkey.packed_rows``); 0 makes each passkey row one document of exactly ``length``."""
    if not 0.0 <= passkey_fraction < 1.0:
        raise ConfigError(f"passkey fraction {passkey_fraction} must be in [0, 1)")
    if not 0 <= passkey_min_length <= length:
        raise ConfigError(f"passkey minimum length {passkey_min_length} must be in 0..{length} (the row length; 0: one document per row)")
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
        task = Passkey(tok)
        pk_rows = (task.packed_rows(n_passkey, length, passkey_min_length, seed) if passkey_min_length
                 else task.documents(n_passkey, length, seed))
        rows += [np.asarray(d) for d in pk_rows]
    order = np.random.default_rng(seed).permutation(len(rows))
    with atomic_dir(out, DataError) as tmp:
        dtype = dtype_for_vocab(tok.vocab_size)
        write_shards((rows[i].tolist() for i in order), tmp / "train", dtype=dtype)
        shutil.copytree(val.path, tmp / "val")
        shutil.copytree(Path(source) / "tokenizer", tmp / "tokenizer")
        new = dict(meta, source=f"long:{source}", row_tokens=length, passkey_fraction=passkey_fraction,
                   min_doc_tokens=min_doc_tokens, passkey_min_length=passkey_min_length, corpus_rows=n_corpus, passkey_rows=n_passkey, long_documents=len(docs))
        new["train"] = {"documents": len(rows), "tokens": len(rows) * length, "bytes": meta["train"]["bytes"]}
        atomic_write_json(tmp / META, new)
    return new


@dataclass
class ExtensionPlan:
    cfg: RunConfig  # the extension run's config (trained by the one trainer)
    reasoning: list[str]


def extension_plan(base_run: str | Path, *, factor: float, method: str, steps: int, data_path: str,
                   seq_len: int | None = None, lr: float | None = None, batch_size: int | None = None,
                   beta_fast: float | None = None, beta_slow: float | None = None, pose: bool = False) -> ExtensionPlan:
    """The config of an extension of ``base_run``: RoPE scaled ``factor``-fold with ``method``, trained ``steps``
    steps at ``seq_len`` (default factor x the base length) on ``data_path``, starting from the base weights.
    ``beta_fast``/``beta_slow`` set YaRN's ramp (default: the paper's 32 and 1, tuned for Llama's 4k context).
    ``pose``: rows shorter than the new context get PoSE positions spanning all of it (``data.pose_length``)."""
    base_run = Path(base_run)
    config_path = base_run / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"{base_run} is not a run directory (no config.json); pass the run to extend")
    base = RunConfig.from_dict(json.loads(config_path.read_text()))
    if method not in METHODS:
        raise ConfigError(f"--method {method!r} is not one of {', '.join(METHODS)}")
    if base.model.rope.scaling != "none":
        raise ConfigError(f"{base_run} already has model.rope.scaling={base.model.rope.scaling}; extend the original run instead")
    if not factor > 1:
        raise ConfigError(f"--factor {factor} must be > 1")
    if steps <= 0:
        raise ConfigError(f"--steps {steps} must be positive")
    L = base.model.max_seq_len
    target = int(round(L * factor))
    seq_len = seq_len or target
    cfg = copy.deepcopy(base)
    m, t = cfg.model, cfg.train
    m.rope = type(m.rope)(scaling=METHODS[method], factor=float(factor), original_max_seq_len=L)
    if method != "yarn" and (beta_fast or beta_slow):
        raise ConfigError(f"--beta-fast/--beta-slow shape YaRN's ramp; --method {method} has none")
    m.rope.beta_fast, m.rope.beta_slow = beta_fast or m.rope.beta_fast, beta_slow or m.rope.beta_slow
    m.max_seq_len = max(target, seq_len)
    cfg.data.path, cfg.data.seq_len = str(data_path), seq_len
    base_tokens = base.tokens_per_step
    rows = batch_size or max(1, round(base_tokens / (seq_len * t.grad_accum)))
    t.batch_size, t.max_steps, t.init_from = rows, steps, str(base_run.resolve())
    t.lr = lr or base.train.lr * base.train.min_lr_ratio
    t.schedule, t.warmup_steps, t.min_lr_ratio = "cosine", max(1, min(20, steps // 10)), 0.1
    t.eval_every = t.ckpt_every = max(1, min(base.train.ckpt_every, steps // 4 or 1))
    t.keep_last = max(t.keep_last, 8)
    if pose and seq_len >= m.max_seq_len:
        raise ConfigError(f"--pose spreads rows of --seq-len over the context; the rows ({seq_len}) already span it ({m.max_seq_len})")
    cfg.data.pose_length = m.max_seq_len if pose else 0
    m.doc_mask_token = m.doc_mask_token if m.doc_mask_token >= 0 else _bos_id(data_path)
    reasoning = [
        f"RoPE: {method} ({m.rope.scaling}) with factor {factor:g} over the trained {L} tokens -> context {m.max_seq_len}; "
        f"training rows of {seq_len} tokens",
        f"batch: the base run's {base_tokens:,} tokens per step kept (Step Law's batch depends on D only and the "
        f"extension adds little D) -> {rows} rows x {seq_len} x {t.grad_accum} accumulation = {rows * seq_len * t.grad_accum:,} tokens",
        f"lr: {t.lr:.3g}" + (" (given)" if lr else f" = the base's final lr {base.train.lr:.3g} x min_lr_ratio {base.train.min_lr_ratio:g}: "
                             "the weights are converged at that lr, a higher one re-heats them and costs perplexity at the "
                             "original length"),
        *([describe_yarn(m.head_dim, m.rope_base, m.rope)] if method == "yarn" else []),
        f"schedule: {t.warmup_steps} warmup steps, cosine to {t.min_lr_ratio:g} x lr over {steps} steps",
        f"document masking: attention stays inside documents starting with token {m.doc_mask_token} (<|bos|>)",
        *([f"PoSE: each row's second chunk skips ahead, so rows of {seq_len} train distances up to {m.max_seq_len}"] if pose else []),
    ]
    return ExtensionPlan(cfg.validate(), reasoning)


def _bos_id(data_path: str) -> int:
    tok, _, _, _ = load_prepared(data_path)
    return tok.bos_id


MEMORY_PROBE = """
import json, sys, torch
from steplab.config import RunConfig
from steplab.models import build_model
spec = json.loads(sys.argv[1])
torch.manual_seed(0)
cfg = RunConfig.from_dict({"model": spec["model"]}).model
model = build_model(cfg)
T, docs = spec["length"], spec["docs"]
x = torch.randint(10, cfg.vocab_size, (1, T))
x[0, :: max(1, T // docs)] = max(cfg.doc_mask_token, 0)
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
if torch.cuda.is_available():
    model, x = model.cuda(), x.cuda()
    torch.cuda.reset_peak_memory_stats(); before = torch.cuda.memory_allocated()
    model(x, x).backward(); torch.cuda.synchronize()
    print(json.dumps({"bytes": torch.cuda.max_memory_allocated() - before, "where": "cuda"}))
else:
    model(x[:, :8], x[:, :8]).backward()  # warm the allocator and kernels
    model.zero_grad(set_to_none=False)
    before = rss("VmRSS")
    model(x, x).backward()
    print(json.dumps({"bytes": rss("VmHWM") - before, "where": "cpu rss"}))
"""


def measure_peak_memory(cfg, lengths: list[int], *, docs: int = 1) -> dict[int, dict]:
    """Peak memory of one training forward+backward (batch 1) at each length, each in a fresh process so the
    high-water mark is this step's alone. ``docs`` > 1 packs that many documents into the row (document mask)."""
    import subprocess
    import sys

    out = {}
    for length in lengths:
        spec = {"model": dataclasses.asdict(cfg) | {"max_seq_len": max(length, cfg.max_seq_len)}, "length": length, "docs": docs}
        proc = subprocess.run([sys.executable, "-c", MEMORY_PROBE, json.dumps(spec)], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        if proc.returncode != 0:
            raise RuntimeError(f"memory probe at length {length} failed: {proc.stderr.strip().splitlines()[-1:]}")
        out[length] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out

