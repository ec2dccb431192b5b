"""Speech as token sequences for the Step-1 decoder: the audio vocabulary, ASR/TTS documents, prepared shards.

A speech LM here is an ordinary Step-1 run: its tokenizer is a text BPE with the speech tokenizer's audio block
appended (``tokenizer/speech/`` holds the speech tokenizer itself), and its data are token shards in the layout
of ``steplab data prepare``, so the one trainer trains it with checkpoints and exact resume unchanged.

Each clip gives two documents (one layout function, :func:`speech_documents`)::

    ASR  <|bos|> <|audio|> a a a ... <|/audio|> transcript <|eos|>
    TTS  <|bos|> transcript <|audio|> a a a ... <|/audio|> <|eos|>

Documents are packed whole into windows of ``seq_len`` tokens and padded with <|pad|>, so no window starts in
the middle of a clip (the loader cuts the stream at fixed multiples of ``seq_len``); the packing is repeated
``packings`` times in different orders so that epochs see different neighbours.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

from steplab.data.shards import ShardWriter, dtype_for_vocab
from steplab.data.speech import Clip, augmented
from steplab.data.speech_tokenizer import SpeechTokenizer
from steplab.data.tokenizer import Tokenizer, train_tokenizer
from steplab.errors import DataError
from steplab.utils import atomic_dir, atomic_write_json

AUDIO_OPEN, AUDIO_CLOSE = "<|audio|>", "<|/audio|>"
SPEECH_DIR = "speech"  # inside a tokenizer directory
SYNTHETIC_SPEAKER = "espeak:"  # speaker names of the clips data/speech.py synthesises


class SpeechVocab:
    """A text tokenizer whose vocabulary ends with the audio block, plus the speech tokenizer that fills it."""

    def __init__(self, text: Tokenizer, speech: SpeechTokenizer) -> None:
        base = text._tok.token_to_id(AUDIO_OPEN)
        if base is None or text.vocab_size != base + speech.block_size:
            raise DataError(f"tokenizer has no audio block of {speech.block_size} tokens at its end; "
                            "prepare speech data with `steplab data prepare --speech-tokenizer DIR`")
        self.text, self.speech, self.base = text, speech, base

    @property
    def open_id(self) -> int:
        return self.base

    @property
    def close_id(self) -> int:
        return self.base + 1

    @classmethod
    def build(cls, text: Tokenizer, speech: SpeechTokenizer) -> "SpeechVocab":
        """Append the audio block (as special tokens: user text can never spell them) after the text vocabulary."""
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as HFTokenizer

        hf = HFTokenizer.from_str(text._tok.to_str())
        S, C = speech.cfg.semantic_codes, speech.cfg.codec.codebook_size
        names = [AUDIO_OPEN, AUDIO_CLOSE] + [f"<|s{k}|>" for k in range(S)]
        names += [f"<|a{q}_{c}|>" for q in range(speech.n_q) for c in range(C)]
        if hf.token_to_id(AUDIO_OPEN) is not None:
            raise DataError("this tokenizer already has an audio block; pass the plain text tokenizer")
        hf.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in names])
        return cls(Tokenizer(hf, text.chat_template), speech)

    def save(self, out: str | Path) -> None:
        self.text.save(out)
        self.speech.save(Path(out) / SPEECH_DIR)

    @classmethod
    def load(cls, path: str | Path) -> "SpeechVocab":
        path = Path(path)
        if not (path / SPEECH_DIR).is_dir():
            raise DataError(f"{path} has no {SPEECH_DIR}/ speech tokenizer: it is not a speech model's tokenizer")
        return cls(Tokenizer.load(path), SpeechTokenizer.load(path / SPEECH_DIR))

    # -- prompts and documents (the one layout; swap for chat.render when audio joins the chat template)
    def audio_ids(self, wav: np.ndarray, blank: str | None = None) -> list[int]:
        return self.speech.to_ids(wav, self.base, blank)

    def asr_prompt(self, wav: np.ndarray, blank: str | None = None, audio: list[int] | None = None) -> list[int]:
        """``audio``: the clip's ids when already computed (tokenising a waveform is the costly part)."""
        return [self.text.bos_id, self.open_id, *(self.audio_ids(wav, blank) if audio is None else audio), self.close_id]

    def tts_prompt(self, text: str) -> list[int]:
        return [self.text.bos_id, *self.text.encode(text), self.open_id]

    def asr_document(self, clip: Clip, audio: list[int] | None = None) -> list[int]:
        return self.asr_prompt(clip.wav, audio=audio) + self.text.encode(clip.text) + [self.text.eos_id]

    def speech_documents(self, clip: Clip) -> tuple[list[int], list[int]]:
        """(ASR document, TTS document) of one clip, its audio tokenised once."""
        audio = self.audio_ids(clip.wav)
        return self.asr_document(clip, audio), [*self.tts_prompt(clip.text), *audio, self.close_id, self.text.eos_id]


def is_synthetic(clip: Clip) -> bool:
    return clip.speaker.startswith(SYNTHETIC_SPEAKER)


def transcript_tokenizer(texts: list[str], vocab_size: int = 300) -> Tokenizer:
    """A small byte-level BPE over the transcripts (the Step-1 vocabulary the audio block is appended to)."""
    return train_tokenizer(iter(texts * 20), vocab_size)


def pack(docs: list[list[int]], seq_len: int, pad_id: int) -> np.ndarray:
    """Whole documents into rows of exactly ``seq_len`` tokens, padded; a longer document is an error."""
    rows, row = [], []
    for d in docs:
        if len(d) > seq_len:
            raise DataError(f"a speech document of {len(d)} tokens does not fit data.seq_len={seq_len}; "
                            "raise --seq-len or use shorter clips")
        if len(row) + len(d) > seq_len:
            rows.append(row + [pad_id] * (seq_len - len(row)))
            row = []
        row = row + d
    if row:
        rows.append(row + [pad_id] * (seq_len - len(row)))
    return np.asarray(rows, dtype=np.int64).reshape(-1)


def prepare_speech_data(train: list[Clip], val: list[Clip], speech_dir: str | Path, out_dir: str | Path, *,
                        text_tokenizer: str | None = None, seq_len: int = 256, packings: int = 4, seed: int = 0,
                        source: str = "", force: bool = False, augment: int = 0, tts_real_only: bool = False,
                        warp: float = 0.0) -> dict:
    """Write a prepared dataset (tokenizer/ with the audio block and speech/, train/, val/, meta.json).

    ``augment``: extra ASR documents per training clip, each from a speed-perturbed, time-shifted rendering
    (``data/speech.perturb``); TTS documents keep the real recordings, so the model learns to speak like them.
    ``tts_real_only``: TTS documents only from recorded speech, none from espeak-ng's synthetic voices (the ASR
    documents keep every source): the LM otherwise drifts to the synthetic voice, the easiest one to model.
    ``warp``: the augmented renderings also get a tempo-independent frequency shift of up to +-``warp`` (relative;
    ``perturb``), new vocal-tract lengths for unseen speakers; 0 keeps the renderings exactly as before."""
    if augment < 0:
        raise DataError(f"augment must be >= 0 (extra renderings per training clip), got {augment}")
    if warp < 0 or (warp > 0 and augment == 0):
        raise DataError(f"warp must be >= 0 and needs augment > 0 (it perturbs the augmented renderings), "
                        f"got warp={warp}, augment={augment}")
    if not train or not val:
        raise DataError(f"speech data needs train and val clips, got {len(train)} and {len(val)}")
    if tts_real_only and all(is_synthetic(c) for c in train):
        raise DataError("--tts-real-only leaves no TTS documents: every training clip is synthesised (espeak-ng); "
                        "add recorded speech (--source fsdd+espeak) or drop --tts-real-only")
    t0 = time.time()
    text = Tokenizer.load(text_tokenizer) if text_tokenizer else transcript_tokenizer([c.text for c in train])
    vocab = SpeechVocab.build(text, SpeechTokenizer.load(speech_dir))
    rng = np.random.default_rng(seed)
    meta = {"source": source, "kind": "speech", "seq_len": seq_len, "vocab_size": vocab.text.vocab_size,
            "audio_base": vocab.base, "bitrate": vocab.speech.bitrate(), "augment": augment,
            "tts_real_only": tts_real_only, **({"warp": warp} if warp else {})}
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not force:
            raise DataError(f"{out} exists and is not empty; pass --force to replace it")
        shutil.rmtree(out)
    with atomic_dir(out, DataError) as tmp:
        vocab.save(tmp / "tokenizer")
        for split, clips in (("train", train), ("val", val)):
            docs = []
            for c in clips:
                asr, tts = vocab.speech_documents(c)
                docs += [asr] if tts_real_only and is_synthetic(c) else [asr, tts]
            if split == "train" and augment > 0:
                docs += [vocab.asr_document(c) for c in augmented(clips, augment, warp=warp, seed=seed + 1)]
            writer = ShardWriter(tmp / split, dtype=dtype_for_vocab(vocab.text.vocab_size))
            for k in range(packings if split == "train" else 1):
                order = rng.permutation(len(docs)) if split == "train" else np.arange(len(docs))
                writer.add(pack([docs[i] for i in order], seq_len, vocab.text.special_ids["<|pad|>"]))
            writer.add([vocab.text.special_ids["<|pad|>"]])  # the last window's extra target token
            writer.close()
            n_tok = sum(len(d) for d in docs)
            meta[split] = {"documents": len(docs), "tokens": writer.total_tokens, "doc_tokens": n_tok,
                           "clips": len(clips), "bytes": sum(len(c.text.encode()) for c in clips)}
        meta["seconds"] = round(time.time() - t0, 2)
        atomic_write_json(tmp / "meta.json", meta)
    return meta


def load_meta(data_dir: str | Path) -> dict:
    return json.loads((Path(data_dir) / "meta.json").read_text("utf-8"))
