"""Visual question answering: Sort-of-CLEVR-style scenes and digit grids, their questions and the grader.

A *scene* is a 3x3 grid of cells on a 48x48 canvas holding ``N_OBJECTS`` objects of distinct colours, each a
circle, square or triangle in its own cell (drawn by ``steplab.data.images``). Questions, as in Sort-of-CLEVR
(Santoro et al. 2017), come in two kinds:

- non-relational: the ``shape`` of the <colour> object, the ``colour`` of the object at a position, the
  ``position`` of the <colour> object;
- relational: the colour of the object ``closest`` to the <colour> object, the shape of the one ``farthest``
  from it, and ``count``: how many objects share its shape. Distances are between cell centres; a closest or
  farthest question is only asked when its answer is unique.

A *digit grid* is 2x2 real handwritten digits (scikit-learn's ``load_digits``, or MNIST's test images for a
larger benchmark) captioned by its digits in reading order ("3 7 1 0").

Held-out splits are by source image: scene ids with ``id % 10 == 0`` are held out (a held-out scene is never a
training scene); digit images are split once by a seeded permutation, and a grid only ever combines digits of
one split. Answers are graded by exact match; chance for a question type is the accuracy of always answering
its most common held-out answer.
"""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

COLOURS = ("red", "green", "blue", "orange", "gray", "yellow")
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right")
N_OBJECTS = 5
GRID = 3  # cells per side
NON_RELATIONAL = ("shape", "colour", "position")
RELATIONAL = ("closest", "farthest", "count")
SCENE_TYPES = NON_RELATIONAL + RELATIONAL
CAPTION_PROMPT = "describe the image."
DIGITS_PROMPT = "what digits are shown?"
HELD_OUT_EVERY = 10  # scene ids divisible by this are held out


@dataclass(frozen=True)
class Obj:
    colour: str
    shape: str
    cell: int  # 0..8, row-major: POSITIONS[cell] names it
    jitter: tuple[int, int]  # pixel offset of its centre from the cell centre (drawing only)


@dataclass(frozen=True)
class Scene:
    id: int
    objects: tuple[Obj, ...]


@dataclass(frozen=True)
class Sample:
    """One training or test example: what image to draw, the user's text, the expected answer, its type."""

    image: tuple  # ("scene", scene_id) | ("digits", source, (i0, i1, i2, i3))
    prompt: str
    answer: str
    qtype: str  # a SCENE_TYPES name, "caption" (scene caption) or "digits"


def split_of_scene(scene_id: int) -> str:
    return "test" if scene_id % HELD_OUT_EVERY == 0 else "train"


def make_scene(scene_id: int) -> Scene:
    rng = random.Random(scene_id)
    colours = rng.sample(COLOURS, N_OBJECTS)
    cells = rng.sample(range(GRID * GRID), N_OBJECTS)
    objs = tuple(Obj(c, rng.choice(SHAPES), cell, (rng.randint(-2, 2), rng.randint(-2, 2))) for c, cell in zip(colours, cells))
    return Scene(scene_id, objs)


def _dist2(a: Obj, b: Obj) -> int:
    (ra, ca), (rb, cb) = divmod(a.cell, GRID), divmod(b.cell, GRID)
    return (ra - rb) ** 2 + (ca - cb) ** 2


def _extreme(scene: Scene, ref: Obj, far: bool) -> Obj | None:
    """The object closest to (farthest from) ``ref``, or None when two tie."""
    others = sorted((o for o in scene.objects if o is not ref), key=lambda o: _dist2(o, ref), reverse=far)
    if _dist2(others[0], ref) == _dist2(others[1], ref):
        return None
    return others[0]


def question(scene: Scene, qtype: str, rng: random.Random) -> tuple[str, str] | None:
    """(question, answer) of type ``qtype`` about a random object of ``scene``; None when it has no unique answer."""
    ref = rng.choice(scene.objects)
    if qtype == "shape":
        return f"what shape is the {ref.colour} object?", ref.shape
    if qtype == "colour":
        return f"what colour is the object at the {POSITIONS[ref.cell]}?", ref.colour
    if qtype == "position":
        return f"where is the {ref.colour} object?", POSITIONS[ref.cell]
    if qtype == "closest":
        o = _extreme(scene, ref, far=False)
        return None if o is None else (f"what colour is the object closest to the {ref.colour} object?", o.colour)
    if qtype == "farthest":
        o = _extreme(scene, ref, far=True)
        return None if o is None else (f"what shape is the object farthest from the {ref.colour} object?", o.shape)
    if qtype == "count":
        n = sum(o.shape == ref.shape for o in scene.objects)
        return f"how many objects have the shape of the {ref.colour} object?", str(n)
    raise ValueError(f"unknown question type {qtype!r}; known: {', '.join(SCENE_TYPES)}")


def answer_for(scene: Scene, s: Sample) -> str | None:
    """The answer to ``s``'s question about another ``scene`` (None: the question has no unique answer there)."""
    if s.qtype == "colour":
        ref = next((o for o in scene.objects if f"at the {POSITIONS[o.cell]}?" in s.prompt), None)
    else:
        ref = next((o for o in scene.objects if f"the {o.colour} object" in s.prompt), None)
    if ref is None:
        return None
    qa = question(Scene(scene.id, scene.objects), s.qtype, _Fixed(ref))
    return None if qa is None or qa[0] != s.prompt else qa[1]


class _Fixed(random.Random):
    """A Random whose choice() picks a given object: asks a question about a chosen reference."""

    def __init__(self, obj: Obj):
        super().__init__(0)
        self.obj = obj

    def choice(self, seq):
        return self.obj


def scene_caption(scene: Scene) -> str:
    """The objects in reading order: "red circle top left, blue square centre, ..."."""
    return ", ".join(f"{o.colour} {o.shape} {POSITIONS[o.cell]}" for o in sorted(scene.objects, key=lambda o: o.cell))


def cell_words(scene: Scene) -> list[tuple[str, ...]]:
    """Per cell in reading order, the words a caption says about it: (colour, shape, position) where an object
    is, (position,) where none is. Step-1V's slot loss (models/vision.py) trains image token k to read as them."""
    at = {o.cell: o for o in scene.objects}
    return [(at[c].colour, at[c].shape, POSITIONS[c]) if c in at else (POSITIONS[c],) for c in range(GRID * GRID)]


def scene_sample(scene_id: int, qtype: str, rng: random.Random) -> Sample | None:
    scene = make_scene(scene_id)
    if qtype == "caption":
        return Sample(("scene", scene_id), CAPTION_PROMPT, scene_caption(scene), "caption")
    qa = question(scene, qtype, rng)
    return None if qa is None else Sample(("scene", scene_id), qa[0], qa[1], qtype)


def digits_sample(source: str, indices: tuple[int, ...], labels) -> Sample:
    return Sample(("digits", source, tuple(indices)), DIGITS_PROMPT, " ".join(str(int(labels[i])) for i in indices), "digits")


def random_scene_id(rng: random.Random, split: str) -> int:
    """A scene id of ``split``: held-out ids are the multiples of HELD_OUT_EVERY."""
    k = rng.randrange(10 ** 9)
    return k * HELD_OUT_EVERY if split == "test" else k * HELD_OUT_EVERY + rng.randrange(1, HELD_OUT_EVERY)


def grade(sample: Sample, output: str) -> bool:
    return output.strip() == sample.answer


def chance(samples: list[Sample]) -> dict[str, float]:
    """Per question type: the accuracy of always giving that type's most common answer."""
    by_type: dict[str, Counter] = {}
    for s in samples:
        by_type.setdefault(s.qtype, Counter())[s.answer] += 1
    return {t: c.most_common(1)[0][1] / sum(c.values()) for t, c in by_type.items()}


def accuracy_by_type(samples: list[Sample], outputs: list[str]) -> dict[str, dict[str, float]]:
    """{type: {"n", "correct", "accuracy", "chance"}}, plus "non_relational" and "relational" pooled rows."""
    ch = chance(samples)
    rows: dict[str, dict[str, float]] = {}
    for s, out in zip(samples, outputs, strict=True):
        groups = [s.qtype] + (["non_relational"] if s.qtype in NON_RELATIONAL else ["relational"] if s.qtype in RELATIONAL else [])
        for g in groups:
            r = rows.setdefault(g, {"n": 0, "correct": 0})
            r["n"] += 1
            r["correct"] += grade(s, out)
    for g, r in rows.items():
        r["accuracy"] = r["correct"] / r["n"]
        if g in ch:
            r["chance"] = ch[g]
    for pooled, types in (("non_relational", NON_RELATIONAL), ("relational", RELATIONAL)):
        if pooled in rows:  # pooled chance: the types' chances weighted by their counts
            rows[pooled]["chance"] = sum(ch[t] * rows[t]["n"] for t in types if t in rows) / rows[pooled]["n"]
    return rows
