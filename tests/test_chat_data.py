"""Chat training data (steplab/data/chat_data.py, conversations.py) and the masked loss: targets exactly where
transformers' assistant mask is, zero gradient at masked positions, no NaN on fully masked batches, bad rows
named by file and line, exact resume."""
from __future__ import annotations

import json
import random

import pytest
import torch

from steplab.data.chat import IGNORE_INDEX
from steplab.data.chat_data import ChatData
from steplab.data.conversations import SourceStats, iter_conversations
from steplab.data.sources import iter_documents
from steplab.data.tokenizer import Tokenizer, train_tokenizer
from steplab.errors import DataError
from steplab.models.common import masked_cross_entropy

WORDS = ["alpha", " beta", " gamma", "\n", " 42", "?", " the", " answer", " is", ".", "héllo", " 🌍"]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(iter_documents("stdlib", max_bytes=150_000), 600)


def conversations(n: int, seed: int = 0, long: int = 0) -> list[list[dict[str, str]]]:
    rng = random.Random(seed)
    text = lambda k: "".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    out = []
    for i in range(n):
        msgs = [{"role": "user", "content": text(rng.randint(1, 8))},
                {"role": "assistant", "content": text(rng.randint(1, 8) + (400 if i < long else 0))}]
        if rng.random() < 0.5:
            msgs += [{"role": "user", "content": text(3)}, {"role": "assistant", "content": text(4)}]
        out.append(msgs)
    return out


def write_jsonl(path, convs) -> str:
    path.write_text("".join(json.dumps({"messages": c}, ensure_ascii=False) + "\n" for c in convs))
    return str(path)


def test_targets_are_exactly_transformers_assistant_tokens(tok, tmp_path):
    """In every packed row, each conversation's trained targets are, in order, exactly the tokens transformers'
    apply_chat_template(..., return_assistant_tokens_mask=True) marks as assistant tokens."""
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path / "tok")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    convs = [c[:2] for c in conversations(40)]
    data = ChatData(write_jsonl(tmp_path / "c.jsonl", convs), tok, 128, 4, eval_rows=4)
    want = {}
    for c in data._file_train:
        out = hf.apply_chat_template(c, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        want[tuple(out["input_ids"])] = [t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    checked = 0
    for _ in range(10):
        x, y = data.next_batch()
        for xr, yr in zip(x.tolist(), y.tolist()):
            n = xr.index(tok.pad_id) if tok.pad_id in xr else len(xr)
            starts = [i for i, t in enumerate(xr[:n]) if t == tok.bos_id] + [n]
            assert starts[0] == 0
            for a, b in zip(starts, starts[1:]):
                ids = next(k for k in want if k[:b - a] == tuple(xr[a:b]) and len(k) - (b - a) in (0, 1))
                assert [t for t in yr[a:b] if t != IGNORE_INDEX] == want[ids]
                checked += 1
            assert all(t == IGNORE_INDEX for t in yr[n:])  # padding trains nothing
    assert data.pack_stats.dropped == 0 and checked >= 40


def test_masked_positions_get_exactly_zero_gradient():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11, requires_grad=True)
    targets = torch.randint(0, 11, (2, 6))
    targets[0, :4] = IGNORE_INDEX
    targets[1, 3] = IGNORE_INDEX
    masked_cross_entropy(logits, targets).backward()
    ignored = targets == IGNORE_INDEX
    assert torch.equal(logits.grad[ignored], torch.zeros_like(logits.grad[ignored]))
    assert (logits.grad[~ignored].abs().sum(-1) > 0).all()
    # the loss is the mean over the trained positions only
    full = torch.nn.functional.cross_entropy(logits.detach()[~ignored], targets[~ignored])
    assert torch.allclose(masked_cross_entropy(logits.detach(), targets), full)


def test_fully_masked_batch_gives_zero_loss_not_nan():
    from steplab.config import ModelConfig
    from steplab.models import build_model

    for moe in (0, 4):
        cfg = ModelConfig(vocab_size=300, d_model=32, n_layer=2, n_head=2)
        cfg.moe.n_experts = moe
        model = build_model(cfg)
        x = torch.randint(0, 300, (2, 8))
        loss = model(x, torch.full((2, 8), IGNORE_INDEX))
        loss.backward()
        assert torch.isfinite(loss) and float(loss.detach()) == pytest.approx(0.0, abs=1e-6 if moe else 0.0)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_over_long_conversations_are_dropped_and_counted_never_cut(tok, tmp_path):
    convs = conversations(40, seed=1, long=5)
    data = ChatData(write_jsonl(tmp_path / "c.jsonl", convs), tok, 64, 4, eval_rows=4)
    n_train = len(data._file_train)
    for _ in range(20):
        x, y = data.next_batch()
        assert (y != IGNORE_INDEX).any(dim=1).all()  # every row trains something
    st = data.pack_stats
    assert st.dropped >= 1 and st.conversations + st.dropped <= 20 * 4 * 10
    long_ids = {i for i, c in enumerate(data._file_train) if len(tok.encode(c[1]["content"])) > 64}
    assert long_ids and n_train > len(long_ids)
    # the eval rows have targets; a batch where every conversation was too long is an error, not an empty batch
    assert all((yy != IGNORE_INDEX).any() for _, yy in data.eval_batches())


def test_bad_rows_name_file_and_line_or_are_counted(tmp_path):
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    bad = [("{not json", "bad JSON"), (json.dumps({"text": "x"}), "no field 'messages'"),
           (json.dumps({"messages": [{"role": "bot", "content": "x"}]}), "unknown role 'bot'"),
           (json.dumps({"messages": [{"role": "user", "content": "only a question"}]}), "no assistant message")]
    for line, match in bad:
        path = tmp_path / "d.jsonl"
        path.write_text(good + "\n\n" + line + "\n" + good + "\n")
        with pytest.raises(DataError, match=rf"d\.jsonl:3: .*{match}"):
            list(iter_conversations(str(path)))
        stats = SourceStats()
        assert len(list(iter_conversations(str(path), skip_bad=True, stats=stats))) == 2
        assert (stats.read, stats.skipped) == (2, 1)
    with pytest.raises(DataError, match="does not exist"):
        list(iter_conversations(str(tmp_path / "missing.jsonl")))


def test_parquet_and_hf_offline_sources(tmp_path, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    convs = conversations(5)
    pq.write_table(pa.table({"messages": convs}), tmp_path / "c.parquet")
    assert list(iter_conversations(str(tmp_path / "c.parquet"))) == convs
    pq.write_table(pa.table({"messages": [[{"role": "user", "content": "x"}]]}), tmp_path / "b.parquet")
    with pytest.raises(DataError, match=r"b\.parquet row 1: .*no assistant"):
        list(iter_conversations(str(tmp_path / "b.parquet")))
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    datasets.Dataset.from_list([{"messages": c} for c in convs]).save_to_disk(str(tmp_path / "ds"))
    assert list(iter_conversations(f"hf:{tmp_path / 'ds'}")) == convs


def test_resume_replays_the_stream_exactly(tok, tmp_path):
    src = write_jsonl(tmp_path / "c.jsonl", conversations(50))  # the builtin stream is replayed the same way
    a = ChatData(src, tok, 96, 3, eval_rows=3)
    for _ in range(4):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))  # checkpoints store it as JSON
    want = [a.next_batch() for _ in range(2)]
    b = ChatData(src, tok, 96, 3, eval_rows=3)
    b.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(want, [b.next_batch() for _ in range(2)]):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    with pytest.raises(DataError, match="seed"):
        ChatData(src, tok, 96, 3, seed=1).load_state_dict(state)
    ev = a.eval_batches()
    assert ev and all(torch.equal(p[1], q[1]) for p, q in zip(ev, b.eval_batches()))


def test_unmasked_ablation_trains_every_token_but_padding(tok, tmp_path):
    data = ChatData(write_jsonl(tmp_path / "c.jsonl", conversations(30)), tok, 64, 4, mask=False, eval_rows=4)
    x, y = data.next_batch()
    real = torch.cat([x[:, 1:], x[:, -1:]], dim=1) != tok.pad_id  # the predicted token is not padding
    assert torch.equal(y[:, :-1] != IGNORE_INDEX, real[:, :-1])
    # validation stays masked (assistant-token loss), so masked and unmasked runs compare on the same numbers
    masked = ChatData(write_jsonl(tmp_path / "c2.jsonl", conversations(30)), tok, 64, 4, eval_rows=4)
    assert all(torch.equal(p[1], q[1]) for p, q in zip(data.eval_batches(), masked.eval_batches()))


def test_builtin_task_weights_change_the_mix_and_bad_specs_name_the_fault(tok):
    from itertools import islice

    from steplab.data.conversations import BUILTIN_MIX, builtin_conversations, parse_mix
    from steplab.errors import ConfigError

    mix = parse_mix("spelling=6, identity=0")
    assert mix["spelling"] == 6 and "identity" not in mix and mix["recall"] == BUILTIN_MIX["recall"]
    spelled = lambda m: sum("Spell" in c[0]["content"] or "spell" in c[0]["content"] or "letters of" in c[0]["content"]
                            for c in islice(builtin_conversations("train", 0, m), 400))
    assert spelled(mix) > 2 * spelled(None)  # 6/13 vs 2/11 of the stream
    for bad, says in (("speling=2", "speling=2"), ("spelling=-1", "spelling=-1"), ("spelling=x", "spelling=x"),
                      (",".join(f"{k}=0" for k in BUILTIN_MIX), "every task weight 0")):
        with pytest.raises(ConfigError, match=says):
            parse_mix(bad)
    with pytest.raises(ConfigError, match="data.chat.tasks weights the builtin"):
        ChatData("chat.jsonl", tok, 64, 2, tasks="spelling=2")
