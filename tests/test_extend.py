"""`steplab extend`, the long-document data, passkey examples and the long-context evals."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import tiny_overrides
from steplab.cli import main
from steplab.config import RunConfig, resolve
from steplab.data.prepare import load_prepared
from steplab.errors import ConfigError
from steplab.tasks.passkey import CHANCE, Passkey, split_of_key
from steplab.train.checkpoint import list_checkpoints, load_run
from steplab.train.extend import build_long_dataset, extension_plan
from steplab.train.metrics import read_jsonl
from steplab.train.trainer import train


@pytest.fixture(scope="module")
def base_run(tiny_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("extend") / "base"
    train(resolve(overrides=tiny_overrides(tiny_data, steps=4, **{"model.max_seq_len": 64})), run, progress=False)
    return run


def test_passkey_examples_are_exact_length_with_held_out_keys(tiny_data):
    tok, _, _, _ = load_prepared(tiny_data)
    task = Passkey(tok)
    for length, depth in ((96, 0.0), (200, 0.5), (300, 1.0)):
        e = task.example(length, depth, 12345)
        assert len(e.tokens) == length and e.tokens[0] == tok.bos_id
        assert tok.decode(e.tokens[-e.answer_len:]).strip() == "12345"
        assert tok.decode(e.tokens).count("12345") == 3  # twice in the key sentence, once as the answer
    ex = task.eval_examples(30, 128, 0.5)
    assert all(split_of_key(e.key) == "test" for e in ex) and len({e.key for e in ex}) > 25
    train_docs = task.documents(30, 128, seed=1)
    assert all(len(d) == 128 for d in train_docs)
    with pytest.raises(ValueError, match="too short"):
        task.example(20, 0.5, 12345)
    assert CHANCE == 1e-5


def test_packed_passkey_rows_mix_document_lengths(tiny_data, tmp_path):
    tok, _, _, _ = load_prepared(tiny_data)
    task = Passkey(tok)
    rows = task.packed_rows(40, 400, 100, seed=3)
    assert all(len(r) == 400 and r[0] == tok.bos_id for r in rows)
    lengths = []
    for r in rows:
        starts = [i for i, t in enumerate(r) if t == tok.bos_id] + [400]
        lengths += [b - a for a, b in zip(starts[:-1], starts[1:])]
        assert tok.decode(r).count("What is the pass key?") == len(starts) - 1  # whole documents only
    assert min(lengths) >= 100 and max(lengths) == 400 and len(set(lengths)) > 20
    with pytest.raises(ValueError, match="do not fit"):
        task.packed_rows(1, 120, 200, seed=0)
    meta = build_long_dataset(tiny_data, tmp_path / "mixed", 400, passkey_fraction=0.5, passkey_min_length=100)
    assert meta["passkey_min_length"] == 100 and meta["passkey_rows"] == meta["corpus_rows"]
    with pytest.raises(ConfigError, match="minimum length"):
        build_long_dataset(tiny_data, tmp_path / "bad", 400, passkey_fraction=0.5, passkey_min_length=500)


def test_long_dataset_rows_documents_and_passkey_share(tiny_data, tmp_path):
    meta = build_long_dataset(tiny_data, tmp_path / "long", 128, passkey_fraction=0.25, min_doc_tokens=400)
    tok, train_shards, val, _ = load_prepared(tmp_path / "long")
    assert len(train_shards) == 128 * (meta["corpus_rows"] + meta["passkey_rows"])
    assert meta["passkey_rows"] == round(meta["corpus_rows"] / 3)
    rows = np.asarray(train_shards.tokens).reshape(-1, 128)
    # Corpus rows come only from documents of >= 400 tokens: every document start in them begins a long one.
    src = np.asarray(load_prepared(tiny_data)[1].tokens)
    starts = np.flatnonzero(src == tok.bos_id).tolist() + [len(src)]
    assert meta["long_documents"] == sum(b - a >= 400 for a, b in zip(starts[:-1], starts[1:]))
    assert (rows[:, 0] == tok.bos_id).sum() >= meta["passkey_rows"]
    assert len(val) == len(load_prepared(tiny_data)[2])
    with pytest.raises(Exception, match="not empty"):
        build_long_dataset(tiny_data, tmp_path / "long", 128)


def test_extension_plan_derives_rope_batch_and_lr(base_run, tiny_data):
    plan = extension_plan(base_run, factor=4, method="yarn", steps=100, data_path=str(tiny_data))
    base = RunConfig.from_dict(json.loads((base_run / "config.json").read_text()))
    m, t = plan.cfg.model, plan.cfg.train
    assert (m.rope.scaling, m.rope.factor, m.rope.original_max_seq_len, m.max_seq_len) == ("yarn", 4.0, 64, 256)
    assert plan.cfg.data.seq_len == 256 and t.max_steps == 100 and t.init_from == str(base_run.resolve())
    assert t.batch_size * 256 == base.tokens_per_step  # 4 x 64 tokens -> 1 row of 256
    assert t.lr == pytest.approx(base.train.lr * base.train.min_lr_ratio)
    assert m.doc_mask_token == load_prepared(tiny_data)[0].bos_id
    assert any("lr:" in line for line in plan.reasoning)
    assert extension_plan(base_run, factor=8, method="pi", steps=10, data_path=str(tiny_data), seq_len=128).cfg.model.max_seq_len == 512
    assert any(line.startswith("YaRN ramp (beta_fast 32,") for line in plan.reasoning)
    tuned = extension_plan(base_run, factor=4, method="yarn", steps=10, data_path=str(tiny_data), beta_fast=2, beta_slow=0.5)
    assert (tuned.cfg.model.rope.beta_fast, tuned.cfg.model.rope.beta_slow) == (2.0, 0.5)
    with pytest.raises(ConfigError, match="beta"):
        extension_plan(base_run, factor=4, method="pi", steps=10, data_path=str(tiny_data), beta_fast=2)
    with pytest.raises(ConfigError, match="--method"):
        extension_plan(base_run, factor=4, method="rope9", steps=10, data_path=str(tiny_data))
    with pytest.raises(ConfigError, match="factor"):
        extension_plan(base_run, factor=1, method="yarn", steps=10, data_path=str(tiny_data))


def test_extend_trains_through_the_trainer_and_resumes_exactly(base_run, tmp_path, capsys):
    out = tmp_path / "long"
    args = ["extend", str(base_run), "--factor", "2", "--method", "yarn", "--steps", "6", "--out", str(out),
            "--memory", "", "--quiet", "--passkey-fraction", "0.2"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "lr:" in printed and "batch:" in printed and "Step Law" in printed
    saved = json.loads((out / "config.json").read_text())
    assert saved["model"]["rope"]["scaling"] == "yarn" and saved["model"]["rope"]["original_max_seq_len"] == 64
    reference = [r["loss"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    cfg, model, _, step = load_run(out)
    assert step == 6 and cfg.model.rope.factor == 2.0
    # It started from the base weights, not a fresh init: the first loss is near the base's last.
    base_last = [r["loss"] for r in read_jsonl(base_run / "metrics.jsonl") if "loss" in r][-1]
    assert reference[0] < base_last + 0.5
    for ckpt in list_checkpoints(out):
        if int(ckpt.name[5:]) > 3:
            shutil.rmtree(ckpt)
    assert main(args + ["--resume"]) == 0
    assert [r["loss"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r] == reference
    _, again, _, _ = load_run(out)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    # Export keeps the scaling in the keys transformers reads, and import reads it back.
    assert main(["export", "hf", str(out), str(tmp_path / "hf")]) == 0
    hf_cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_cfg["rope_parameters"]["rope_type"] == "yarn" and hf_cfg["rope_parameters"]["factor"] == 2.0
    assert main(["import", "hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    back, imported, _, _ = load_run(tmp_path / "back")
    assert back.model.rope.scaling == "yarn" and back.model.rope.original_max_seq_len == 64 and back.model.max_seq_len == 128
    ids = torch.randint(10, 300, (1, 128))
    with torch.no_grad():
        assert torch.equal(model(ids), imported(ids))


def test_eval_passkey_writes_heatmap_and_position_perplexity(base_run, tmp_path, capsys):
    report = tmp_path / "report"
    assert main(["eval", str(base_run), "--task", "passkey", "--lengths", "96,128", "--depths", "0,1", "--keys", "3",
                 "--report", str(report)]) == 0
    assert (report / "passkey.png").read_bytes()[:4] == b"\x89PNG"
    result = json.loads((report / "longctx.json").read_text())
    acc = result["passkey"]["accuracy"]
    assert set(acc) == {"96", "128"} and all(0 <= v <= 1 for row in acc.values() for v in row.values())
    ppl = result["perplexity"]["128"]
    assert len(ppl["buckets"]) == 8 and all(v > 1 for v in ppl["buckets"].values())
    assert "passkey exact match" in capsys.readouterr().out
    assert main(["eval", str(base_run), "--task", "passkey", "--depths", "2"]) == 2


def test_pose_positions_skip_ahead_within_the_span_and_resume_exactly(tiny_data):
    from steplab.data.loader import skip_positions
    from steplab.errors import DataError
    from steplab.train.data import TokenData

    pos = skip_positions(64, 32, 128, np.random.default_rng(0))
    assert pos.shape == (64, 32) and pos.dtype == torch.int64
    steps = pos.diff(dim=1)
    assert (pos[:, 0] == 0).all() and (steps >= 1).all() and ((steps > 1).sum(dim=1) <= 1).all()  # one jump at most
    assert int(pos.max()) <= 127 and int(pos[:, -1].max()) > 100  # reaches far into the span
    assert torch.equal(pos, skip_positions(64, 32, 128, np.random.default_rng(0)))
    with pytest.raises(DataError, match="must exceed"):
        skip_positions(2, 32, 32, np.random.default_rng(0))
    cfg = resolve(overrides=tiny_overrides(tiny_data, steps=4, **{"model.max_seq_len": 128, "data.pose_length": 128}))
    data = TokenData(cfg)
    data.next_batch()
    state = data.state_dict()
    x, y, p = data.next_batch()
    assert p.shape == x.shape and int(p.max()) < 128
    again = TokenData(cfg)
    again.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip((x, y, p), again.next_batch()))
    for bad, match in (({"data.pose_length": 32}, "must be in"), ({"data.pose_length": 256}, "must be in")):
        with pytest.raises(ConfigError, match=match):
            resolve(overrides=tiny_overrides(tiny_data, steps=4, **{"model.max_seq_len": 128, **bad}))


def test_model_positions_are_relative_and_default_to_the_row(base_run):
    cfg, model, _, _ = load_run(base_run)
    ids = torch.randint(10, 300, (2, 48))
    with torch.no_grad():
        plain = model(ids)
        assert torch.equal(model(ids, None, torch.arange(48).expand(2, 48)), plain)
        # RoPE sees only differences: every position shifted by 10 gives the same logits (up to rounding)
        assert torch.allclose(model(ids, None, torch.arange(10, 58).expand(2, 48)), plain, atol=1e-4)
        # a skip inside the row changes what the tokens after it see
        skipped = torch.cat([torch.arange(24), torch.arange(24) + 40]).expand(2, 48)
        out = model(ids, None, skipped)
        assert torch.allclose(out[:, :24], plain[:, :24], atol=1e-5) and not torch.allclose(out[:, 24:], plain[:, 24:], atol=1e-3)
        with pytest.raises(ValueError, match="exceeds max_seq_len"):
            model(ids, None, torch.arange(48).expand(2, 48) + cfg.model.max_seq_len)


def test_extend_with_pose_trains_rows_shorter_than_the_context(base_run, tiny_data, tmp_path, capsys):
    out = tmp_path / "pose"
    args = ["extend", str(base_run), "--factor", "4", "--seq-len", "128", "--pose", "--method", "yarn", "--steps", "4",
            "--out", str(out), "--memory", "", "--quiet"]
    assert main(args) == 0
    assert "PoSE: each row's second chunk skips ahead, so rows of 128 train distances up to 256" in capsys.readouterr().out
    saved = json.loads((out / "config.json").read_text())
    assert saved["data"]["pose_length"] == 256 and saved["data"]["seq_len"] == 128
    reference = [r["loss"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    for ckpt in list_checkpoints(out):
        if int(ckpt.name[5:]) > 2:
            shutil.rmtree(ckpt)
    assert main(args + ["--resume"]) == 0
    assert [r["loss"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r] == reference
    with pytest.raises(ConfigError, match="--pose"):
        extension_plan(base_run, factor=4, method="yarn", steps=4, data_path=str(tiny_data), pose=True)
