"""Speech, second session: MFCC semantic features, speed/shift augmentation, the dev split carved from training,
and old tokenizers still loading. No espeak-ng needed: synthetic signals only."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from steplab.data.speech import HOP, SAMPLE_RATE, Clip, dev_split, perturb, split_clips
from steplab.errors import DataError


def _chirp(seconds: float = 0.6, seed: int = 0) -> np.ndarray:
    t = np.arange(int(SAMPLE_RATE * seconds)) / SAMPLE_RATE
    noise = np.random.default_rng(seed).normal(0, 0.01, t.size)
    return (0.4 * np.sin(2 * np.pi * (200 + 900 * t) * t) + noise).astype(np.float32)


def test_mfcc_semantic_features_shape_and_gain_invariance():
    from steplab.data.speech_tokenizer import padded_mel, semantic_features

    mel, frames = padded_mel(_chirp())
    groups = mel.shape[0] // 12
    f = semantic_features(mel, frames, "mfcc20d")
    assert f.shape == (2 * groups, 6 * 40) and f.dtype == np.float32  # 20 MFCCs + 20 deltas, 6 frames a token
    # a louder recording (log-mel + constant) changes only c0, which the per-utterance normalisation removes
    assert np.allclose(semantic_features(mel + 2.5, frames, "mfcc20d"), f, atol=1e-4)
    # the real frames are mean 0 / std 1 per coefficient
    c = f.reshape(-1, 40)[:frames, :20]
    assert np.allclose(c.mean(0), 0, atol=1e-4) and np.allclose(c.std(0), 1, atol=1e-2)
    assert semantic_features(mel, frames, "logmel").shape == (2 * groups, 6 * 40)
    with pytest.raises(DataError, match="unknown semantic features 'pitch'"):
        semantic_features(mel, frames, "pitch")


def test_perturb_is_seeded_speed_and_shift():
    clip = Clip(_chirp(), "seven", "spk", 7, "7_spk_7")
    a, b = perturb(clip, np.random.default_rng(3)), perturb(clip, np.random.default_rng(3))
    assert np.array_equal(a.wav, b.wav) and a.name == b.name  # same seed, same rendering
    factor, shift = a.name.split("~x")[1].split("+")
    factor, shift = float(factor), int(shift)
    assert 0.9 <= factor <= 1.1 and 0 <= shift <= 12 * HOP
    assert not a.wav[:shift].any()  # the leading silence
    assert abs((len(a.wav) - shift) - len(clip.wav) / factor) <= 2  # faster speech is shorter
    assert (a.text, a.speaker, a.index) == ("seven", "spk", 7)
    same = perturb(clip, np.random.default_rng(0), speed=(1.0, 1.0), max_shift=0)
    assert np.allclose(same.wav, clip.wav)  # no perturbation: the clip itself
    c = perturb(clip, np.random.default_rng(4))
    assert c.name != a.name


def test_dev_split_is_carved_from_train_only():
    clips = [Clip(np.zeros(80, np.float32), "one", spk, i) for spk in ("a", "b") for i in range(50)]
    clips += [Clip(np.zeros(80, np.float32), "one", "espeak:en-us", i) for i in range(9)]
    train, test = split_clips(clips)
    rest, dev = dev_split(train)
    assert {c.index for c in dev if c.speaker != "espeak:en-us"} == {5, 6, 7, 8, 9}
    assert [c.index for c in dev if c.speaker == "espeak:en-us"] == [3]
    assert len(dev) == 11 and len(rest) + len(dev) == len(train)
    ids = lambda cs: {(c.speaker, c.index) for c in cs}  # noqa: E731
    assert not ids(dev) & ids(test) and not ids(dev) & ids(rest)


def test_tokenizer_saved_before_semantic_features_loads_as_logmel(tmp_path):
    from steplab.data.speech_tokenizer import CONFIG, SpeechTokenizer, SpeechTokenizerConfig, train_speech_tokenizer
    from steplab.models.audio import CodecConfig

    torch.manual_seed(0)
    clips = [Clip(_chirp(0.4 + 0.05 * i, seed=i), "one", "s", i) for i in range(6)]
    cfg = SpeechTokenizerConfig(semantic_codes=8, semantic_features="logmel", steps=2, batch_size=2,
                                codec=CodecConfig(dim=8, latent=4, n_q=1, codebook_size=4))
    tok = train_speech_tokenizer(clips, cfg)
    tok.save(tmp_path)
    raw = json.loads((tmp_path / CONFIG).read_text())
    del raw["semantic_features"]  # what the first version wrote
    (tmp_path / CONFIG).write_text(json.dumps(raw))
    old = SpeechTokenizer.load(tmp_path)
    assert old.cfg.semantic_features == "logmel"
    assert np.array_equal(old.encode(clips[0].wav)[0], tok.encode(clips[0].wav)[0])
    assert SpeechTokenizerConfig().semantic_features == "mfcc20d"  # new tokenizers default to MFCCs


def test_prepare_adds_augmented_asr_documents_only_to_train(tmp_path):
    from steplab.data.speech_lm import load_meta, prepare_speech_data
    from steplab.data.speech_tokenizer import SpeechTokenizerConfig, train_speech_tokenizer
    from steplab.models.audio import CodecConfig

    torch.manual_seed(0)
    clips = [Clip(_chirp(0.3 + 0.04 * i, seed=i), w, "s", i) for i, w in enumerate(["one", "two"] * 4)]
    cfg = SpeechTokenizerConfig(semantic_codes=8, steps=2, batch_size=2, codec=CodecConfig(dim=8, latent=4, n_q=1, codebook_size=4))
    train_speech_tokenizer(clips, cfg).save(tmp_path / "tok")
    plain = prepare_speech_data(clips[:6], clips[6:], tmp_path / "tok", tmp_path / "d0", seq_len=128, packings=1)
    aug = prepare_speech_data(clips[:6], clips[6:], tmp_path / "tok", tmp_path / "d2", seq_len=128, packings=1, augment=2)
    assert plain["train"]["documents"] == 12 and aug["train"]["documents"] == 12 + 2 * 6  # ASR + TTS, + 2 ASR each
    assert aug["val"] == plain["val"] and load_meta(tmp_path / "d2")["augment"] == 2
    assert aug["train"]["doc_tokens"] > plain["train"]["doc_tokens"]
    again = prepare_speech_data(clips[:6], clips[6:], tmp_path / "tok", tmp_path / "d2b", seq_len=128, packings=1, augment=2)
    assert again["train"] == aug["train"]  # seeded: the same renderings
    with pytest.raises(DataError, match="augment must be >= 0"):
        prepare_speech_data(clips[:6], clips[6:], tmp_path / "tok", tmp_path / "d3", augment=-1)


def test_voted_transcription_is_deterministic_and_one_vote_is_plain_greedy():
    from steplab.data.speech import espeak_available

    if not espeak_available():
        pytest.skip("espeak-ng is not installed (run `make speech`)")
    from speech_fixtures import tiny_speech_run
    from steplab.eval.speech import SpeechModel, asr_accuracy, normalise, transcribe_voted

    run, clips = tiny_speech_run()
    sm = SpeechModel.from_run(run, device="cpu")
    wavs = [c.wav for c in clips[:6]]
    assert transcribe_voted(sm, wavs, 1) == sm.transcribe(wavs)
    voted = transcribe_voted(sm, wavs, 3)
    assert voted == transcribe_voted(sm, wavs, 3) and len(voted) == 6  # seeded renderings
    # the rule, recomputed: the renderings come from one generator seeded 0, the majority wins, ties -> the clip's own
    rng = np.random.default_rng(0)
    hyps = [sm.transcribe(wavs)] + [sm.transcribe([perturb(Clip(w, "", "", 0), rng).wav for w in wavs]) for _ in range(2)]
    for i, v in enumerate(voted):
        cands = [normalise(h[i]) for h in hyps]
        best = max(cands.count(c) for c in cands)
        assert v == next(c for c in cands if cands.count(c) == best)
    assert asr_accuracy(sm, clips[:6], votes=3)["votes"] == 3


def test_tts_real_only_drops_only_the_synthetic_voices_tts_documents(tmp_path):
    from steplab.data.shards import ShardSet
    from steplab.data.speech_lm import SpeechVocab, prepare_speech_data
    from steplab.data.speech_tokenizer import SpeechTokenizerConfig, train_speech_tokenizer
    from steplab.models.audio import CodecConfig

    torch.manual_seed(0)
    speakers = ["theo", "espeak:en-us", "jackson", "espeak:en-gb"]
    clips = [Clip(_chirp(0.3 + 0.04 * i, seed=i), w, speakers[i % 4], i) for i, w in enumerate(["one", "two"] * 4)]
    cfg = SpeechTokenizerConfig(semantic_codes=8, steps=2, batch_size=2, codec=CodecConfig(dim=8, latent=4, n_q=1, codebook_size=4))
    train_speech_tokenizer(clips, cfg).save(tmp_path / "tok")
    meta = prepare_speech_data(clips[:4], clips[4:], tmp_path / "tok", tmp_path / "d", seq_len=128, packings=1,
                               augment=1, tts_real_only=True)
    # train: 4 ASR + 2 TTS (theo, jackson) + 4 augmented ASR; val: 4 ASR + 2 TTS
    assert meta["train"]["documents"] == 10 and meta["val"]["documents"] == 6 and meta["tts_real_only"] is True
    vocab = SpeechVocab.load(tmp_path / "d" / "tokenizer")
    ids = np.asarray(ShardSet(tmp_path / "d" / "val").tokens)
    ids = ids[ids != vocab.text.special_ids["<|pad|>"]]
    docs = [d.tolist() for d in np.split(ids, np.flatnonzero(ids == vocab.text.bos_id))[1:]]
    tts = [d for d in docs if d[1] != vocab.open_id]  # a TTS document starts with its text, an ASR one with audio
    want = [vocab.speech_documents(c)[1] for c in clips[4:] if not c.speaker.startswith("espeak:")]
    assert len(docs) == 6 and sorted(tts) == sorted(want)
    synthetic = [c for c in clips if c.speaker.startswith("espeak:")]
    with pytest.raises(DataError, match="leaves no TTS documents"):
        prepare_speech_data(synthetic[:2], synthetic[2:], tmp_path / "tok", tmp_path / "e", tts_real_only=True)


def _peak_hz(wav: np.ndarray) -> float:
    w = wav[400:-400]
    spec = np.abs(np.fft.rfft(w * np.hanning(w.size)))
    return float(np.fft.rfftfreq(w.size, 1 / SAMPLE_RATE)[spec.argmax()])


def test_frequency_shift_moves_pitch_and_keeps_duration():
    from steplab.data.speech import frequency_shift, time_stretch

    t = np.arange(4000) / SAMPLE_RATE
    tone = (0.5 * np.sin(2 * np.pi * 500 * t)).astype(np.float32)
    for factor in (0.8, 0.9, 1.2):
        out = frequency_shift(tone, factor)
        assert out.size == tone.size  # duration kept
        assert abs(_peak_hz(out) - 500 * factor) <= 4  # 500 Hz -> 400 / 450 / 600 Hz
        assert 0.45 < np.abs(out).max() < 0.55  # level kept
    slow = time_stretch(tone, 0.8)
    assert slow.size == 5000 and abs(_peak_hz(slow) - 500) <= 4  # the stretch alone: longer, same pitch
    assert np.allclose(frequency_shift(tone, 1.0), time_stretch(tone, 1.0), atol=1e-6)
    with pytest.raises(DataError, match="rate must be > 0"):
        time_stretch(tone, 0.0)


def test_perturb_warp_is_seeded_and_warp_zero_keeps_old_renderings():
    clip = Clip(_chirp(), "seven", "spk", 7, "7_spk_7")
    old = perturb(clip, np.random.default_rng(3))
    assert np.array_equal(perturb(clip, np.random.default_rng(3), warp=0.0).wav, old.wav)  # no extra draw at 0
    a, b = perturb(clip, np.random.default_rng(3), warp=0.2), perturb(clip, np.random.default_rng(3), warp=0.2)
    assert np.array_equal(a.wav, b.wav) and a.name == b.name
    f = float(a.name.split("~f")[1].split("~x")[0])
    assert 1 / 1.2 <= f <= 1.2 and abs(f - 1) > 1e-3
    factor, shift = a.name.split("~x")[1].split("+")
    assert abs((a.wav.size - int(shift)) - clip.wav.size / float(factor)) <= 2  # the warp kept the duration
    # frequencies move by f: a tone rendered with no speed change and no shift
    t = np.arange(4000) / SAMPLE_RATE
    tone = Clip((0.5 * np.sin(2 * np.pi * 500 * t)).astype(np.float32), "one", "s", 0)
    w = perturb(tone, np.random.default_rng(5), speed=(1.0, 1.0), max_shift=0, warp=0.2)
    f = float(w.name.split("~f")[1].split("~x")[0])
    assert abs(_peak_hz(w.wav) - 500 * (round(80 * f) / 80)) <= 4  # the 100 Hz step of the resampling rate
    with pytest.raises(DataError, match="warp must be >= 0"):
        perturb(clip, np.random.default_rng(0), warp=-0.1)


def test_prepare_warp_needs_augment_and_changes_only_the_augmented_documents(tmp_path):
    from steplab.data.speech_lm import load_meta, prepare_speech_data
    from steplab.data.speech_tokenizer import SpeechTokenizerConfig, train_speech_tokenizer
    from steplab.models.audio import CodecConfig

    torch.manual_seed(0)
    clips = [Clip(_chirp(0.3 + 0.04 * i, seed=i), w, "s", i) for i, w in enumerate(["one", "two"] * 4)]
    cfg = SpeechTokenizerConfig(semantic_codes=8, steps=2, batch_size=2, codec=CodecConfig(dim=8, latent=4, n_q=1, codebook_size=4))
    train_speech_tokenizer(clips, cfg).save(tmp_path / "tok")
    kw = dict(seq_len=128, packings=1, augment=2)
    plain = prepare_speech_data(clips[:6], clips[6:], tmp_path / "tok", tmp_path / "d0", **kw)
    warped = prepare_speech_data(clips[:6], clips[6:], tmp_path / "tok", tmp_path / "d1", warp=0.2, **kw)
    assert warped["train"]["documents"] == plain["train"]["documents"] == 24 and warped["val"] == plain["val"]
    assert load_meta(tmp_path / "d1")["warp"] == 0.2 and "warp" not in load_meta(tmp_path / "d0")
    read = lambda d, split: b"".join(p.read_bytes() for p in sorted((tmp_path / d / split).glob("*")))  # noqa: E731
    assert read("d0", "val") == read("d1", "val") and read("d0", "train") != read("d1", "train")
    with pytest.raises(DataError, match="needs augment > 0"):
        prepare_speech_data(clips[:6], clips[6:], tmp_path / "tok", tmp_path / "d2", warp=0.2, seq_len=128)


def test_augmented_renders_every_clip_n_times_seeded():
    from steplab.data.speech import augmented

    clips = [Clip(_chirp(0.3, seed=i), "one", "s", i, f"c{i}") for i in range(3)]
    a, b = augmented(clips, 2, warp=0.1), augmented(clips, 2, warp=0.1)
    assert [c.name.split("~")[0] for c in a] == ["c0", "c0", "c1", "c1", "c2", "c2"]
    assert all(np.array_equal(x.wav, y.wav) for x, y in zip(a, b)) and "~f" in a[0].name
    assert augmented(clips, 0) == []
    with pytest.raises(DataError, match="warp needs augment > 0"):
        augmented(clips, 0, warp=0.1)
