"""Images for Step-1V, drawn or loaded with no download, and the training stream the trainer reads.

- scenes (``steplab.tasks.vqa``): drawn with Pillow on a 48x48 black canvas, one object per 16x16 cell;
- digit grids: 4 handwritten digits in the corner cells (16x16 each) of the same 3x3 grid, from scikit-learn's
  bundled ``load_digits`` (8x8, upscaled 2x) or, for the larger benchmark, MNIST's test images in
  ``../shared/data/mnist`` (28x28, resized to 16x16);
- :class:`VQAData`: the ``vqa`` data kind. ``data.path`` chooses the mixture: ``captions`` (stage 1: scene and
  digit captions) or ``vqa`` (stage 2: scene questions of every type plus digit captions); a ``:mnist`` suffix
  draws the digit grids from MNIST instead. Every example is a one-turn conversation under the chat template,
  the image slots (``models.vision.IMAGE_SLOT``) at ``model.vision.image_place`` in the user's turn (after its
  opener or before its closing <|end|>), the loss on the assistant's answer only, plus per image token the words
  of its grid cell (:func:`slot_targets`, for the model's slot loss). Example k of the stream is a pure function
  of (seed, k): resume is exact.
"""
from __future__ import annotations

import functools
import gzip
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

from steplab.config import CHOICES
from steplab.errors import ConfigError, DataError
from steplab.tasks import vqa

IMAGE_SIZE = 48
CELL = IMAGE_SIZE // vqa.GRID
RGB = {"red": (230, 30, 30), "green": (30, 190, 30), "blue": (40, 80, 255), "orange": (255, 150, 0),
       "gray": (140, 140, 140), "yellow": (240, 240, 40)}
RADIUS = 5
DIGIT_HELD_OUT = 0.2  # share of each digit source's images that only held-out grids use
IGNORE = -100
IMAGE_PLACES = CHOICES["model.vision.image_place"]  # where a message's image slots go (the step1v presets: "end")


# ---- drawing ----------------------------------------------------------------------------------------------

def draw_scene(scene: vqa.Scene) -> np.ndarray:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE))
    d = ImageDraw.Draw(img)
    for o in scene.objects:
        row, col = divmod(o.cell, vqa.GRID)
        x, y = col * CELL + CELL // 2 + o.jitter[0], row * CELL + CELL // 2 + o.jitter[1]
        box = (x - RADIUS, y - RADIUS, x + RADIUS, y + RADIUS)
        if o.shape == "circle":
            d.ellipse(box, fill=RGB[o.colour])
        elif o.shape == "square":
            d.rectangle(box, fill=RGB[o.colour])
        else:
            d.polygon([(x, y - RADIUS), (x - RADIUS, y + RADIUS), (x + RADIUS, y + RADIUS)], fill=RGB[o.colour])
    return np.asarray(img)


@functools.lru_cache(maxsize=None)
def digit_source(source: str) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """(images (n, 16, 16) uint8, labels, {"train": indices, "test": indices}) for ``sklearn`` or ``mnist``."""
    if source == "sklearn":
        from sklearn.datasets import load_digits

        d = load_digits()
        small = (d.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 0..255
        images, labels = np.kron(small, np.ones((1, 2, 2), dtype=np.uint8)), d.target
    elif source == "mnist":
        images, labels = _mnist_test()
    else:
        raise ConfigError(f"unknown digit source {source!r}; use sklearn or mnist")
    order = np.random.default_rng(0).permutation(len(labels))
    cut = int(len(labels) * DIGIT_HELD_OUT)
    return images, labels, {"test": np.sort(order[:cut]), "train": np.sort(order[cut:])}


def shared_dir() -> Path:
    return Path(os.environ.get("STEPLAB_SHARED", Path(__file__).resolve().parents[2].parent / "shared")) / "data"


def _mnist_test() -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    root = shared_dir() / "mnist"
    files = root / "t10k-images-idx3-ubyte.gz", root / "t10k-labels-idx1-ubyte.gz"
    if not all(f.is_file() for f in files):
        raise DataError(f"MNIST test files not found in {root}; set STEPLAB_SHARED to the shared directory or use the sklearn digits")
    raw = np.frombuffer(gzip.open(files[0]).read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28)
    labels = np.frombuffer(gzip.open(files[1]).read(), dtype=np.uint8, offset=8).astype(np.int64)
    small = np.stack([np.asarray(Image.fromarray(a).resize((CELL, CELL), Image.BILINEAR)) for a in raw])
    return small, labels


DIGIT_CELLS = (0, 2, 6, 8)  # the corners, in reading order: the caption lists the digits in this order


def draw_digits(source: str, indices: tuple[int, ...]) -> np.ndarray:
    images = digit_source(source)[0]
    canvas = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    for cell, i in zip(DIGIT_CELLS, indices, strict=True):
        row, col = divmod(cell, vqa.GRID)
        canvas[row * CELL:(row + 1) * CELL, col * CELL:(col + 1) * CELL] = images[i]
    return np.repeat(canvas[..., None], 3, axis=2)


def draw(spec: tuple) -> np.ndarray:
    """(48, 48, 3) uint8 RGB of a sample's image spec."""
    if spec[0] == "scene":
        return draw_scene(vqa.make_scene(spec[1]))
    if spec[0] == "digits":
        return draw_digits(spec[1], spec[2])
    raise ValueError(f"unknown image spec {spec!r}")


def to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float in [0, 1], what the ViT reads."""
    return torch.from_numpy(np.array(pixels)).permute(2, 0, 1).float() / 255.0


# ---- samples ----------------------------------------------------------------------------------------------

MIXTURES = {  # (kind, weight): stage 1 aligns on captions; stage 2 asks every question type and keeps the scene
    # captions, whose every token is about the image (dense supervision that teaches the encoder where things are).
    # "colour of the object at <position>" weighs 3: alone it was learned by step 600; in an even mix with shape and
    # position questions it sat at chance until step 1,700 (theirs key on colour, it keys on position; docs/LOG.md)
    "captions": (("caption", 1.0), ("digits", 1.0)),
    "vqa": tuple((t, 3.0 if t == "colour" else 1.0) for t in vqa.SCENE_TYPES) + (("caption", 2.0), ("digits", 2.0)),
}


def sample(rng: random.Random, mixture: str, split: str, digits: str = "sklearn") -> vqa.Sample:
    kinds, weights = zip(*MIXTURES[mixture])
    while True:
        kind = rng.choices(kinds, weights)[0]
        if kind == "digits":
            _, labels, splits = digit_source(digits)
            pool = splits[split]
            return vqa.digits_sample(digits, tuple(int(pool[rng.randrange(len(pool))]) for _ in range(4)), labels)
        s = vqa.scene_sample(vqa.random_scene_id(rng, split), kind, rng)
        if s is not None:
            return s


def held_out_samples(n: int, mixture: str = "vqa", seed: int = 0, digits: str = "sklearn") -> list[vqa.Sample]:
    rng = random.Random(f"held-out/{seed}")
    return [sample(rng, mixture, "test", digits) for _ in range(n)]


def tokenizer_corpus(digits: str = "sklearn") -> list[str]:
    rng = random.Random("tokenizer")
    texts = [vqa.CAPTION_PROMPT, vqa.DIGITS_PROMPT, " ".join("0123456789")]
    for mixture in ("captions", "vqa"):
        for _ in range(3000):
            s = sample(rng, mixture, "train", "sklearn")
            texts += [s.prompt, s.answer]
    return texts


@functools.lru_cache(maxsize=None)
def build_tokenizer(vocab_size: int = 512) -> Path:
    """Byte-level BPE trained on the generators' text (deterministic), saved in a fresh temporary directory."""
    from steplab.data.tokenizer import train_tokenizer

    out = Path(tempfile.mkdtemp(prefix="steplab-vqa-tokenizer-"))
    train_tokenizer(tokenizer_corpus(), vocab_size).save(out)
    return out


def insert_image_slots(tokenizer, ids: list[int], counts: list[int], n_tokens: int,
                       mask: list[int] | None = None, place: str = "start") -> tuple[list[int], list[int] | None]:
    """Chat-template ids (and their assistant mask) with ``counts[k] * n_tokens`` image slots (mask 0) in
    message k: right after its role marker (``place="start"``, LLaVA's order) or right before its closing
    <|end|> (``"end"``: after the text, so each image token can attend to the question; models/vision.py).

    Message k's marker is the k-th role marker in ``ids``: contents are plain text and never hold control ids,
    so the markers (and each message's first <|end|>) are exactly the template's."""
    from steplab.models.vision import IMAGE_SLOT

    if place not in IMAGE_PLACES:
        raise ConfigError(f"image place {place!r} is not one of {', '.join(IMAGE_PLACES)}")
    roles = {tokenizer.special_ids[f"<|{r}|>"] for r in ("system", "user", "assistant")}
    end = tokenizer.special_ids["<|end|>"]
    out, out_mask, k, pending = [], [], 0, 0
    for i, t in enumerate(ids):
        if t == end and pending:  # place == "end": the open message's images go before its <|end|>
            out += [IMAGE_SLOT] * pending
            out_mask += [0] * pending
            pending = 0
        out.append(t)
        out_mask.append(mask[i] if mask is not None else 0)
        if t in roles:
            n = counts[k] * n_tokens if k < len(counts) else 0
            k += 1
            if place == "end":
                pending = n
                continue
            out += [IMAGE_SLOT] * n
            out_mask += [0] * n
    if pending:  # a generation prompt ends inside an open message only if the template has no <|end|> yet
        out += [IMAGE_SLOT] * pending
        out_mask += [0] * pending
    return out, (out_mask if mask is not None else None)


def render(tokenizer, s: vqa.Sample, n_image_tokens: int, place: str = "start") -> tuple[list[int], list[int]]:
    """(ids, loss mask) of the one-turn conversation under the chat template (``steplab.data.chat``): the image
    at ``place`` in the user's turn; the mask is 1 on the assistant's answer and its closing <|end|>."""
    from steplab.data.chat import render as chat_render

    ids, mask = chat_render([{"role": "user", "content": s.prompt}, {"role": "assistant", "content": s.answer}], tokenizer)
    return insert_image_slots(tokenizer, ids, [1], n_image_tokens, mask, place)


def cell_words(spec: tuple) -> list[tuple[str, ...]]:
    """Per cell of the 3x3 grid, the words a caption says about it: (colour, shape, position) for a scene's
    object, (digit, position) for a grid's digit, (position,) for an empty cell."""
    if spec[0] == "scene":
        return vqa.cell_words(vqa.make_scene(spec[1]))
    labels = digit_source(spec[1])[1]
    digit = dict(zip(DIGIT_CELLS, spec[2], strict=True))
    return [(str(int(labels[digit[c]])), vqa.POSITIONS[c]) if c in digit else (vqa.POSITIONS[c],)
            for c in range(vqa.GRID ** 2)]


SLOT_WORDS = 8  # token columns per slot target: a scene cell's words take at most 7 tokens with this tokenizer
SLOT_FORMS = ("", " ")  # each word as an answer starts it and as it stands inside a question ("red" / " red")


def slot_targets(tokenizer, spec: tuple, n_tokens: int) -> torch.Tensor:
    """(n_tokens, SLOT_WORDS) token ids image token k should read as (models/vision.py's slot loss): the words of
    cell k (:func:`cell_words`) in both of their forms (an answer's "top" and a question's " top" are different
    tokens: the first is what an answer copies, the second what a question is matched by), each token once,
    IGNORE-padded; all IGNORE unless there is one image token per cell."""
    out = torch.full((n_tokens, SLOT_WORDS), IGNORE, dtype=torch.long)
    if n_tokens != vqa.GRID ** 2:
        return out
    for k, words in enumerate(cell_words(spec)):
        ids = list(dict.fromkeys(t for w in words for form in SLOT_FORMS for t in tokenizer.encode(form + w)))
        if len(ids) > SLOT_WORDS:
            raise ValueError(f"cell {k} of {spec} has {len(ids)} slot-target tokens, more than SLOT_WORDS={SLOT_WORDS}")
        out[k, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


def collate(tokenizer, samples: list[vqa.Sample], n_image_tokens: int, seq_len: int,
            place: str = "start") -> tuple[torch.Tensor, ...]:
    """(idx, targets, images, slot_targets): rows padded with <|eos|> to ``seq_len``; targets -100 except where
    the next token is part of the answer; slot_targets (B, n_image_tokens, SLOT_WORDS) as :func:`slot_targets`."""
    idx = torch.full((len(samples), seq_len), tokenizer.eos_id, dtype=torch.long)
    targets = torch.full((len(samples), seq_len), IGNORE, dtype=torch.long)
    for row, s in enumerate(samples):
        ids, mask = render(tokenizer, s, n_image_tokens, place)
        if len(ids) > seq_len + 1:
            raise ConfigError(f"a {s.qtype} example needs {len(ids) - 1} tokens but data.seq_len={seq_len}; raise data.seq_len")
        idx[row, :len(ids) - 1] = torch.tensor(ids[:-1])
        targets[row, :len(ids) - 1] = torch.tensor([t if m else IGNORE for t, m in zip(ids[1:], mask[1:])])
    images = torch.stack([to_tensor(draw(s.image)) for s in samples])
    slots = torch.stack([slot_targets(tokenizer, s.image, n_image_tokens) for s in samples])
    return idx, targets, images, slots


# ---- the trainer's data kind ------------------------------------------------------------------------------

class VQAData:
    """The ``vqa`` data kind (TrainData): an endless seeded stream of rendered examples, exact resume by count."""

    def __init__(self, mixture: str, tokenizer_dir: Path, batch_size: int, seq_len: int, n_image_tokens: int,
                 seed: int = 0, eval_batches: int = 8, digits: str = "sklearn", place: str = "start"):
        from steplab.data.tokenizer import Tokenizer

        if mixture not in MIXTURES:
            raise ConfigError(f"data.path={mixture!r} is not a Step-1V mixture; use one of {', '.join(MIXTURES)} "
                              "(add ':mnist' for MNIST digit grids)")
        self.mixture, self.digits, self.seed = mixture, digits, seed
        self.tokenizer_dir = tokenizer_dir
        self.tokenizer = Tokenizer.load(tokenizer_dir)
        self.vocab_size = self.tokenizer.vocab_size
        self.batch_size, self.seq_len, self.n_image_tokens, self.place = batch_size, seq_len, n_image_tokens, place
        self.tokens_per_batch = batch_size * seq_len
        self.n_eval = eval_batches
        self.position = 0  # examples drawn so far

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        samples = [sample(random.Random(f"{self.seed}/{self.position + i}"), self.mixture, "train", self.digits)
                   for i in range(self.batch_size)]
        self.position += self.batch_size
        return collate(self.tokenizer, samples, self.n_image_tokens, self.seq_len, self.place)

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])

    def eval_batches(self):
        held = held_out_samples(self.n_eval * self.batch_size, self.mixture, digits=self.digits)
        for i in range(0, len(held), self.batch_size):
            yield collate(self.tokenizer, held[i:i + self.batch_size], self.n_image_tokens, self.seq_len, self.place)


def parse_path(path: str) -> tuple[str, str]:
    """``vqa`` | ``captions`` [``:mnist``] -> (mixture, digit source)."""
    mixture, _, digits = (path or "vqa").partition(":")
    return mixture, digits or "sklearn"


def build_vqa_data(cfg) -> VQAData:
    mixture, digits = parse_path(cfg.data.path)
    v = cfg.model.vision
    if v.image_size != IMAGE_SIZE:
        raise ConfigError(f"the vqa data draws {IMAGE_SIZE}x{IMAGE_SIZE} images but model.vision.image_size={v.image_size}")
    return VQAData(mixture, build_tokenizer(), cfg.train.batch_size, cfg.data.seq_len, v.n_tokens, seed=cfg.train.seed,
                   eval_batches=cfg.train.eval_batches, digits=digits, place=v.image_place)
