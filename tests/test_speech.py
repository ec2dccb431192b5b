"""Speech: audio I/O, the 2:3 interleave, the speech tokenizer, speech LM data and ASR/TTS through the trainer.

Tests that synthesise speech need espeak-ng (`make speech` installs it) and skip with that reason when it is absent.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from steplab.data.speech import (GROUP_FRAMES, HOP, SAMPLE_RATE, Clip, deinterleave, espeak_available, griffin_lim,
                                 interleave, load_audio, log_mel, split_clips, wav_bytes)
from steplab.errors import DataError

needs_espeak = pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed (run `make speech`)")


def test_interleave_is_step_audio_layout_and_invertible():
    sem = np.array([10, 11, 12, 13])  # 2 groups: 2 semantic tokens each
    ac = np.array([[20, 30], [21, 31], [22, 32], [23, 33], [24, 34], [25, 35]])  # 3 acoustic frames x 2 codebooks each
    ids = interleave(sem, ac)
    assert ids.tolist() == [10, 11, 20, 30, 21, 31, 22, 32, 12, 13, 23, 33, 24, 34, 25, 35]
    s2, a2 = deinterleave(ids, 2)
    assert (s2 == sem).all() and (a2 == ac).all()
    rng = np.random.default_rng(0)
    for g, n_q in [(1, 1), (7, 2), (5, 4)]:
        sem, ac = rng.integers(0, 1000, 2 * g), rng.integers(0, 1000, (3 * g, n_q))
        s2, a2 = deinterleave(interleave(sem, ac), n_q)
        assert (s2 == sem).all() and (a2 == ac).all()
    with pytest.raises(DataError, match="2g semantic and 3g acoustic"):
        interleave(np.arange(4), np.zeros((5, 2), dtype=int))


def test_load_audio_resamples_and_rejects_bad_input():
    import soundfile as sf

    t = np.arange(16000) / 16000
    buf = io.BytesIO()
    sf.write(buf, np.stack([np.sin(2 * np.pi * 440 * t)] * 2, axis=1) * 0.5, 16000, format="WAV")  # stereo, 16 kHz
    wav = load_audio(buf.getvalue())
    assert wav.dtype == np.float32 and wav.shape == (SAMPLE_RATE,)
    spectrum = np.abs(np.fft.rfft(wav))
    assert abs(np.argmax(spectrum) * SAMPLE_RATE / len(wav) - 440) < 2  # the tone survived resampling
    with pytest.raises(DataError, match="empty"):
        load_audio(b"")
    with pytest.raises(DataError, match="not readable audio"):
        load_audio(b"this is not a wav file at all" * 10)
    with pytest.raises(DataError, match="at most 0.5 s"):
        load_audio(buf.getvalue(), max_seconds=0.5)
    assert load_audio(wav_bytes(wav, "flac")).shape == wav.shape  # FLAC round trip


def test_log_mel_and_griffin_lim_shapes():
    wav = np.sin(2 * np.pi * 300 * np.arange(4000) / SAMPLE_RATE).astype(np.float32)
    mel = log_mel(wav)
    assert mel.shape == (4000 // HOP + 1, 40) and torch.isfinite(mel).all()
    out = griffin_lim(mel, n_iter=8)
    assert np.isfinite(out).all() and abs(len(out) - len(wav)) <= HOP
    # the inversion keeps the pitch: the strongest bin of the rebuilt audio is near 300 Hz
    assert abs(np.argmax(np.abs(np.fft.rfft(out))) * SAMPLE_RATE / len(out) - 300) < 40


def test_split_official_and_leave_one_speaker_out():
    clips = [Clip(np.zeros(80, np.float32), "one", spk, i) for spk in ("a", "b") for i in range(10)]
    train, test = split_clips(clips)
    assert {c.index for c in test} == {0, 1, 2, 3, 4} and len(train) == 10
    train, test = split_clips(clips, "b")
    assert {c.speaker for c in test} == {"b"} and {c.speaker for c in train} == {"a"}
    with pytest.raises(DataError, match="speaker 'z' has no clips"):
        split_clips(clips, "z")


@pytest.fixture(scope="module")
def espeak_corpus():
    if not espeak_available():
        pytest.skip("espeak-ng is not installed (run `make speech`)")
    from steplab.data.speech import DIGITS, espeak_clips

    return espeak_clips(DIGITS[:4], voices=["en-us", "en-gb"], speeds=(140, 180), pitches=(50,))


@pytest.fixture(scope="module")
def speech_tok(espeak_corpus, tmp_path_factory):
    from steplab.data.speech_tokenizer import SpeechTokenizerConfig, train_speech_tokenizer
    from steplab.models.audio import CodecConfig

    torch.set_num_threads(1)
    cfg = SpeechTokenizerConfig(semantic_codes=16, steps=200, batch_size=8, lr=3e-3,
                                codec=CodecConfig(dim=32, latent=8, n_q=2, codebook_size=16))
    tok = train_speech_tokenizer(espeak_corpus, cfg)
    out = tmp_path_factory.mktemp("speechtok")
    tok.save(out)
    return tok, out


@needs_espeak
def test_speech_tokenizer_roundtrip_save_load_and_rates(speech_tok, espeak_corpus):
    from steplab.data.speech_tokenizer import SpeechTokenizer, reconstruction_error

    tok, path = speech_tok
    wav = espeak_corpus[0].wav
    sem, ac = tok.encode(wav)
    groups = -(-(len(wav) // HOP + 1) // GROUP_FRAMES)
    assert sem.shape == (2 * groups,) and ac.shape == (3 * groups, 2)  # 16.7 Hz : 25 Hz = 2 : 3
    ids = tok.to_ids(wav, base=1000)
    s2, a2 = tok.from_ids(ids, base=1000)
    assert (s2 == sem).all() and (a2 == ac).all()
    assert tok.from_ids(ids[:5] + [3] + ids[6:], base=1000)[0].size == 0  # a malformed first group ends the span
    again = SpeechTokenizer.load(path)
    s3, a3 = again.encode(wav)
    assert (s3 == sem).all() and (a3 == ac).all()
    assert tok.bitrate() == {"semantic_bps": 66.7, "acoustic_bps": 400.0 / 2, "total_bps": 266.7, "tokens_per_second": 66.7}
    rec = reconstruction_error(tok, espeak_corpus[:8])
    assert rec["mel_l1_db"] < rec["mel_l1_db_mean_baseline"]  # the codes carry the spectrum, beyond the mean
    assert np.isfinite(tok.decode_wav(ac)).all()
    with pytest.raises(DataError, match="not a speech tokenizer"):
        SpeechTokenizer.load(path.parent)


@needs_espeak
def test_speech_vocab_user_text_never_becomes_audio_tokens(speech_tok):
    from steplab.data.speech_lm import SpeechVocab, transcript_tokenizer

    _, path = speech_tok
    from steplab.data.speech_tokenizer import SpeechTokenizer

    vocab = SpeechVocab.build(transcript_tokenizer(["one", "two"]), SpeechTokenizer.load(path))
    assert vocab.text.vocab_size == vocab.base + 2 + 16 + 2 * 16
    ids = vocab.text.encode("<|audio|><|s3|>")
    assert all(i < vocab.base for i in ids)  # spelled out as bytes, never the audio block
    assert vocab.tts_prompt("<|/audio|>")[-1] == vocab.open_id and vocab.close_id not in vocab.tts_prompt("<|/audio|>")


@needs_espeak
def test_blanking_a_stream_keeps_the_layout(speech_tok, espeak_corpus):
    tok, _ = speech_tok
    wav = espeak_corpus[1].wav
    full = tok.to_ids(wav, 100)
    for blank, keep in (("semantic", "acoustic"), ("acoustic", "semantic")):
        ids = tok.to_ids(wav, 100, blank=blank)
        assert len(ids) == len(full)
        sem, ac = tok.from_ids(ids, 100)
        s0, a0 = tok.from_ids(full, 100)
        blanked, kept = (sem, (ac, a0)) if blank == "semantic" else (ac, (sem, s0))
        assert len(np.unique(blanked, axis=0)) == 1  # one code (of silence) throughout
        assert (kept[0] == kept[1]).all()
    with pytest.raises(DataError, match="blank must be"):
        tok.to_ids(wav, 100, blank="both")
