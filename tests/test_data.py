"""Data pipeline: sources, split, shards, loader (exact resume), prepare (atomic)."""
from __future__ import annotations

import json
import random
import warnings

import numpy as np
import pytest

from steplab.data.loader import TokenLoader, iter_eval_batches
from steplab.data.prepare import assign_splits, load_prepared, prepare_data
from steplab.data.shards import ShardSet, write_shards
from steplab.data.sources import chunk_text, iter_documents, split_of
from steplab.errors import DataError


def words(rng: random.Random, n: int) -> str:
    vocab = ["the", "model", "loss", "token", "scaling", "law", "data", "train", "batch", "learning", "rate"]
    return " ".join(rng.choice(vocab) for _ in range(n))


def make_corpus(root, n_docs: int = 40, seed: int = 0) -> list[str]:
    """A folder of small text files; returns their contents in the order iter_documents yields them."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    docs = []
    for i in range(n_docs):
        text = f"document {i}\n" + words(rng, 50 + i)
        (root / f"doc_{i:03d}.txt").write_text(text, encoding="utf-8")
        docs.append(text)
    return docs


# ---------------------------------------------------------------------------- sources


def test_dir_source_sorted_recursive_skips_hidden(tmp_path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.md").write_text("# zed")
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "c.py").write_text("x = 1\n")
    (tmp_path / ".hidden").write_text("secret")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "obj").write_bytes(b"\x00\x01")
    (tmp_path / "empty.txt").write_text("  \n")
    assert list(iter_documents(str(tmp_path))) == ["alpha", "# zed", "x = 1\n"]


def test_big_text_file_is_chunked_losslessly(tmp_path) -> None:
    rng = random.Random(0)
    text = "\n\n".join(words(rng, 200) for _ in range(300))  # ~400 KB
    (tmp_path / "big.txt").write_text(text)
    docs = list(iter_documents(str(tmp_path / "big.txt")))
    assert len(docs) > 3
    assert "".join(docs) == text
    assert all(len(d) <= 2 * 64 * 1024 for d in docs)
    assert list(chunk_text("x" * 10, chunk_chars=3)) == ["xxx", "xxx", "xxxx"]  # no break: hard cut


def test_jsonl_source(tmp_path) -> None:
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "one", "id": 1}\n\n{"text": "two"}\n{"body": "three", "text": null}\n')
    assert list(iter_documents(str(p))) == ["one", "two"]
    q = tmp_path / "e.jsonl"
    q.write_text('{"body": "x"}\n')
    assert list(iter_documents(str(q), field="body")) == ["x"]


def test_jsonl_bad_line_and_missing_field(tmp_path) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n{"text": "ok2"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3: bad JSON"):
        list(iter_documents(str(p)))
    q = tmp_path / "nofield.jsonl"
    q.write_text('{"text": "ok"}\n{"body": "x", "meta": 1}\n')
    with pytest.raises(DataError, match=r"nofield\.jsonl:2: no field 'text' \(fields present: \['body', 'meta'\]\)"):
        list(iter_documents(str(q)))


def test_parquet_source(tmp_path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["a doc", None, "b doc"], "n": [1, 2, 3]}), p)
    assert list(iter_documents(str(p))) == ["a doc", "b doc"]
    with pytest.raises(DataError, match=r"no column 'content' \(columns: \['text', 'n'\]\)"):
        list(iter_documents(str(p), field="content"))


def test_stdlib_source_small_and_deterministic() -> None:
    docs = list(iter_documents("stdlib", max_bytes=50_000))
    total = sum(len(d.encode("utf-8")) for d in docs)
    assert 45_000 <= total <= 50_000
    assert docs == list(iter_documents("stdlib", max_bytes=50_000))
    assert any("def " in d or "import " in d for d in docs)


def test_hf_local_save_to_disk(tmp_path, monkeypatch) -> None:
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": ["first doc", "second doc"], "label": [0, 1]})
    ds.save_to_disk(str(tmp_path / "ds"))
    assert list(iter_documents(f"hf:{tmp_path / 'ds'}")) == ["first doc", "second doc"]
    dd = datasets.DatasetDict({"train": ds, "test": datasets.Dataset.from_dict({"text": ["held out"]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert list(iter_documents(f"hf:{tmp_path / 'dd'}@test")) == ["held out"]
    with pytest.raises(DataError, match="no split 'dev'"):
        list(iter_documents(f"hf:{tmp_path / 'dd'}@dev"))
    with pytest.raises(DataError, match="no column 'body'"):
        list(iter_documents(f"hf:{tmp_path / 'ds'}", field="body"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="offline and not in the local cache"):
        list(iter_documents("hf:no-such-org/no-such-dataset"))


def test_missing_path() -> None:
    with pytest.raises(DataError, match="not found"):
        list(iter_documents("/definitely/not/here"))


def test_empty_corpus(tmp_path) -> None:
    (tmp_path / "blank.txt").write_text("\n \n")
    with pytest.raises(DataError, match="contains no text"):
        list(iter_documents(str(tmp_path)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="contains no text"):
        list(iter_documents(str(tmp_path / "empty")))


def test_binary_file_in_folder(tmp_path) -> None:
    (tmp_path / "a.txt").write_text("good text")
    (tmp_path / "model.bin").write_bytes(b"abc\x00\x01\x02")
    with pytest.raises(DataError, match=r"model\.bin looks binary \(NUL byte at byte offset 3\).*--skip-bad"):
        list(iter_documents(str(tmp_path)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert list(iter_documents(str(tmp_path), skip_bad=True)) == ["good text"]
    assert any("model.bin" in str(w.message) for w in caught)


def test_non_utf8_file_names_file_and_offset(tmp_path) -> None:
    (tmp_path / "latin.txt").write_bytes(b"hello \xff world")
    with pytest.raises(DataError, match=r"latin\.txt is not UTF-8 text \(byte 0xff at byte offset 6\)"):
        list(iter_documents(str(tmp_path)))


def test_split_is_deterministic_by_content() -> None:
    rng = random.Random(0)
    docs = [words(rng, 20) + str(i) for i in range(2000)]
    splits = [split_of(d, 0.1) for d in docs]
    assert splits == [split_of(d, 0.1) for d in docs]
    assert 0.07 < splits.count("val") / len(docs) < 0.13
    assert splits != [split_of(d, 0.1, seed=1) for d in docs]
    assert all(split_of(d, 0.0) == "train" for d in docs[:50])
    with pytest.raises(DataError, match="val_fraction"):
        split_of("x", 1.5)


def test_assign_splits_guarantees_a_val_doc() -> None:
    docs = ["a", "b", "c"]
    out = list(assign_splits(docs, 0.0))
    assert out == [("train", "a"), ("train", "b"), ("val", "c")]


# ---------------------------------------------------------------------------- shards


def test_shards_roundtrip_across_files(tmp_path) -> None:
    docs = [list(range(i * 10, i * 10 + 7)) for i in range(10)]
    index = write_shards(docs, tmp_path / "s", vocab_size=1000, shard_tokens=16)
    assert index["dtype"] == "uint16" and index["total_tokens"] == 70 and index["documents"] == 10
    assert [s["tokens"] for s in index["shards"]] == [16, 16, 16, 16, 6]
    assert json.loads((tmp_path / "s" / "index.json").read_text()) == index
    ss = ShardSet(tmp_path / "s")
    flat = np.concatenate([np.array(d) for d in docs])
    assert len(ss) == 70
    np.testing.assert_array_equal(ss.tokens, flat)
    np.testing.assert_array_equal(ss.get(10, 40), flat[10:50])
    np.testing.assert_array_equal(ss.get(0, 70), flat)
    assert ss.get(70, 0).size == 0
    with pytest.raises(IndexError):
        ss.get(60, 20)
    assert write_shards([[70000]], tmp_path / "big", vocab_size=100_000)["dtype"] == "uint32"
    with pytest.raises(DataError, match="out of range for uint16"):
        write_shards([[70000]], tmp_path / "bad", dtype="uint16")


def test_truncated_shard(tmp_path) -> None:
    write_shards([list(range(100))], tmp_path / "s", vocab_size=500)
    shard = tmp_path / "s" / "shard_00000.bin"
    shard.write_bytes(shard.read_bytes()[:150])
    with pytest.raises(DataError, match=r"shard_00000\.bin has 150 bytes, expected 200.*steplab data prepare"):
        ShardSet(tmp_path / "s")
    shard.unlink()
    with pytest.raises(DataError, match="missing"):
        ShardSet(tmp_path / "s")
    with pytest.raises(DataError, match="not a token shard folder"):
        ShardSet(tmp_path)


# ---------------------------------------------------------------------------- loader


@pytest.fixture()
def arange_shards(tmp_path) -> ShardSet:
    """Token i has value i, so a window's first token tells which window it is."""
    write_shards([list(range(161))], tmp_path / "ar", dtype="uint32", shard_tokens=50)
    return ShardSet(tmp_path / "ar")  # seq_len 16 -> 10 windows


def window_ids(x) -> list[int]:
    return (x[:, 0] // 16).tolist()


def test_loader_batches_shift_and_determinism(arange_shards) -> None:
    a, b = TokenLoader(arange_shards, 16, 4, seed=3), TokenLoader(arange_shards, 16, 4, seed=3)
    for _ in range(3):
        (xa, ya), (xb, yb) = a.next_batch(), b.next_batch()
        assert xa.shape == ya.shape == (4, 16) and str(xa.dtype) == "torch.int64"
        assert (xa == xb).all() and (ya == yb).all()
        assert (ya[:, :-1] == xa[:, 1:]).all() and (ya[:, -1] == xa[:, -1] + 1).all()
        assert (xa[:, 0] % 16 == 0).all()
    c = TokenLoader(arange_shards, 16, 4, seed=4)
    assert window_ids(TokenLoader(arange_shards, 16, 4, seed=3).next_batch()[0]) != window_ids(c.next_batch()[0])


def test_loader_exact_resume(arange_shards) -> None:
    ref = TokenLoader(arange_shards, 16, 3, seed=7)
    batches = [ref.next_batch() for _ in range(7)]
    first = TokenLoader(arange_shards, 16, 3, seed=7)
    for _ in range(3):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))  # must survive JSON
    assert all(isinstance(v, int) for v in state.values())
    resumed = TokenLoader(arange_shards, 16, 3, seed=7)
    resumed.load_state_dict(state)
    for x, y in batches[3:]:
        rx, ry = resumed.next_batch()
        assert (rx == x).all() and (ry == y).all()
    with pytest.raises(DataError, match="seq_len"):
        TokenLoader(arange_shards, 8, 3, seed=7).load_state_dict(state)


def test_loader_multiple_epochs(arange_shards) -> None:
    loader = TokenLoader(arange_shards, 16, 4, seed=1)
    seen = [w for _ in range(8) for w in window_ids(loader.next_batch()[0])]  # 32 windows = 3.2 epochs
    for epoch in range(3):
        got = seen[epoch * 10:(epoch + 1) * 10]
        assert sorted(got) == list(range(10))
        assert got == np.random.default_rng([1, epoch]).permutation(10).tolist()
    assert seen[:10] != seen[10:20]
    assert loader.state_dict()["epoch"] == 3 and loader.state_dict()["position"] == 2


def test_loader_corpus_too_small(tmp_path) -> None:
    write_shards([list(range(10))], tmp_path / "tiny", vocab_size=100)
    with pytest.raises(DataError, match=r"has 10 tokens but one window needs seq_len \+ 1 = 17"):
        TokenLoader(ShardSet(tmp_path / "tiny"), 16, 2)


def test_eval_batches_sequential(arange_shards) -> None:
    batches = list(iter_eval_batches(arange_shards, 16, 4))
    assert [window_ids(x) for x, _ in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert all((y[:, :-1] == x[:, 1:]).all() for x, y in batches)
    again = list(iter_eval_batches(arange_shards, 16, 4, max_batches=3))  # the cap holds all 10 windows
    assert len(again) == 3 and all((a[0] == b[0]).all() for a, b in zip(batches, again))


def test_capped_eval_batches_spread_over_the_split(arange_shards) -> None:
    # a cap below the split's size takes full batches of windows spread evenly over all of it, not the first ones
    capped = list(iter_eval_batches(arange_shards, 16, 3, max_batches=2))
    assert [window_ids(x) for x, _ in capped] == [[0, 1, 3], [5, 6, 8]]
    assert all((y[:, :-1] == x[:, 1:]).all() and (x[:, 1:] - x[:, :-1] == 1).all() for x, y in capped)
    assert [window_ids(x) for x, _ in iter_eval_batches(arange_shards, 16, 3, max_batches=2)] == [[0, 1, 3], [5, 6, 8]]


# ---------------------------------------------------------------------------- prepare


def test_prepare_and_load(tmp_path) -> None:
    docs = make_corpus(tmp_path / "src")
    meta = prepare_data(str(tmp_path / "src"), tmp_path / "out", vocab_size=300, val_fraction=0.2, progress=False)
    assert json.loads((tmp_path / "out" / "meta.json").read_text()) == meta
    assert meta["train"]["documents"] + meta["val"]["documents"] == len(docs)
    assert meta["val"]["documents"] >= 1
    assert meta["train"]["bytes"] + meta["val"]["bytes"] == sum(len(d.encode()) for d in docs)
    val_docs = [d for d in docs if split_of(d, 0.2) == "val"]
    assert meta["val"]["bytes"] == sum(len(d.encode()) for d in val_docs)
    tok, train, val, meta2 = load_prepared(tmp_path / "out")
    assert meta2 == meta and tok.vocab_size == meta["vocab_size"] == 300
    assert len(train) == meta["train"]["tokens"] and len(val) == meta["val"]["tokens"]
    ids = val.tokens.tolist()
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and ids.count(tok.bos_id) == len(val_docs)
    assert tok.decode(ids[1:ids.index(tok.eos_id)]) == val_docs[0]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers
    # A given tokenizer is reused as-is.
    meta3 = prepare_data(str(tmp_path / "src"), tmp_path / "out2", tokenizer_dir=str(tmp_path / "out" / "tokenizer"),
                         val_fraction=0.2, progress=False)
    assert meta3["train"] == meta["train"] and meta3["val"] == meta["val"]


def test_prepare_refuses_overwrite_and_is_atomic(tmp_path) -> None:
    make_corpus(tmp_path / "src", n_docs=10)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="already exists.*--force"):
        prepare_data(str(tmp_path / "src"), tmp_path / "busy", vocab_size=300, progress=False)
    with pytest.raises(DataError, match="not a prepared dataset"):
        prepare_data(str(tmp_path / "src"), tmp_path / "busy", vocab_size=300, force=True, progress=False)
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"

    out = tmp_path / "out"
    prepare_data(str(tmp_path / "src"), out, vocab_size=300, progress=False)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    (tmp_path / "src" / "zz_bad.bin").write_bytes(b"\x00" * 10)  # fails late, after tokenizer training began
    with pytest.raises(DataError, match="zz_bad.bin"):
        prepare_data(str(tmp_path / "src"), out, vocab_size=300, force=True, progress=False)
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "out", "src"]

    (tmp_path / "src" / "zz_bad.bin").unlink()
    (tmp_path / "src" / "extra.txt").write_text("one more document with new words")
    meta = prepare_data(str(tmp_path / "src"), out, vocab_size=300, force=True, progress=False)
    assert meta["train"]["documents"] + meta["val"]["documents"] == 11


def test_prepare_rejects_bad_setups(tmp_path) -> None:
    make_corpus(tmp_path / "src", n_docs=3)
    with pytest.raises(DataError, match="inside the source folder"):
        prepare_data(str(tmp_path / "src"), tmp_path / "src" / "out", vocab_size=300, progress=False)
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "a.txt").write_text("only one document")
    with pytest.raises(DataError, match="none went to train"):
        prepare_data(str(tmp_path / "one"), tmp_path / "o1", vocab_size=300, progress=False)
    assert not (tmp_path / "o1").exists()
    with pytest.raises(DataError, match="not a prepared dataset"):
        load_prepared(tmp_path / "src")
