"""An outcome reward model (ORM) for best-of-N: a copy of the policy network with a scalar head, trained with
binary cross-entropy to predict whether a sampled answer is right, on the policy's own graded samples
(training problems only; the held-out problems it later ranks are never seen).

A verifier directory holds ``config.json`` + ``tokenizer/`` (the policy's), ``verifier.safetensors`` and
``verifier.json`` (task, training counts, held-in accuracy). ``steplab rl --from RUN --train-verifier`` writes
one; ``steplab eval RUN --samples K --vote best-of --verifier DIR`` uses it.
"""
from __future__ import annotations

import copy
import json
import random
import shutil
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from steplab.errors import ConfigError
from steplab.utils import atomic_write_json


def with_scalar_head(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose vocabulary head is a zero-initialised scalar head (critic / verifier)."""
    out = copy.deepcopy(model)
    head = nn.Linear(model.cfg.d_model, 1, bias=True).to(next(model.parameters()).device)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    out.lm_head = head  # also unties it from the embedding when the model ties them
    return out


def encode_answer(tokenizer, prompt: str, output: str) -> list[int]:
    return [tokenizer.bos_id] + tokenizer.encode(prompt) + tokenizer.encode(output) + [tokenizer.eos_id]


def score(verifier: nn.Module, seqs: list[list[int]], pad_id: int, batch: int = 64) -> list[float]:
    """P(correct) of each sequence: the scalar head at the sequence's last token, through a sigmoid."""
    out: list[float] = []
    with torch.no_grad():
        for i in range(0, len(seqs), batch):
            chunk = seqs[i:i + batch]
            ids, last = _pad(chunk, pad_id)
            logits = verifier(ids)[torch.arange(len(chunk)), last, 0]
            out += torch.sigmoid(logits.float()).tolist()
    return out


def _pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, :len(s)] = torch.tensor(s)
    return ids, torch.tensor([len(s) - 1 for s in seqs])


def train_verifier(run: str | Path, task_name: str, out: str | Path, *, n_items: int = 2000, samples: int = 8,
                   max_tokens: int = 0, epochs: int = 2, lr: float = 3e-4, batch: int = 64, seed: int = 0,
                   threads: int = 1) -> dict:
    """Sample ``samples`` answers to ``n_items`` training problems from ``run``, grade them, and fit the ORM."""
    from steplab.eval.sampling import sample_answers
    from steplab.tasks import get_task
    from steplab.train.checkpoint import load_run

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"output directory {out} exists and is not empty; choose another --out")
    torch.set_num_threads(threads)
    t0 = time.time()
    task = get_task(task_name)
    _, policy, tok, _ = load_run(run)
    items = task.items("train", n_items, seed=1)  # seed 1: not the RL pool's order
    graded = sample_answers(policy, tok, task, items, samples, max_tokens or task.max_tokens, seed)
    data = [(encode_answer(tok, items[i].prompt, g["text"]), float(g["correct"])) for i, row in enumerate(graded) for g in row]
    verifier = with_scalar_head(policy.float()).train()
    opt = torch.optim.AdamW(verifier.parameters(), lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    for _ in range(epochs):
        rng.shuffle(data)
        for i in range(0, len(data), batch):
            chunk = data[i:i + batch]
            ids, last = _pad([s for s, _ in chunk], tok.pad_id)
            logits = verifier(ids)[torch.arange(len(chunk)), last, 0]
            loss = F.binary_cross_entropy_with_logits(logits.float(), torch.tensor([y for _, y in chunk]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(run) / "config.json", out / "config.json")
    shutil.copytree(Path(run) / "tokenizer", out / "tokenizer", dirs_exist_ok=True)
    save_file({k: v.contiguous() for k, v in verifier.state_dict().items()}, str(out / "verifier.safetensors"))
    positives = sum(y for _, y in data)
    info = {"run": str(run), "task": task_name, "items": len(items), "samples": len(data), "positive_rate": positives / len(data),
            "epochs": epochs, "seconds": round(time.time() - t0, 1)}
    atomic_write_json(out / "verifier.json", info)
    return info


def load_verifier(path: str | Path, device: str = "cpu") -> tuple[nn.Module, dict]:
    from steplab.config import RunConfig
    from steplab.models import build_model

    path = Path(path)
    if not (path / "verifier.safetensors").is_file():
        raise ConfigError(f"--verifier {path} is not a verifier directory (no verifier.safetensors); make one with "
                          "`steplab rl --from RUN --task NAME --train-verifier --out DIR`")
    cfg = RunConfig.from_dict(json.loads((path / "config.json").read_text()))
    model = with_scalar_head(build_model(cfg.model))
    model.load_state_dict(load_file(str(path / "verifier.safetensors")))
    return model.to(device).eval(), json.loads((path / "verifier.json").read_text())
