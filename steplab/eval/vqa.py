"""``steplab eval RUN --task vqa``: held-out VQA accuracy per question type, and whether the model uses the image.

Every answer is generated greedily through :class:`steplab.infer.engine.Engine`, the engine the API serves with,
from the same prompt ids the API builds, so ``/v1/chat/completions`` with the same base64 image answers the same.

Image-use checks (on the held-out scene questions):
- ``zeroed``: the image tokens replaced by zero vectors; ``shuffled``: each question gets another question's
  image (a seeded derangement). Both should fall to chance (the majority answer per type);
- ``swap``: the question asked about another held-out scene on which its answer differs; the share of questions
  whose generated answer changes.
"""
from __future__ import annotations

import random
import time

import numpy as np
import torch

from steplab.data import images as I
from steplab.infer.engine import Engine, Request
from steplab.infer.prompts import chat_stop_ids
from steplab.tasks import vqa

MAX_ANSWER_TOKENS = 32


class ZeroImages(torch.nn.Module):
    """The model with zero vectors in every image slot (the ablation); everything else passes through."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.inner, self.cfg = model, model.cfg

    def embed(self, idx, images):
        return self.inner.embed(idx, images, zero_images=True)

    def forward(self, *args, **kw):
        return self.inner(*args, **kw)


def prompt_ids(tokenizer, s: vqa.Sample, n_image_tokens: int, place: str = "start") -> list[int]:
    ids, mask = I.render(tokenizer, s, n_image_tokens, place)
    return ids[:mask.index(1)]  # through the <|assistant|> opener: what the API builds for the question


def answer(engine: Engine, tokenizer, samples: list[vqa.Sample], pixels: list[np.ndarray], n_image_tokens: int,
           place: str = "start") -> list[str]:
    """Greedy answers to ``samples`` with the given images (one per sample), all submitted at once."""
    stop = chat_stop_ids(tokenizer)
    handles = [engine.submit(Request(prompt=prompt_ids(tokenizer, s, n_image_tokens, place), max_tokens=MAX_ANSWER_TOKENS,
                                     temperature=0.0, stop_ids=stop, images=I.to_tensor(p)[None]))
               for s, p in zip(samples, pixels, strict=True)]
    out = []
    for h in handles:
        text = ""
        for ev in h:
            if ev.error:
                raise RuntimeError(ev.error)
            text += ev.text
        out.append(text)
    return out


def derangement(n: int, rng: random.Random) -> list[int]:
    """A seeded permutation with no fixed point (Sattolo's cycle)."""
    perm = list(range(n))
    for i in range(n - 1, 0, -1):
        j = rng.randrange(i)
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def swap_scene(s: vqa.Sample, rng: random.Random, tries: int = 200) -> int | None:
    """A held-out scene on which ``s``'s question has a different (unique) answer."""
    for _ in range(tries):
        sid = vqa.random_scene_id(rng, "test")
        other = vqa.answer_for(vqa.make_scene(sid), s)
        if other is not None and other != s.answer:
            return sid
    return None


def run_vqa(model, tokenizer, n: int = 600, seed: int = 0, checks: bool = True, max_batch: int = 32,
            digits: str = "sklearn") -> dict:
    """Accuracy per question type on ``n`` held-out samples (digit grids from ``digits``: sklearn or mnist);
    with ``checks``, the image-use checks too."""
    t0 = time.perf_counter()
    n_tok, place = model.cfg.vision.n_tokens, model.cfg.vision.image_place
    samples = I.held_out_samples(n, "vqa", seed, digits=digits)
    pixels = [I.draw(s.image) for s in samples]
    out: dict = {"n": n, "seed": seed, "digits": digits}
    with Engine(model, tokenizer, name="vqa", max_batch=max_batch, max_queue=1 << 30) as engine:
        outputs = answer(engine, tokenizer, samples, pixels, n_tok, place)
        out["accuracy"] = vqa.accuracy_by_type(samples, outputs)
        out["answers"] = outputs
        if checks:
            scene = [i for i, s in enumerate(samples) if s.qtype in vqa.SCENE_TYPES]
            sub = [samples[i] for i in scene]
            perm = derangement(len(scene), random.Random(f"shuffle/{seed}"))
            shuffled = answer(engine, tokenizer, sub, [pixels[scene[j]] for j in perm], n_tok, place)
            out["shuffled"] = vqa.accuracy_by_type(sub, shuffled)
            rng = random.Random(f"swap/{seed}")
            pairs = [(i, swap_scene(samples[i], rng)) for i in scene]
            pairs = [(i, sid) for i, sid in pairs if sid is not None]
            swapped = answer(engine, tokenizer, [samples[i] for i, _ in pairs],
                             [I.draw(("scene", sid)) for _, sid in pairs], n_tok, place)
            changed = [a != outputs[i] for (i, _), a in zip(pairs, swapped)]
            out["swap"] = _changes(changed)
            for group, types in (("non_relational", vqa.NON_RELATIONAL), ("relational", vqa.RELATIONAL)):
                out["swap"][group] = _changes([c for (i, _), c in zip(pairs, changed) if samples[i].qtype in types])
    if checks:
        with Engine(ZeroImages(model), tokenizer, name="vqa-zeroed", max_batch=max_batch, max_queue=1 << 30) as engine:
            zeroed = answer(engine, tokenizer, sub, [pixels[i] for i in scene], n_tok, place)
        out["zeroed"] = vqa.accuracy_by_type(sub, zeroed)
    out["seconds"] = time.perf_counter() - t0
    return out


def _changes(changed: list[bool]) -> dict:
    return {"n": len(changed), "changed": sum(changed), "change_rate": sum(changed) / max(len(changed), 1)}


def markdown(res: dict) -> str:
    """The result as a table: accuracy and chance per type, the ablations beside them."""
    acc = res["accuracy"]
    cols = [k for k in ("zeroed", "shuffled") if k in res]
    lines = ["| type | n | accuracy | chance | " + " | ".join(cols) + " |", "|---|---|---|---|" + "---|" * len(cols)]
    for t in (*vqa.NON_RELATIONAL, "non_relational", *vqa.RELATIONAL, "relational", "caption", "digits"):
        if t in acc:
            r = acc[t]
            extra = " | ".join(f"{res[c][t]['accuracy']:.1%}" if t in res[c] else "" for c in cols)
            ch = f"{r['chance']:.1%}" if "chance" in r else ""
            lines.append(f"| {t} | {r['n']} | {r['accuracy']:.1%} | {ch} | {extra} |")
    if "swap" in res:
        s = res["swap"]
        lines.append(f"\nswapped image with a different answer: the answer changed {s['change_rate']:.1%} ({s['changed']}/{s['n']})"
                     + "".join(f"; {g} {s[g]['change_rate']:.1%} ({s[g]['changed']}/{s[g]['n']})" for g in ("non_relational", "relational")
                               if s.get(g, {}).get("n")))
    return "\n".join(lines)
