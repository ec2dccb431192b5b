"""The speech verbs end to end through `steplab` itself: tokenizer train --audio, data prepare --speech-tokenizer,
train (the one trainer, with resume), eval --task asr/tts; and the one-line errors for audio that is not audio."""
from __future__ import annotations

import json

import numpy as np
import pytest

from steplab.cli import main
from steplab.data.speech import DIGITS, espeak_available, espeak_clips, wav_bytes

pytestmark = pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed (run `make speech`)")


@pytest.fixture(scope="module")
def wav_dir(tmp_path_factory):
    """espeak-ng digits saved under FSDD's file names, so `--source fsdd:DIR` reads them."""
    d = tmp_path_factory.mktemp("wavs")
    voices = {"en-us": "alice", "en-gb": "bob"}
    for c in espeak_clips(DIGITS[:3], voices=list(voices), speeds=(130, 160, 190), pitches=(40, 60)):
        # takes 0-5 become repetitions 3-8: 3-4 are FSDD's test split, 5-8 train
        (d / f"{DIGITS.index(c.text)}_{voices[c.speaker[len('espeak:'):]]}_{c.index + 3}.wav").write_bytes(wav_bytes(c.wav))
    return d


def test_tokenizer_prepare_train_resume_eval(wav_dir, tmp_path, capsys):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _pipeline(wav_dir, tmp_path, capsys)
    finally:
        torch.set_num_threads(threads)


def _pipeline(wav_dir, tmp_path, capsys):
    src = f"fsdd:{wav_dir}"
    assert main(["tokenizer", "train", "--audio", "--source", src, "--out", str(tmp_path / "tok"), "--steps", "20",
                 "--semantic-codes", "8", "--codebook-size", "8"]) == 0
    out = capsys.readouterr().out
    report = json.loads([line for line in out.splitlines() if line.startswith("{")][0])
    assert report["bitrate"]["total_bps"] == pytest.approx(100 / 6 * 3 + 25 * 2 * 3, abs=0.1)
    assert main(["data", "prepare", "--source", src, "--speech-tokenizer", str(tmp_path / "tok"), "--out",
                 str(tmp_path / "data"), "--seq-len", "128", "--augment", "0"]) == 0
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert meta["train"]["clips"] == 24 and meta["val"]["clips"] == 12  # repetitions 3-4 of 3-8 are the test split
    assert meta["augment"] == 0 and meta["train"]["documents"] == 24 * 2  # ASR + TTS per clip, nothing more
    assert main(["data", "prepare", "--source", src, "--speech-tokenizer", str(tmp_path / "tok"), "--out",
                 str(tmp_path / "data_aug"), "--seq-len", "128", "--augment", "1"]) == 0
    aug = json.loads((tmp_path / "data_aug" / "meta.json").read_text())
    assert aug["augment"] == 1 and aug["train"]["documents"] == 24 * 3 and aug["val"] == meta["val"]
    common = ["--preset", "step1-nano", "--data", str(tmp_path / "data"), "--set", "data.seq_len=128", "--set",
              "model.max_seq_len=128", "--set", "model.d_model=64", "--set", "model.n_layer=2", "--set",
              "train.batch_size=4", "--set", "train.threads=1", "--set", "train.dtype=fp32", "--set",
              "train.warmup_steps=2", "--set", "train.schedule=constant", "--set", "train.eval_every=6", "--set", "train.ckpt_every=3", "--quiet"]
    assert main(["train", *common, "--set", "train.max_steps=6", "--out", str(tmp_path / "full")]) == 0
    assert main(["train", *common, "--set", "train.max_steps=3", "--out", str(tmp_path / "half")]) == 0
    assert main(["train", *common, "--set", "train.max_steps=6", "--out", str(tmp_path / "half"), "--resume",
                 "--allow-config-change"]) == 0
    losses = [[json.loads(x)["loss"] for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()
               if '"loss"' in x and json.loads(x).get("step") == 6] for r in ("full", "half")]
    assert losses[0] and losses[0][-1] == pytest.approx(losses[1][-1], rel=1e-5)  # exact resume on speech shards
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "full"), "--task", "asr", "--speech-source", src, "--device", "cpu"]) == 0
    res = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert res["asr"]["n"] == 12 and set(res["asr"]["per_speaker"]) == {"alice", "bob"}
    assert 0.0 <= res["asr"]["accuracy"] <= 1.0 and res["step"] == 6 and res["split"] == "test"
    # checkpoint selection happens on a dev split carved from the training recordings (repetitions 5-9), never test
    assert main(["eval", str(tmp_path / "full"), "--task", "asr", "--speech-source", src, "--device", "cpu",
                 "--speech-split", "dev", "--checkpoint", str(tmp_path / "full" / "checkpoints" / "step_00000003")]) == 0
    res = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert res["step"] == 3 and res["split"] == "dev" and res["asr"]["n"] == 24


def test_prepare_defaults_to_the_measured_augmentation():
    from steplab.cli import build_parser

    args = build_parser().parse_args(["data", "prepare", "--source", "fsdd", "--speech-tokenizer", "t", "--out", "d"])
    assert args.augment == 8  # the recipe behind the benchmarks (docs/benchmarks.md, issue 20 session 7)


def test_audio_that_is_not_audio_is_one_clear_error(tmp_path, capsys):
    (tmp_path / "3_carol_0.wav").write_bytes(b"RIFF....WAVEfmt garbage")
    assert main(["tokenizer", "train", "--audio", "--source", f"fsdd:{tmp_path}", "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: 3_carol_0.wav is not readable audio") and "\n" not in err
    (tmp_path / "3_carol_0.wav").write_bytes(wav_bytes(np.zeros(0, dtype=np.float32)))
    assert main(["tokenizer", "train", "--audio", "--source", f"fsdd:{tmp_path}", "--out", str(tmp_path / "t")]) == 2
    assert "no audio samples" in capsys.readouterr().err
    assert main(["tokenizer", "train", "--audio", "--source", "mp4:x", "--out", str(tmp_path / "t")]) == 2
    assert "unknown speech source" in capsys.readouterr().err
