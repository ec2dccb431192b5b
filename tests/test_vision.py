"""Step-1V (issue 19): the model, the image data and its splits, the VQA questions, the optimizer's lr groups."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from steplab.config import preset, resolve
from steplab.data import images as I
from steplab.data.tokenizer import Tokenizer
from steplab.errors import ConfigError
from steplab.models import build_model, count_params
from steplab.models.vision import IMAGE_SLOT, Projector, Step1V, sincos_2d
from steplab.tasks import vqa
from steplab.train.optim import build_optimizer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.load(I.build_tokenizer())


def small_cfg(vocab: int, **vision):
    cfg = preset("step1v-nano").model
    cfg.vocab_size = vocab
    cfg.d_model, cfg.n_layer = 64, 2
    cfg.d_ff = 128
    cfg.vision.d_model, cfg.vision.n_layer = 32, 1
    for k, v in vision.items():
        setattr(cfg.vision, k, v)
    return cfg


def test_preset_builds_step1v_and_counts_every_parameter():
    cfg = preset("step1v-nano").validate().model
    cfg.vocab_size = 400
    model = build_model(cfg)
    assert isinstance(model, Step1V)
    assert cfg.vision.n_tokens == 9
    assert count_params(cfg)["total"] == sum(p.numel() for p in model.parameters())
    micro = preset("step1v-micro").validate().model
    micro.vocab_size = 400
    assert count_params(micro)["total"] == sum(p.numel() for p in build_model(micro).parameters())


def test_vision_config_is_validated():
    with pytest.raises(ConfigError, match="multiple of patch_size"):
        resolve("step1v-nano", overrides=["model.vision.image_size=50"])
    with pytest.raises(ConfigError, match="model.vision.projector_lr_mult"):
        resolve("step1v-nano", overrides=["model.vision.projector_lr_mult=0"])


def test_pixel_shuffle_groups_neighbouring_patches():
    cfg = small_cfg(300, patch_size=8, pixel_shuffle=2)
    proj = Projector(cfg.vision, cfg.d_model)
    side, D = 6, cfg.vision.d_model
    x = torch.arange(side * side, dtype=torch.float32)[None, :, None].expand(1, side * side, D)  # patch index as value
    proj.mlp = torch.nn.Identity()
    out = proj(x)  # (1, 9, 4 * D)
    assert out.shape == (1, 9, 4 * D)
    # token 0 holds patches (0,0) (0,1) (1,0) (1,1) = indices 0, 1, 6, 7; token 4 (the centre) 14, 15, 20, 21
    assert out[0, 0, ::D].tolist() == [0, 1, 6, 7]
    assert out[0, 4, ::D].tolist() == [14, 15, 20, 21]


def test_sincos_positions_are_distinct():
    pos = sincos_2d(6, 32)
    assert pos.shape == (36, 32)
    assert torch.cdist(pos, pos).add(torch.eye(36) * 10).min() > 0.1


def test_image_slots_carry_the_image(tok):
    torch.manual_seed(0)
    cfg = small_cfg(tok.vocab_size)
    model = Step1V(cfg).eval()
    s = vqa.Sample(("scene", 10), "what shape is the red object?", "circle", "shape")
    ids, _ = I.render(tok, s, cfg.vision.n_tokens)
    assert ids.count(IMAGE_SLOT) == 9 and ids.index(IMAGE_SLOT) == 2  # right after <|bos|><|user|>
    idx = torch.tensor([ids])
    a, b = torch.rand(1, 3, 48, 48), torch.rand(1, 3, 48, 48)
    with torch.no_grad():
        la, lb, la2 = model(idx, None, a), model(idx, None, b), model(idx, None, a)
        lz = model.decoder(idx, embeds=model.embed(idx, a, zero_images=True))
    assert torch.equal(la, la2)
    assert not torch.allclose(la[0, -1], lb[0, -1])  # a different image changes the prediction
    assert torch.allclose(la[0, :2], lb[0, :2])  # positions before the image cannot see it (causal)
    assert not torch.allclose(la[0, -1], lz[0, -1])
    with pytest.raises(ValueError, match="image slots"):
        model(idx, None, torch.rand(2, 3, 48, 48))
    with pytest.raises(ValueError, match="no images"):
        model.embed(idx, None)


def test_freeze_flags_and_projector_lr_group(tok):
    cfg = small_cfg(tok.vocab_size, freeze_encoder=True, freeze_decoder=True, projector_lr_mult=50.0)
    model = Step1V(cfg)
    tc = preset("step1v-nano").train
    opt = build_optimizer(model, tc, "cpu")
    trained = {id(p) for g in opt.param_groups for p in g["params"]}
    assert trained == {id(p) for p in model.projector.parameters()}
    assert {g["lr_mult"] for g in opt.param_groups if g["params"]} == {50.0}
    # the stage-2 model: everything trains, the projector at 50x
    cfg2 = small_cfg(tok.vocab_size, projector_lr_mult=50.0)
    opt2 = build_optimizer(Step1V(cfg2), tc, "cpu")
    fast = sum(p.numel() for g in opt2.param_groups if g["lr_mult"] == 50.0 for p in g["params"])
    assert fast == sum(p.numel() for p in Projector(cfg2.vision, cfg2.d_model).parameters())


def test_scene_questions_have_the_right_answers():
    O = vqa.Obj
    scene = vqa.Scene(0, (O("red", "circle", 0, (0, 0)), O("blue", "square", 1, (0, 0)), O("green", "circle", 8, (0, 0)),
                          O("gray", "triangle", 6, (0, 0)), O("yellow", "circle", 2, (0, 0))))
    red = scene.objects[0]
    ask = lambda t: vqa.question(scene, t, vqa._Fixed(red))  # noqa: E731
    assert ask("shape") == ("what shape is the red object?", "circle")
    assert ask("position") == ("where is the red object?", "top left")
    assert ask("colour") == ("what colour is the object at the top left?", "red")
    assert ask("closest") == ("what colour is the object closest to the red object?", "blue")
    assert ask("farthest") == ("what shape is the object farthest from the red object?", "circle")  # green, cell 8
    assert ask("count") == ("how many objects have the shape of the red object?", "3")
    # blue (cell 1): red (0) and yellow (2) are equally close -> no closest question
    assert vqa.question(scene, "closest", vqa._Fixed(scene.objects[1])) is None
    assert vqa.scene_caption(scene).startswith("red circle top left, blue square top, yellow circle top right")
    s = vqa.Sample(("scene", 0), "what shape is the object farthest from the red object?", "circle", "farthest")
    assert vqa.answer_for(scene, s) == "circle"


def test_drawn_scene_has_its_colours_where_the_scene_says():
    scene = vqa.make_scene(12345)
    px = I.draw_scene(scene)
    assert px.shape == (48, 48, 3) and px.dtype == np.uint8
    for o in scene.objects:
        row, col = divmod(o.cell, 3)
        x, y = col * 16 + 8 + o.jitter[0], row * 16 + 8 + o.jitter[1]
        assert tuple(px[y, x]) == I.RGB[o.colour]
    empty = set(range(9)) - {o.cell for o in scene.objects}
    for cell in empty:
        row, col = divmod(cell, 3)
        assert px[row * 16:(row + 1) * 16, col * 16:(col + 1) * 16].max() == 0


def test_held_out_splits_are_disjoint_by_source_image():
    rng = random.Random(0)
    train = {vqa.random_scene_id(rng, "train") for _ in range(2000)}
    test = {vqa.random_scene_id(rng, "test") for _ in range(2000)}
    assert all(vqa.split_of_scene(i) == "train" for i in train) and all(vqa.split_of_scene(i) == "test" for i in test)
    _, labels, splits = I.digit_source("sklearn")
    assert not set(splits["train"]) & set(splits["test"])
    assert len(splits["train"]) + len(splits["test"]) == len(labels) == 1797
    held = I.held_out_samples(300, "vqa")
    for s in held:
        if s.image[0] == "digits":
            assert set(s.image[2]) <= set(splits["test"].tolist())
            assert s.answer == " ".join(str(labels[i]) for i in s.image[2])
        else:
            assert vqa.split_of_scene(s.image[1]) == "test"
    assert {s.qtype for s in held} == set(vqa.SCENE_TYPES) | {"digits", "caption"}


def test_chance_is_the_majority_answer_per_type():
    S = vqa.Sample
    samples = [S(("scene", 0), "q", a, "shape") for a in ("circle", "circle", "square")] + [S(("scene", 0), "q", "3", "count")]
    assert vqa.chance(samples) == {"shape": pytest.approx(2 / 3), "count": 1.0}
    rows = vqa.accuracy_by_type(samples, ["circle", "square", "square", "2"])
    assert rows["shape"]["accuracy"] == pytest.approx(2 / 3) and rows["count"]["accuracy"] == 0.0
    assert rows["relational"]["n"] == 1 and rows["non_relational"]["chance"] == pytest.approx(2 / 3)


def test_stream_is_deterministic_resumable_and_masks_the_answer_only(tok):
    d = I.VQAData("vqa", I.build_tokenizer(), batch_size=4, seq_len=48, n_image_tokens=9, seed=3)
    d.next_batch()
    state = d.state_dict()
    b1 = d.next_batch()
    d2 = I.VQAData("vqa", I.build_tokenizer(), batch_size=4, seq_len=48, n_image_tokens=9, seed=3)
    d2.load_state_dict(state)
    b2 = d2.next_batch()
    assert all(torch.equal(x, y) for x, y in zip(b1, b2))
    idx, targets, imgs, slot_targets = b1
    assert idx.shape == targets.shape == (4, 48) and imgs.shape == (4, 3, 48, 48)
    assert slot_targets.shape == (4, 9, I.SLOT_WORDS)
    end = tok.special_ids["<|end|>"]
    for row in range(4):
        t = targets[row][targets[row] != -100].tolist()
        assert t[-1] == end and end not in t[:-1]  # the answer and its closing <|end|>, nothing of the prompt
        assert (idx[row] == IMAGE_SLOT).sum() == 9
    e1, e2 = list(d.eval_batches()), list(d2.eval_batches())
    assert all(torch.equal(x, y) for a, b in zip(e1, e2) for x, y in zip(a, b))
    with pytest.raises(ConfigError, match="not a Step-1V mixture"):
        I.VQAData("pictures", I.build_tokenizer(), 4, 48, 9)


def test_eval_metrics_exact_match_equals_teacher_forced_argmax(tok):
    torch.manual_seed(0)
    model = Step1V(small_cfg(tok.vocab_size)).eval()
    d = I.VQAData("vqa", I.build_tokenizer(), batch_size=8, seq_len=48, n_image_tokens=9, eval_batches=1)
    m = model.eval_metrics(d.eval_batches())
    assert m["val_loss"] > 0 and 0 <= m["val_answer_acc"] <= 1
    idx, targets, imgs, _ = next(iter(d.eval_batches()))
    loss = model(idx, targets, imgs).item()
    assert m["val_loss"] == pytest.approx(loss, rel=1e-4)


def test_trains_through_the_one_trainer_and_resumes_exactly(tmp_path, capsys):
    from steplab.train.metrics import read_jsonl
    from steplab.train.trainer import train

    threads = torch.get_num_threads()
    sets = ["model.d_model=64", "model.n_layer=2", "model.d_ff=128", "model.vision.n_layer=1", "model.vision.d_model=32",
            "train.batch_size=4", "train.max_steps=4", "train.eval_every=2", "train.eval_batches=1", "train.ckpt_every=2",
            "train.threads=1", "train.dtype=fp32"]
    try:
        full = train(resolve("step1v-nano", overrides=sets), tmp_path / "full", progress=False)
        # stopped after 2 steps (still in warmup, so the lr schedule is the same), then resumed to 4
        train(resolve("step1v-nano", overrides=sets + ["train.max_steps=2"]), tmp_path / "part", progress=False)
        train(resolve("step1v-nano", overrides=sets), tmp_path / "part", resume=True, progress=False, allow_config_change=True)
    finally:
        torch.set_num_threads(threads)
    losses = lambda run: [r["loss"] for r in read_jsonl(tmp_path / run / "metrics.jsonl") if "loss" in r]  # noqa: E731
    assert losses("full") == losses("part") and len(losses("full")) == 4
    assert {"val_loss", "val_answer_acc"} <= set(full) and (tmp_path / "full" / "tokenizer" / "tokenizer.json").is_file()
    # `steplab eval --task vqa --checkpoint`: an earlier checkpoint of the run, not the latest
    import json

    from steplab.cli import main
    from steplab.train.checkpoint import checkpoint_dir

    step2 = checkpoint_dir(tmp_path / "full") / "step_00000002"
    assert main(["eval", str(tmp_path / "full"), "--task", "vqa", "-n", "6", "--checkpoint", str(step2)]) == 0
    out = capsys.readouterr().out
    res = json.loads(out[out.index("{"):])
    assert res["step"] == 2 and res["digits"] == "sklearn"  # the digit grids' source is the run's (data.path "vqa")
    swap = res["swap"]  # split by question group, the groups' counts adding up to the whole
    assert swap["non_relational"]["n"] + swap["relational"]["n"] == swap["n"]
    assert swap["non_relational"]["changed"] + swap["relational"]["changed"] == swap["changed"]


def test_images_go_after_the_text_with_place_end(tok):
    s = vqa.Sample(("scene", 10), "what shape is the red object?", "circle", "shape")
    start, mask_start = I.render(tok, s, 9)
    end, mask_end = I.render(tok, s, 9, "end")
    user, close = tok.special_ids["<|user|>"], tok.special_ids["<|end|>"]
    first_end = end.index(close)
    assert end[first_end - 9:first_end] == [IMAGE_SLOT] * 9 and end.count(IMAGE_SLOT) == 9
    assert end[end.index(user) + 1] != IMAGE_SLOT  # the question's text comes first
    assert sorted(start) == sorted(end)  # the same tokens, moved
    # the assistant's answer and its mask are the same tokens in both orders
    assert [t for t, m in zip(start, mask_start) if m] == [t for t, m in zip(end, mask_end) if m] == tok.encode("circle") + [close]
    # two images in the first of two user messages: all 18 slots close that message
    ids, _ = I.insert_image_slots(tok, [0, user, 50, 51, close, user, 52, close], [2, 0], 9, place="end")
    assert ids == [0, user, 50, 51] + [IMAGE_SLOT] * 18 + [close, user, 52, close]
    with pytest.raises(ConfigError, match="image place 'middle'"):
        I.insert_image_slots(tok, [0, user, 50, close], [1], 9, place="middle")


def test_slot_targets_name_each_cells_words(tok):
    O = vqa.Obj
    scene = vqa.Scene(0, (O("red", "circle", 0, (0, 0)), O("blue", "square", 4, (0, 0))))
    assert vqa.cell_words(scene)[:2] == [("red", "circle", "top left"), ("top",)]
    t = I.slot_targets(tok, ("scene", 12345), 9)
    sc = vqa.make_scene(12345)
    words = vqa.cell_words(sc)
    for k in range(9):
        want = list(dict.fromkeys(i for w in words[k] for form in ("", " ") for i in tok.encode(form + w)))
        assert t[k, :len(want)].tolist() == want and (t[k, len(want):] == -100).all()
    for o in sc.objects:  # an object's cell starts with its colour's and shape's tokens, as answered and as asked
        assert t[o.cell, :4].tolist() == tok.encode(o.colour) + tok.encode(" " + o.colour) + tok.encode(o.shape) + tok.encode(" " + o.shape)
    _, labels, splits = I.digit_source("sklearn")
    idx = tuple(int(i) for i in splits["test"][:4])
    d = I.slot_targets(tok, ("digits", "sklearn", idx), 9)
    for cell, i in zip(I.DIGIT_CELLS, idx):
        assert d[cell, 0].item() == tok.encode(str(labels[i]))[0]
    assert d[4].tolist() == tok.encode("centre") + tok.encode(" centre") + [-100] * (I.SLOT_WORDS - 2)  # empty: position only
    assert (I.slot_targets(tok, ("scene", 1), 36) == -100).all()  # not one token per cell: no targets


def test_slot_loss_is_the_summed_word_cross_entropy_per_image_token(tok):
    torch.manual_seed(0)
    cfg = small_cfg(tok.vocab_size, slot_loss=0.5, image_place="end")
    model = Step1V(cfg)
    samples = I.held_out_samples(3, "vqa", seed=2)
    idx, targets, imgs, st = I.collate(tok, samples, 9, 48, "end")
    with torch.no_grad():
        logits = model(idx, None, imgs)
        plain = model(idx, targets, imgs).item()  # without slot targets: the answer loss alone
        total = model(idx, targets, imgs, st).item()
    lp = logits[idx == IMAGE_SLOT].log_softmax(-1)  # (27, V): the images' tokens in order
    flat = st.reshape(27, -1)
    per_token = [-sum(lp[k, w].item() for w in flat[k].tolist() if w != -100) for k in range(27)]
    assert plain == pytest.approx(torch.nn.functional.cross_entropy(logits[targets != -100], targets[targets != -100]).item(), rel=1e-5)
    assert total == pytest.approx(plain + 0.5 * sum(per_token) / 27, rel=1e-5)
    cfg0 = small_cfg(tok.vocab_size, slot_loss=0.0)  # the first session's default: the targets are ignored
    model0 = Step1V(cfg0)
    with torch.no_grad():
        assert model0(idx, targets, imgs, st).item() == model0(idx, targets, imgs).item()


def test_presets_use_the_measured_recipe_and_old_configs_keep_theirs():
    nano = preset("step1v-nano")
    assert (nano.model.vision.image_place, nano.model.vision.slot_loss) == ("end", 1.0)
    assert nano.train.lr == 5e-4
    from steplab.config import VisionConfig
    old = VisionConfig(image_size=48, patch_size=16)  # a first-session checkpoint's config has neither field
    assert (old.image_place, old.slot_loss) == ("start", 0.0)
    with pytest.raises(ConfigError, match="image_place"):
        resolve("step1v-nano", overrides=["model.vision.image_place=middle"])
    with pytest.raises(ConfigError, match="one image token per cell"):
        resolve("step1v-nano", overrides=["model.vision.patch_size=8"])
