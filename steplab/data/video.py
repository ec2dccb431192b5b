"""Bouncing digits: text-to-video data made on the fly, nothing to download (issue 21).

A clip is ``frames`` grey frames of a ``size`` x ``size`` black canvas on which one handwritten digit
(scikit-learn's 1,797 8x8 ``load_digits``, or MNIST's test set from ``../shared/data/mnist``) moves one pixel
per frame in one of eight directions; its prompt names both: ``"a 7 moving up-left"``. Start positions are
drawn so the digit never touches a wall, so the prompted direction holds for the whole clip (a bounce would
make the prompt false halfway).

Held out, never seen in training: every fifth digit image (clips for the VAE's and the probe's held-out
sets) and ten (digit, direction) prompts, one per digit (for the DiT: generation from prompts it never saw).

Every batch is a pure function of (seed, batch index), so a data stream's state is one integer and resume is
exact. The text side is a word vocabulary (the tokenizer of the DiT's small text encoder): user text only
ever becomes ids of known words or ``<unk>``, capped at ``TEXT_LEN`` tokens.
"""
from __future__ import annotations

import gzip
import os
import re
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from steplab.errors import ConfigError

DIRECTIONS: dict[str, tuple[int, int]] = {  # name -> (dy, dx) in pixels per frame; y grows downwards
    "up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1),
    "up-left": (-1, -1), "up-right": (-1, 1), "down-left": (1, -1), "down-right": (1, 1),
}
DIRECTION_NAMES = list(DIRECTIONS)
HELDOUT_PROMPTS = {(d, DIRECTION_NAMES[(3 * d) % 8]) for d in range(10)}  # one direction per digit, all 8 used
TRAIN_PAIRS = [(d, k) for d in range(10) for k in range(8) if (d, DIRECTION_NAMES[k]) not in HELDOUT_PROMPTS]
HELDOUT_PAIRS = sorted((d, DIRECTION_NAMES.index(n)) for d, n in HELDOUT_PROMPTS)

# The text encoder's vocabulary: every word a prompt can hold, plus digit names so "seven" works like "7".
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
VOCAB = ["<pad>", "<unk>", "a", "an", "digit", "moving", "going", "to", "the", "up", "down", "left", "right",
         *[str(d) for d in range(10)], *NUMBER_WORDS]
WORD_ID = {w: i for i, w in enumerate(VOCAB)}
TEXT_LEN = 8  # tokens per prompt; longer prompts are cut (bounded work for any user text)


def prompt_for(digit: int, direction: int) -> str:
    return f"a {digit} moving {DIRECTION_NAMES[direction]}"


def tokenize(text: str) -> list[int]:
    """Lowercase words (hyphens split: "up-left" -> up, left) -> ids; unknown words -> <unk>; cut at TEXT_LEN."""
    words = re.findall(r"[a-z0-9]+", text.lower()[:1000])
    return [WORD_ID.get(w, 1) for w in words][:TEXT_LEN]


def encode_prompts(prompts: list[str]) -> torch.Tensor:
    """(B, TEXT_LEN) int64, padded with 0; the empty prompt (all padding) is the unconditional one for CFG."""
    out = torch.zeros(len(prompts), TEXT_LEN, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids = tokenize(p)
        out[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


def parse_prompt(text: str) -> tuple[int, int] | None:
    """(digit, direction) a prompt names, or None: how the eval knows what a generated clip should show."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    digits = [int(w) if w.isdigit() else NUMBER_WORDS.index(w) for w in words if (w.isdigit() and len(w) == 1) or w in NUMBER_WORDS]
    dirs = [w for w in words if w in ("up", "down", "left", "right")]
    name = "-".join(dirs)
    if len(digits) != 1 or name not in DIRECTIONS:
        return None
    return digits[0], DIRECTION_NAMES.index(name)


def shared_dir() -> Path:
    env = os.environ.get("STEPLAB_SHARED")
    return Path(env) if env else Path(__file__).resolve().parents[2].parent / "shared"


@lru_cache(maxsize=4)
def digit_images(source: str = "digits") -> tuple[np.ndarray, np.ndarray]:
    """(images float32 in [0, 1] of shape (N, h, w), labels int64)."""
    if source == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)
    if source == "mnist":
        root = shared_dir() / "data" / "mnist"
        img, lab = root / "t10k-images-idx3-ubyte.gz", root / "t10k-labels-idx1-ubyte.gz"
        if not img.is_file() or not lab.is_file():
            raise ConfigError(f"model.video.source=mnist needs {img} and {lab}; use source=digits (no download)")
        images = np.frombuffer(gzip.open(img).read()[16:], dtype=np.uint8).reshape(-1, 28, 28)
        labels = np.frombuffer(gzip.open(lab).read()[8:], dtype=np.uint8)
        return (images / 255.0).astype(np.float32), labels.astype(np.int64)
    raise ConfigError(f"model.video.source={source!r} is not one of digits, mnist")


@lru_cache(maxsize=8)
def resized_digits(source: str, digit_size: int, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The split's digit images resized (bilinear, antialiased) to digit_size: (N, s, s) in [0, 1], labels."""
    images, labels = digit_images(source)
    idx = np.arange(len(images))
    keep = idx % 5 == 0 if split == "heldout" else idx % 5 != 0
    x = torch.from_numpy(images[keep]).unsqueeze(1)
    x = F.interpolate(x, size=(digit_size, digit_size), mode="bilinear", align_corners=False, antialias=True)
    return x.squeeze(1).clamp(0, 1), torch.from_numpy(labels[keep])


def render_clips(images: torch.Tensor, directions: torch.Tensor, starts: torch.Tensor, frames: int, size: int) -> torch.Tensor:
    """Paste each digit along its straight path: (B, frames, size, size) in [0, 1]."""
    b, s = images.shape[0], images.shape[-1]
    out = torch.zeros(b, frames, size, size)
    steps = torch.tensor([DIRECTIONS[DIRECTION_NAMES[int(k)]] for k in directions]).view(b, 1, 2)
    pos = starts.view(b, 1, 2) + steps * torch.arange(frames).view(1, frames, 1)  # (B, T, 2) top-left corners
    for i in range(b):
        for t in range(frames):
            y, x = int(pos[i, t, 0]), int(pos[i, t, 1])
            out[i, t, y:y + s, x:x + s] = images[i]
    return out


def sample_clips(gen: torch.Generator, n: int, *, frames: int, size: int, digit_size: int, source: str = "digits",
                 split: str = "train", pairs: list[tuple[int, int]] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n random clips: (clips (n, T, H, W) in [0, 1], digits (n,), directions (n,)).

    ``pairs`` limits the (digit, direction) combinations (the DiT's training prompts); None allows all 80.
    """
    travel = frames - 1
    if digit_size + travel > size:
        raise ConfigError(f"a {digit_size}px digit moving {travel}px does not fit a {size}px canvas; "
                          f"raise model.video.size or lower digit_size/frames")
    images, labels = resized_digits(source, digit_size, split)
    by_digit = [torch.nonzero(labels == d).flatten() for d in range(10)]
    if pairs is None:
        digits = torch.randint(0, 10, (n,), generator=gen)
        dirs = torch.randint(0, 8, (n,), generator=gen)
    else:
        choice = torch.randint(0, len(pairs), (n,), generator=gen)
        digits = torch.tensor([pairs[int(c)][0] for c in choice])
        dirs = torch.tensor([pairs[int(c)][1] for c in choice])
    pick = torch.stack([by_digit[int(d)][torch.randint(0, len(by_digit[int(d)]), (1,), generator=gen)] for d in digits]).flatten()
    free = size - digit_size  # start anywhere the whole path stays on the canvas
    steps = torch.tensor([DIRECTIONS[DIRECTION_NAMES[int(k)]] for k in dirs])  # (n, 2)
    lo = torch.where(steps < 0, travel, 0)
    hi = torch.where(steps > 0, free - travel, free)
    starts = lo + (torch.rand(n, 2, generator=gen) * (hi - lo + 1)).long().clamp(max=hi - lo)
    return render_clips(images[pick], dirs, starts, frames, size), digits, dirs


class VideoClipData:
    """TrainData for the VAE (kind ``video-clips``): batches of clips ``(B, 1, T, H, W)`` in [-1, 1]."""

    vocab_size = 0
    tokenizer_dir = None

    def __init__(self, video, batch_size: int, seed: int, eval_batches: int = 4, pairs=None, with_text: bool = False):
        self.v, self.batch_size, self.seed, self.n_eval = video, batch_size, seed, eval_batches
        self.pairs, self.with_text = pairs, with_text
        self.step = 0
        self.tokens_per_batch = batch_size * video.frames * video.size * video.size  # pixels: what D counts here

    def _batch(self, seed: int, split: str, pairs) -> tuple[torch.Tensor, ...]:
        gen = torch.Generator().manual_seed(seed)
        v = self.v
        clips, digits, dirs = sample_clips(gen, self.batch_size, frames=v.frames, size=v.size, digit_size=v.digit_size,
                                           source=v.source, split=split, pairs=pairs)
        x = clips.unsqueeze(1) * 2 - 1
        if not self.with_text:
            return (x,)
        return x, encode_prompts([prompt_for(int(d), int(k)) for d, k in zip(digits, dirs)])

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        batch = self._batch(self.seed * 1_000_003 + self.step, "train", self.pairs)
        self.step += 1
        return batch

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])

    def eval_batches(self):
        pairs = HELDOUT_PAIRS if self.pairs is not None else None  # the DiT's eval: held-out prompts and images
        for i in range(self.n_eval):
            yield self._batch(10_000_019 + i, "heldout", pairs)


def build_clip_data(cfg) -> VideoClipData:
    """The builder for data kind ``video-clips`` (cfg.data.path: "builtin")."""
    return VideoClipData(cfg.model.video, cfg.train.batch_size * cfg.train.grad_accum, cfg.train.seed, cfg.train.eval_batches)


def build_text_clip_data(cfg) -> VideoClipData:
    """(clips, prompt ids) on the 70 training prompts (eval: the 10 held-out prompts, held-out images)."""
    return VideoClipData(cfg.model.video, cfg.train.batch_size * cfg.train.grad_accum, cfg.train.seed,
                         cfg.train.eval_batches, pairs=TRAIN_PAIRS, with_text=True)


class VideoLatentData:
    """TrainData for the DiT (kind ``video-latents``): (VAE latent means, prompt ids) from a fixed pool.

    Encoding a clip costs about as much as a DiT step on it, so a pool of ``pool`` training clips is encoded once
    by the frozen VAE of ``model.video.vae_run`` (deterministic: seeded clips, the posterior mean) and batches
    are drawn from it, batch i by a generator seeded with (seed, i). Eval: held-out prompts and digit images.
    """

    vocab_size = 0
    tokenizer_dir = None

    def __init__(self, cfg, pool: int | None = None):
        from steplab.models.video import load_vae_run

        v = cfg.model.video
        pool = v.latent_pool if pool is None else pool
        self.vae = load_vae_run(v.vae_run, cfg.model)
        self.batch_size, self.seed, self.step = cfg.train.batch_size * cfg.train.grad_accum, cfg.train.seed, 0
        self.clips = VideoClipData(v, 64, seed=777, eval_batches=max(1, cfg.train.eval_batches), pairs=TRAIN_PAIRS,
                                   with_text=True)
        self.latents, self.ids = self._encode(self.clips.next_batch() for _ in range(-(-pool // 64)))
        self.evals = [(z[:self.batch_size], i[:self.batch_size]) for z, i in zip(*self._encode(self.clips.eval_batches(), split=True))]
        self.tokens_per_batch = self.batch_size * self.latents[0].numel()  # latent elements per batch

    @torch.no_grad()
    def _encode(self, batches, split: bool = False):
        zs, ids = [], []
        for x, i in batches:
            zs.append(self.vae.encode(x)[0])
            ids.append(i)
        return (zs, ids) if split else (torch.cat(zs), torch.cat(ids))

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.step)
        pick = torch.randint(0, len(self.latents), (self.batch_size,), generator=gen)
        self.step += 1
        return self.latents[pick], self.ids[pick]

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])

    def eval_batches(self):
        return iter(self.evals)


def build_latent_data(cfg) -> VideoLatentData:
    """The builder for data kind ``video-latents`` (cfg.data.path: "builtin")."""
    return VideoLatentData(cfg)
