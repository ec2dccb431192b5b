"""Long-context evals: passkey retrieval over a length x depth grid (with a heat-map) and perplexity by
position bucket on held-out long documents.

Both run the model at lengths beyond its configured ``max_seq_len`` when asked (that is the point of the
"no scaling at 4x" baseline): ``at_length`` rebuilds the model with a longer window and the same weights
and RoPE block, since RoPE tables are computed, not learned.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from steplab.models import build_model
from steplab.tasks.passkey import CHANCE, Passkey, grade


def at_length(cfg, model: torch.nn.Module, length: int) -> torch.nn.Module:
    """``model`` itself when ``length`` fits, else a copy whose window is ``length`` (same weights and RoPE)."""
    if length <= cfg.max_seq_len:
        return model
    longer = build_model(dataclasses.replace(cfg, max_seq_len=length))
    longer.load_state_dict(model.state_dict())
    return longer.to(next(model.parameters()).device).eval()


def passkey_grid(cfg, model, tokenizer, lengths: list[int], depths: list[float], *, n: int = 20, seed: int = 0,
                 device="cpu") -> dict:
    """Exact-match accuracy per (length, depth) over ``n`` held-out keys each; ``mean`` per length."""
    task = Passkey(tokenizer)
    acc: dict[int, dict[float, float]] = {}
    for length in lengths:
        m = at_length(cfg, model, length)
        acc[length] = {}
        for depth in depths:
            hits = grade(m, task.eval_examples(n, length, depth, seed), batch_size=max(1, 4096 // length), device=device)
            acc[length][depth] = sum(hits) / len(hits)
    return {"accuracy": acc, "mean": {L: sum(r.values()) / len(r) for L, r in acc.items()}, "n_per_cell": n, "chance": CHANCE}


def plot_heatmap(result: dict, path: str | Path, title: str = "passkey accuracy") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted(result["accuracy"])
    depths = sorted(next(iter(result["accuracy"].values())))
    grid = np.array([[result["accuracy"][L][d] for L in lengths] for d in depths])
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.0 + 0.5 * len(depths)))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
    ax.set_xticks(range(len(lengths)), [str(L) for L in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("key depth")
    for i in range(len(depths)):
        for j in range(len(lengths)):
            ax.text(j, i, f"{grid[i, j]:.0%}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.05)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def long_documents(shards, bos_id: int, length: int, max_docs: int) -> list[np.ndarray]:
    """The first ``length + 1`` tokens of each held-out document at least that long."""
    tokens = np.asarray(shards.tokens)
    starts = np.flatnonzero(tokens == bos_id).tolist() + [len(tokens)]
    docs = [tokens[a:a + length + 1].astype(np.int64) for a, b in zip(starts[:-1], starts[1:]) if b - a >= length + 1]
    return docs[:max_docs]


@torch.no_grad()
def perplexity_by_position(cfg, model, shards, bos_id: int, length: int, *, buckets: int = 8, max_docs: int = 16,
                           device="cpu") -> dict:
    """Perplexity of held-out documents read ``length`` tokens at a time, overall and per position bucket."""
    docs = long_documents(shards, bos_id, length, max_docs)
    if not docs:
        raise ValueError(f"no held-out document has {length + 1} tokens; use shorter lengths or a corpus with longer documents")
    m = at_length(cfg, model, length)
    losses = torch.zeros(length)
    for doc in docs:
        x = torch.from_numpy(doc[None]).to(device)
        logits = m(x[:, :-1])
        losses += F.cross_entropy(logits[0].float(), x[0, 1:], reduction="none").cpu()
    losses /= len(docs)
    edges = [round(i * length / buckets) for i in range(buckets + 1)]
    per_bucket = {f"{a}-{b}": math.exp(losses[a:b].mean().item()) for a, b in zip(edges[:-1], edges[1:])}
    return {"length": length, "documents": len(docs), "ppl": math.exp(losses.mean().item()), "buckets": per_bucket}
