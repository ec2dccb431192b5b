"""The dual-codebook speech tokenizer: a semantic stream (k-means, 16.7 Hz) and an acoustic stream (RVQ, 25 Hz).

Step-Audio pairs a linguistic tokenizer (16.7 Hz, 1,024 codes) with a semantic one (25 Hz, 4,096 codes) and
interleaves them 2:3. Ours keeps the rates, the ratio and the interleave at digit-corpus scale:

- semantic stream: 6 frames (60 ms) of features -> nearest of ``semantic_codes`` k-means centroids (scikit-learn
  MiniBatchKMeans). Features ``mfcc20d`` (default): 20 MFCCs (DCT of the log-mel) with per-utterance mean and
  variance normalisation, so speaker loudness, channel and spectral tilt fall away, plus their time deltas;
  ``logmel``: mean-normalised log-mel (the first version; a histogram probe of its codes reads 88-89% of FSDD's
  official test digits against 93-96% for MFCC + deltas, docs/benchmarks.md issue 20 session 7);
- acoustic stream: the residual-VQ autoencoder of ``models/audio.py`` (``n_q`` codebooks of ``codebook_size``),
  the only stream the decoder needs to get back to a waveform.

Token ids of the audio block (appended after a text vocabulary at ``base``)::

    base + 0              <|audio|>     opens a span of audio tokens
    base + 1              <|/audio|>    closes it
    base + 2 + k          semantic code k              (k < semantic_codes)
    base + 2 + S + q*C + c  acoustic code c of level q (S = semantic_codes, C = codebook_size)

Saved as ``speech_tokenizer.json`` (config + normalisation) and ``speech_tokenizer.safetensors`` (centroids +
codec weights) in one directory, which travels inside a run's ``tokenizer/speech/``.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from steplab.data.speech import (AC_FRAMES, GROUP_FRAMES, HOP, N_MELS, SEM_FRAMES, Clip, deinterleave, griffin_lim,
                                 interleave, log_mel, n_groups)
from steplab.errors import DataError
from steplab.models.audio import AcousticCodec, CodecConfig
from steplab.utils import atomic_write, atomic_write_json

CONFIG = "speech_tokenizer.json"
WEIGHTS = "speech_tokenizer.safetensors"
FLOOR = float(np.log(1e-5))  # log-mel of silence: what padding frames hold


@dataclass
class SpeechTokenizerConfig:
    semantic_codes: int = 512
    semantic_features: str = "mfcc20d"  # "mfcc20d" | "logmel" (tokenizers saved before this field: logmel)
    codec: CodecConfig = field(default_factory=CodecConfig)
    steps: int = 6000  # codec training steps: at 1,500 the decoder capped TTS intelligibility at 59% (87% at 6,000)
    batch_size: int = 32
    crop_frames: int = 48  # training crops (multiple of GROUP_FRAMES)
    lr: float = 2e-3
    seed: int = 0


def padded_mel(wav: np.ndarray) -> tuple[torch.Tensor, int]:
    """Log-mel padded with silence to whole interleave groups; returns (mel (G*12, n_mels), real frames)."""
    mel = log_mel(wav)
    frames = mel.shape[0]
    pad = n_groups(frames) * GROUP_FRAMES - frames
    return torch.cat([mel, torch.full((pad, N_MELS), FLOOR)]), frames


SEMANTIC_FEATURES = ("mfcc20d", "logmel")


def semantic_features(mel: torch.Tensor, frames: int, kind: str = "mfcc20d") -> np.ndarray:
    """(G*12, n_mels) -> (2G, 6*dims): per-frame features of the real frames' statistics, stacked 6 at a time."""
    if kind == "logmel":
        x = (mel - mel[:frames].mean(dim=0)).numpy()
    elif kind == "mfcc20d":
        from scipy.fft import dct

        c = dct(mel.numpy(), type=2, norm="ortho", axis=1)[:, :20]
        c = (c - c[:frames].mean(axis=0)) / (c[:frames].std(axis=0) + 1e-3)
        x = np.concatenate([c, np.gradient(c, axis=0) if len(c) > 1 else np.zeros_like(c)], axis=1)
    else:
        raise DataError(f"unknown semantic features {kind!r}; use one of {', '.join(SEMANTIC_FEATURES)}")
    return x.reshape(-1, SEM_FRAMES * x.shape[1]).astype(np.float32)


class SpeechTokenizer:
    def __init__(self, cfg: SpeechTokenizerConfig, centroids: torch.Tensor, codec: AcousticCodec,
                 mean: torch.Tensor, std: torch.Tensor) -> None:
        self.cfg, self.centroids, self.codec, self.mean, self.std = cfg, centroids, codec.eval(), mean, std

    # -- sizes
    @property
    def n_q(self) -> int:
        return self.cfg.codec.n_q

    @property
    def block_size(self) -> int:
        """Audio tokens appended to a text vocabulary (2 markers + semantic + acoustic codes)."""
        return 2 + self.cfg.semantic_codes + self.n_q * self.cfg.codec.codebook_size

    def bitrate(self) -> dict:
        sem = 100 / SEM_FRAMES * np.log2(self.cfg.semantic_codes)
        ac = 100 / AC_FRAMES * self.n_q * np.log2(self.cfg.codec.codebook_size)
        return {"semantic_bps": round(sem, 1), "acoustic_bps": round(ac, 1), "total_bps": round(sem + ac, 1),
                "tokens_per_second": round(100 / SEM_FRAMES + 100 / AC_FRAMES * self.n_q, 1)}

    # -- codes
    def encode(self, wav: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Waveform -> (semantic codes (2G,), acoustic codes (3G, n_q))."""
        mel, frames = padded_mel(wav)
        feats = semantic_features(mel, frames, self.cfg.semantic_features)
        sem = torch.cdist(torch.from_numpy(feats), self.centroids).argmin(dim=-1)
        ac = self.codec.encode(((mel - self.mean) / self.std)[None])[0]
        return sem.numpy(), ac.numpy()

    def decode_mel(self, acoustic: np.ndarray) -> torch.Tensor:
        """Acoustic codes (3G, n_q) -> log-mel (12G, n_mels)."""
        codes = torch.as_tensor(np.asarray(acoustic), dtype=torch.long)[None]
        return self.codec.decode(codes)[0] * self.std + self.mean

    def decode_wav(self, acoustic: np.ndarray) -> np.ndarray:
        return griffin_lim(self.decode_mel(acoustic))

    # -- vocabulary ids
    def to_ids(self, wav: np.ndarray, base: int, blank: str | None = None) -> list[int]:
        """Waveform -> interleaved audio token ids (without the <|audio|> markers). ``blank`` ("semantic" |
        "acoustic") replaces that stream by the codes of silence: an ablation that leaves the layout intact."""
        sem, ac = self.encode(wav)
        if blank is not None:
            quiet_sem, quiet_ac = self.encode(np.zeros(GROUP_FRAMES * HOP, dtype=np.float32))
            if blank == "semantic":
                sem = np.full_like(sem, quiet_sem[0])
            elif blank == "acoustic":
                ac = np.broadcast_to(quiet_ac[0], ac.shape).copy()
            else:
                raise DataError(f"blank must be 'semantic' or 'acoustic', got {blank!r}")
        S, C = self.cfg.semantic_codes, self.cfg.codec.codebook_size
        ac_ids = base + 2 + S + np.arange(self.n_q) * C + ac
        return interleave(base + 2 + sem, ac_ids).tolist()

    def from_ids(self, ids: list[int], base: int) -> tuple[np.ndarray, np.ndarray]:
        """Interleaved ids -> (semantic, acoustic) codes; a malformed group ends the span (generated text may be)."""
        S, C = self.cfg.semantic_codes, self.cfg.codec.codebook_size
        size = 2 + 3 * self.n_q
        ok = 0
        for g in range(len(ids) // size):
            group = np.asarray(ids[g * size:(g + 1) * size]) - base - 2
            sem, ac = group[:2], group[2:].reshape(3, self.n_q) - S - np.arange(self.n_q) * C
            if not ((0 <= sem).all() and (sem < S).all() and (0 <= ac).all() and (ac < C).all()):
                break
            ok = g + 1
        sem, ac = deinterleave(np.asarray(ids[: ok * size]) - base - 2, self.n_q)
        return sem, ac - S - np.arange(self.n_q) * C

    # -- persistence
    def save(self, out: str | Path) -> None:
        from safetensors.torch import save_file

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {"centroids": self.centroids, "mean": self.mean, "std": self.std,
                   **{f"codec.{k}": v for k, v in self.codec.state_dict().items()}}
        atomic_write(out / WEIGHTS, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp))
        atomic_write_json(out / CONFIG, {"format": "steplab-speech-tokenizer-v1", **asdict(self.cfg),
                                         "bitrate": self.bitrate()})

    @classmethod
    def load(cls, path: str | Path) -> "SpeechTokenizer":
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
            raise DataError(f"{path} is not a speech tokenizer (no {CONFIG} + {WEIGHTS}); "
                            "train one with `steplab tokenizer train --audio`")
        raw = json.loads((path / CONFIG).read_text("utf-8"))
        raw.setdefault("semantic_features", "logmel")  # saved before the field existed
        codec_cfg = CodecConfig(**raw.pop("codec"))
        cfg = SpeechTokenizerConfig(codec=codec_cfg, **{k: v for k, v in raw.items() if k in SpeechTokenizerConfig.__dataclass_fields__})
        t = load_file(str(path / WEIGHTS))
        codec = AcousticCodec(codec_cfg)
        codec.load_state_dict({k[len("codec."):]: v for k, v in t.items() if k.startswith("codec.")})
        return cls(cfg, t["centroids"], codec, t["mean"], t["std"])


def train_speech_tokenizer(clips: list[Clip], cfg: SpeechTokenizerConfig | None = None, *,
                           progress: bool = False) -> SpeechTokenizer:
    """Fit the k-means semantic codebook and train the RVQ autoencoder on ``clips`` (training data only)."""
    from sklearn.cluster import MiniBatchKMeans

    cfg = cfg or SpeechTokenizerConfig()
    if not clips:
        raise DataError("no clips to train a speech tokenizer on")
    torch.manual_seed(cfg.seed)
    mels = [padded_mel(c.wav) for c in clips]
    feats = np.concatenate([semantic_features(m, f, cfg.semantic_features) for m, f in mels])
    if len(feats) < cfg.semantic_codes:
        raise DataError(f"{len(feats)} semantic frames cannot fit {cfg.semantic_codes} k-means codes; add audio or lower the codes")
    t0 = time.time()
    km = MiniBatchKMeans(cfg.semantic_codes, random_state=cfg.seed, n_init=3, batch_size=2048).fit(feats)
    if progress:
        print(f"semantic k-means: {len(feats):,} frames -> {cfg.semantic_codes} codes in {time.time() - t0:.1f} s")

    real = torch.cat([m[:f] for m, f in mels])
    mean, std = real.mean(dim=0), real.std(dim=0).clamp_min(1e-3)
    norm = [((m - mean) / std) for m, _ in mels]
    codec = AcousticCodec(cfg.codec)
    opt = torch.optim.AdamW(codec.parameters(), lr=cfg.lr, weight_decay=0.0)
    rng = np.random.default_rng(cfg.seed)
    L = cfg.crop_frames
    t0 = time.time()
    for step in range(cfg.steps):
        batch = torch.empty(cfg.batch_size, L, N_MELS)
        for b, i in enumerate(rng.integers(0, len(norm), cfg.batch_size)):
            m = norm[i]
            if m.shape[0] < L:
                m = torch.cat([m, ((torch.full((L - m.shape[0], N_MELS), FLOOR) - mean) / std)])
            start = int(rng.integers(0, m.shape[0] - L + 1)) // AC_FRAMES * AC_FRAMES
            batch[b] = m[start:start + L]
        lr = cfg.lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * step / cfg.steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        codec.train()
        loss = codec.loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress and (step % 250 == 0 or step == cfg.steps - 1):
            print(f"codec step {step:5d}/{cfg.steps}  loss {loss.item():.4f}  {time.time() - t0:.0f} s", flush=True)
    return SpeechTokenizer(cfg, torch.from_numpy(km.cluster_centers_).float(), codec, mean, std)


def reconstruction_error(tok: SpeechTokenizer, clips: list[Clip]) -> dict:
    """Mean |log-mel| error of the acoustic stream on real frames, in dB, beside a per-bin-mean baseline."""
    err, base, n = 0.0, 0.0, 0
    db = 10 / np.log(10)  # natural-log power -> dB
    for c in clips:
        mel, frames = padded_mel(c.wav)
        _, ac = tok.encode(c.wav)
        rec = tok.decode_mel(ac)
        err += float((rec[:frames] - mel[:frames]).abs().sum()) * db
        base += float((tok.mean - mel[:frames]).abs().sum()) * db
        n += frames * N_MELS
    return {"mel_l1_db": round(err / n, 3), "mel_l1_db_mean_baseline": round(base / n, 3), "clips": len(clips)}
