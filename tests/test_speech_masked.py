"""Data kind "speech-masked": the loss skips the audio of ASR documents, nothing else changes (the same windows,
order and resume state as data kind "tokens")."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def tiny():
    from steplab.data.speech import espeak_available

    if not espeak_available():
        pytest.skip("espeak-ng is not installed (run `make speech`)")
    from speech_fixtures import tiny_speech_run
    from steplab.data.speech_lm import SpeechVocab

    run, _ = tiny_speech_run()
    return run, SpeechVocab.load(run / "tokenizer")


def test_asr_audio_positions_mask_only_the_audio_of_asr_documents():
    from steplab.data.speech_data import asr_audio_positions

    B, O, C, A, T, E, P = 1, 2, 3, 7, 5, 4, 0  # bos, <|audio|>, <|/audio|>, audio, text, eos, pad
    row = [B, O, A, A, C, T, E, B, T, O, A, C, E, P, B, O, A]  # ASR doc, TTS doc, pad, an ASR doc cut by the window
    got = asr_audio_positions(np.array([row]), B, O, C)[0]
    assert np.flatnonzero(got).tolist() == [2, 3, 4, 16]  # the TTS document's audio is still trained


def test_speech_masked_data_ignores_exactly_those_targets(tiny, tmp_path):
    from steplab.config import resolve
    from steplab.data.chat import IGNORE_INDEX
    from steplab.data.speech_data import asr_audio_positions
    from steplab.train.data import build_train_data
    from steplab.train.trainer import train

    run, v = tiny
    data = json.loads((run / "config.json").read_text())["data"]["path"]
    over = [f"data.path={data}", "data.seq_len=128", "model.max_seq_len=128", "model.d_model=64", "model.n_layer=2",
            "train.batch_size=4", "train.threads=1", "train.dtype=fp32", "train.warmup_steps=1", "train.max_steps=2",
            "train.eval_every=2", "train.ckpt_every=2"]
    plain = build_train_data(resolve("step1-nano", overrides=over))
    masked = build_train_data(resolve("step1-nano", overrides=over + ["data.kind=speech-masked"]))
    for _ in range(2):
        (x0, y0), (x1, y1) = plain.next_batch(), masked.next_batch()
        skip = asr_audio_positions(torch.cat([x0[:, :1], y0], 1).numpy(), v.text.bos_id, v.open_id, v.close_id)[:, 1:]
        assert torch.equal(x0, x1) and skip.any() and not skip.all()
        assert (y1[torch.from_numpy(skip)] == IGNORE_INDEX).all() and torch.equal(y1[torch.from_numpy(~skip)], y0[torch.from_numpy(~skip)])
    assert masked.state_dict() == plain.state_dict()  # the same stream position: exact resume unchanged
    summary = train(resolve("step1-nano", overrides=over + ["data.kind=speech-masked"]), tmp_path / "run", progress=False)
    assert summary is not None and (tmp_path / "run" / "checkpoints").is_dir()
