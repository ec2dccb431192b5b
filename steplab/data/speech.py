"""Speech data: audio I/O, the log-mel front end, Griffin-Lim, spoken-digit corpora and the 2:3 token interleave.

Everything runs at 8 kHz (the Free Spoken Digit Dataset's rate; telephone band is enough for digits) with a
10 ms hop, so one second of speech is 100 log-mel frames. The speech tokenizer (``data/speech_tokenizer.py``)
reads 6 frames per semantic token (16.7 Hz) and 4 frames per acoustic token (25 Hz): Step-Audio's two rates,
whose ratio 2:3 fixes the interleave below. Audio is read with ``soundfile`` and resampled with
``scipy.signal.resample_poly`` (no torchaudio: its wheels pin another torch).

Corpora yield :class:`Clip` records: FSDD (``fsdd[:PATH]``, read straight from the shared tar or a folder of
``{digit}_{speaker}_{index}.wav``; CC BY-SA 4.0, Jakobovski et al.) and speech synthesised locally with espeak-ng
(``espeak``), so tests and a default run need no download.
"""
from __future__ import annotations

import io
import math
import re
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from steplab.errors import DataError

SAMPLE_RATE = 8000
N_FFT = 256  # 32 ms window
HOP = 80  # 10 ms: 100 frames per second
N_MELS = 40
SEM_FRAMES = 6  # frames per semantic token: 16.7 Hz
AC_FRAMES = 4  # frames per acoustic token: 25 Hz
GROUP_FRAMES = 12  # lcm: one interleave group = 2 semantic + 3 acoustic tokens (120 ms)
MAX_SECONDS = 30.0
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@dataclass
class Clip:
    wav: np.ndarray  # float32 mono at SAMPLE_RATE
    text: str  # the transcript ("seven")
    speaker: str
    index: int  # repetition number (FSDD: 0-49; 0-4 are the official test split)
    name: str = ""


# -- audio I/O
def resample(wav: np.ndarray, sr_in: int, sr_out: int = SAMPLE_RATE) -> np.ndarray:
    if sr_in == sr_out:
        return wav.astype(np.float32)
    from scipy.signal import resample_poly

    g = math.gcd(sr_in, sr_out)
    return resample_poly(wav, sr_out // g, sr_in // g).astype(np.float32)


def load_audio(src: str | Path | bytes, *, what: str = "", max_seconds: float = MAX_SECONDS) -> np.ndarray:
    """A file path or the bytes of a WAV/FLAC/OGG file -> float32 mono at 8 kHz; DataError if it is not usable audio."""
    import soundfile as sf

    what = what or (str(src) if not isinstance(src, bytes) else "the upload")
    if isinstance(src, bytes) and not src:
        raise DataError(f"{what} is empty; send a WAV, FLAC or OGG file")
    try:
        data, sr = sf.read(io.BytesIO(src) if isinstance(src, bytes) else str(src), dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError / TypeError depending on the input
        raise DataError(f"{what} is not readable audio ({str(e).splitlines()[0][:120]}); send a WAV, FLAC or OGG file") from None
    if data.shape[0] == 0:
        raise DataError(f"{what} holds no audio samples; send a non-empty recording")
    if data.shape[0] / sr > max_seconds:
        raise DataError(f"{what} is {data.shape[0] / sr:.1f} s long; at most {max_seconds:g} s is accepted, cut it shorter")
    wav = resample(data.mean(axis=1), sr)
    if not np.isfinite(wav).all():
        raise DataError(f"{what} contains NaN or infinite samples")
    return wav


def wav_bytes(wav: np.ndarray, fmt: str = "wav", sr: int = SAMPLE_RATE) -> bytes:
    """Encode float32 mono samples as a WAV (16-bit PCM) or FLAC file."""
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.clip(wav, -1.0, 1.0), sr, format=fmt.upper(), subtype="PCM_16")
    return buf.getvalue()


# -- log-mel front end and its inverse
@lru_cache(maxsize=4)
def mel_filterbank(n_mels: int = N_MELS, n_fft: int = N_FFT, sr: int = SAMPLE_RATE) -> torch.Tensor:
    """(n_fft//2+1, n_mels) triangular filters on the HTK mel scale, 0 Hz to Nyquist."""
    hz = lambda m: 700.0 * (10 ** (m / 2595.0) - 1)  # noqa: E731
    mel = lambda f: 2595.0 * np.log10(1 + f / 700.0)  # noqa: E731
    edges = hz(np.linspace(mel(0.0), mel(sr / 2), n_mels + 2))
    freqs = np.linspace(0, sr / 2, n_fft // 2 + 1)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    fb = np.maximum(0, np.minimum((freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)))
    return torch.tensor(fb.T, dtype=torch.float32)


def log_mel(wav: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(samples,) -> (frames, N_MELS) natural-log mel power, floored at 1e-5; frames = samples // HOP + 1."""
    x = torch.as_tensor(wav, dtype=torch.float32)
    spec = torch.stft(x, N_FFT, HOP, window=torch.hann_window(N_FFT), center=True, return_complex=True)
    power = spec.abs().pow(2).T  # (frames, bins)
    return torch.log(power @ mel_filterbank() + 1e-5)


def griffin_lim(logmel: torch.Tensor, n_iter: int = 48, seed: int = 0) -> np.ndarray:
    """(frames, N_MELS) log-mel -> waveform: non-negative least-squares-ish inversion of the filterbank (pinv,
    clamped), then Griffin-Lim phase recovery (Griffin & Lim 1984). Not a neural vocoder: intelligible, buzzy."""
    fb = mel_filterbank()
    mag = (torch.exp(logmel.float()) @ torch.linalg.pinv(fb)).clamp_min(0).sqrt().T  # (bins, frames)
    window = torch.hann_window(N_FFT)
    g = torch.Generator().manual_seed(seed)
    angles = torch.exp(2j * math.pi * torch.rand(mag.shape, generator=g))
    length = (mag.shape[1] - 1) * HOP
    for _ in range(n_iter):
        wav = torch.istft(mag * angles, N_FFT, HOP, window=window, length=length)
        spec = torch.stft(wav, N_FFT, HOP, window=window, return_complex=True)
        angles = torch.exp(1j * spec.angle())
    wav = torch.istft(mag * angles, N_FFT, HOP, window=window, length=length).numpy()
    peak = float(np.abs(wav).max()) if wav.size else 0.0
    return (wav / peak * 0.9 if peak > 0 else wav).astype(np.float32)


# -- corpora
def fsdd_path(path: str | None = None) -> Path | None:
    """The FSDD tar or folder: PATH if given, else ../shared/data/fsdd (None when absent)."""
    if path:
        return Path(path)
    from steplab.tasks.data import shared_data

    return shared_data("fsdd")


_FSDD_NAME = re.compile(r"(\d)_([a-z]+)_(\d+)\.wav$")


def load_fsdd(path: str | Path | None = None) -> list[Clip]:
    """All FSDD recordings as clips (sorted by name); path: the fsdd folder, its tar, or a folder of wavs."""
    root = fsdd_path(str(path) if path else None)
    if root is None or not root.exists():
        raise DataError("the Free Spoken Digit Dataset was not found (looked in ../shared/data/fsdd); pass fsdd:PATH")
    tar = root / "fsdd_recordings.tar" if root.is_dir() else root
    items: list[tuple[str, bytes]] = []
    if tar.is_file() and tarfile.is_tarfile(tar):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                if m.isfile() and _FSDD_NAME.search(m.name):
                    items.append((Path(m.name).name, tf.extractfile(m).read()))
    else:
        items = [(p.name, p.read_bytes()) for p in sorted(root.rglob("*.wav")) if _FSDD_NAME.search(p.name)]
    if not items:
        raise DataError(f"no FSDD recordings ({{digit}}_{{speaker}}_{{index}}.wav) found in {root}")
    clips = []
    for name, raw in sorted(items):
        d, spk, idx = _FSDD_NAME.search(name).groups()
        clips.append(Clip(load_audio(raw, what=name), DIGITS[int(d)], spk, int(idx), name))
    return clips


def fsdd_official_split(clips: list[Clip]) -> tuple[list[Clip], list[Clip]]:
    """FSDD's conventional split: repetitions 0-4 of each speaker and digit are the test set."""
    return [c for c in clips if c.index >= 5], [c for c in clips if c.index < 5]


ESPEAK_VOICES = ["en-us", "en-gb", "en-gb-scotland", "en-029", "en-gb-x-rp", "en-us-nyc",
                 "en-us+f2", "en-gb+f3", "en-us+m3", "en+klatt", "en-gb-x-gbclan", "en-us+f4"]


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def espeak(text: str, voice: str = "en-us", speed: int = 150, pitch: int = 50) -> np.ndarray:
    """Synthesise text with espeak-ng (the text goes in as data after ``--``, never as an option)."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise DataError("espeak-ng is not installed; install it with `apt-get install espeak-ng` (or `make speech`)")
    out = subprocess.run([exe, "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", "--", text],
                         capture_output=True, timeout=60)
    if out.returncode != 0:
        raise DataError(f"espeak-ng failed for voice {voice!r}: {out.stderr.decode(errors='replace').strip()[:200]}")
    return load_audio(out.stdout, what=f"espeak-ng output for {text!r}")


def espeak_clips(words: Iterable[str] = DIGITS, voices: Iterable[str] = ESPEAK_VOICES,
                 speeds: Iterable[int] = (130, 160, 190), pitches: Iterable[int] = (35, 50, 65)) -> list[Clip]:
    """Every word in every voice x speed x pitch; the speaker is the voice, index counts its takes of the word."""
    clips = []
    for voice in voices:
        for word in words:
            for i, (s, p) in enumerate((s, p) for s in speeds for p in pitches):
                clips.append(Clip(espeak(word, voice, s, p), word, f"espeak:{voice}", i, f"{word}_{voice}_{s}_{p}"))
    return clips


def load_corpus(source: str) -> list[Clip]:
    """``fsdd[:PATH]`` | ``espeak`` | ``fsdd+espeak`` (sources joined with '+')."""
    clips: list[Clip] = []
    for part in source.split("+"):
        name, _, arg = part.partition(":")
        if name == "fsdd":
            clips += load_fsdd(arg or None)
        elif name == "espeak":
            clips += espeak_clips()
        else:
            raise DataError(f"unknown speech source {part!r}; use fsdd[:PATH], espeak, or both joined with '+'")
    return clips


# -- the 2:3 interleave of Step-Audio
def n_groups(frames: int) -> int:
    """Interleave groups covering ``frames`` log-mel frames (the last group is padded)."""
    return max(1, -(-frames // GROUP_FRAMES))


def interleave(semantic: np.ndarray, acoustic: np.ndarray) -> np.ndarray:
    """Step-Audio's layout: per group, 2 semantic tokens then 3 acoustic frames (each ``n_q`` residual codes).

    semantic: (2g,) ids; acoustic: (3g, n_q) ids, already offset into the vocabulary. Returns (g * (2 + 3 n_q),).
    """
    semantic, acoustic = np.asarray(semantic), np.asarray(acoustic)
    if acoustic.ndim != 2 or semantic.ndim != 1 or semantic.size % 2 or 2 * acoustic.shape[0] != 3 * semantic.size:
        raise DataError(f"interleave needs 2g semantic and 3g acoustic frames, got {semantic.shape} and {acoustic.shape}")
    g = semantic.size // 2
    return np.concatenate([semantic.reshape(g, 2), acoustic.reshape(g, -1)], axis=1).reshape(-1)


def deinterleave(ids: np.ndarray, n_q: int) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`interleave`; trailing tokens that do not fill a group are dropped."""
    ids = np.asarray(ids)
    size = 2 + 3 * n_q
    g = ids.size // size
    groups = ids[: g * size].reshape(g, size)
    return groups[:, :2].reshape(-1), groups[:, 2:].reshape(3 * g, n_q)


def time_stretch(wav: np.ndarray, rate: float, n_fft: int = N_FFT, hop: int = N_FFT // 4) -> np.ndarray:
    """Phase-vocoder time stretch (Flanagan & Golden 1966; librosa's algorithm): ``rate`` > 1 is faster, the length
    becomes ~len / rate and the frequencies stay. Magnitudes are interpolated between STFT frames and each bin's
    phase advances by its measured instantaneous frequency."""
    if rate <= 0:
        raise DataError(f"time_stretch rate must be > 0, got {rate}")
    x = torch.as_tensor(np.asarray(wav, dtype=np.float32))
    window = torch.hann_window(n_fft)
    spec = torch.stft(x, n_fft, hop, window=window, center=True, return_complex=True).numpy()  # (bins, frames)
    frames = spec.shape[1]
    spec = np.concatenate([spec, np.zeros((spec.shape[0], 1), spec.dtype)], axis=1)
    steps = np.arange(0, frames, rate)
    idx = steps.astype(np.int64)
    frac = (steps - idx)[None, :]
    c0, c1 = spec[:, idx], spec[:, idx + 1]
    mag = (1 - frac) * np.abs(c0) + frac * np.abs(c1)
    advance = np.linspace(0, np.pi * hop, spec.shape[0])[:, None]  # expected phase advance per hop, per bin
    dphase = np.angle(c1) - np.angle(c0) - advance
    dphase -= 2 * np.pi * np.round(dphase / (2 * np.pi))
    inc = advance + dphase
    phase = np.angle(spec[:, :1]) + np.concatenate([np.zeros((spec.shape[0], 1)), np.cumsum(inc[:, :-1], axis=1)], axis=1)
    out = torch.as_tensor(mag * np.exp(1j * phase)).to(torch.complex64)
    length = max(1, int(round(len(wav) / rate)))
    return torch.istft(out, n_fft, hop, window=window, center=True, length=length).numpy().astype(np.float32)


def frequency_shift(wav: np.ndarray, factor: float) -> np.ndarray:
    """Every frequency (pitch and formants: a shorter or longer vocal tract) times ``factor``, the duration kept:
    a phase-vocoder stretch by ``factor`` then resampling back by it (100 Hz steps, as :func:`perturb`)."""
    sr_in = int(round(SAMPLE_RATE * factor / 100)) * 100
    if sr_in <= 0:
        raise DataError(f"frequency_shift factor must be > 0, got {factor}")
    return resample(time_stretch(wav, SAMPLE_RATE / sr_in), sr_in)


def perturb(clip: Clip, rng: np.random.Generator, speed: tuple[float, float] = (0.9, 1.1),
            max_shift: int = GROUP_FRAMES * HOP, warp: float = 0.0) -> Clip:
    """One augmented rendering of a training clip, as ASR recipes do: speed perturbation (resampling: tempo and
    pitch change together, Ko et al. 2015) by a factor drawn from ``speed``, then 0..``max_shift`` samples of
    leading silence, which moves the clip against the 60 ms / 40 ms token grids so the same word gets new codes.

    ``warp`` > 0: first shift every frequency by a factor drawn log-uniformly from [1/(1+warp), 1+warp] with the
    duration kept (:func:`frequency_shift`): a new vocal-tract length and pitch independent of the tempo, the
    speaker variation that leave-one-speaker-out tests. ``warp`` = 0 draws nothing extra (old renderings exactly)."""
    if warp < 0:
        raise DataError(f"warp must be >= 0 (relative frequency-shift range), got {warp}")
    wav, tag = clip.wav, ""
    if warp > 0:
        f = float(np.exp(rng.uniform(-np.log1p(warp), np.log1p(warp))))
        wav, tag = frequency_shift(wav, f), f"~f{f:.4f}"
    sr_in = int(round(SAMPLE_RATE * float(rng.uniform(*speed)) / 100)) * 100  # 100 Hz steps keep the filter short
    factor = sr_in / SAMPLE_RATE
    wav = resample(wav, sr_in)  # read as if recorded at sr_in, written at 8 kHz: factor x faster
    shift = int(rng.integers(0, max_shift + 1))
    wav = np.concatenate([np.zeros(shift, dtype=np.float32), wav])
    return Clip(wav, clip.text, clip.speaker, clip.index, f"{clip.name}{tag}~x{factor:.4f}+{shift}")


def augmented(clips: list[Clip], n: int, *, warp: float = 0.0, seed: int = 1) -> list[Clip]:
    """``n`` seeded :func:`perturb` renderings of every clip (clip by clip), as ``data prepare --augment`` makes them."""
    if n < 0:
        raise DataError(f"augment must be >= 0 (extra renderings per clip), got {n}")
    if warp > 0 and n == 0:
        raise DataError("warp needs augment > 0: it perturbs the augmented renderings")
    rng = np.random.default_rng(seed)
    return [perturb(c, rng, warp=warp) for c in clips for _ in range(n)]


def dev_split(train: list[Clip]) -> tuple[list[Clip], list[Clip]]:
    """Carve a selection set out of the training recordings (never the test split): FSDD repetitions 5-9 of
    each speaker and digit, espeak-ng take 3 of each voice and word. Returns (rest of train, dev)."""
    is_dev = lambda c: c.index == 3 if c.speaker.startswith("espeak:") else 5 <= c.index < 10  # noqa: E731
    return [c for c in train if not is_dev(c)], [c for c in train if is_dev(c)]


def split_clips(clips: list[Clip], holdout_speaker: str | None = None) -> tuple[list[Clip], list[Clip]]:
    """(train, test). Default: FSDD's official split (repetitions 0-4 are test); espeak-ng clips keep take 4 of
    each voice and word for test. ``holdout_speaker``: that speaker's clips are the test set (leave-one-out)."""
    if holdout_speaker:
        test = [c for c in clips if c.speaker == holdout_speaker]
        if not test:
            raise DataError(f"speaker {holdout_speaker!r} has no clips; speakers: {sorted({c.speaker for c in clips})}")
        return [c for c in clips if c.speaker != holdout_speaker], test
    is_test = lambda c: c.index == 4 if c.speaker.startswith("espeak:") else c.index < 5  # noqa: E731
    return [c for c in clips if not is_test(c)], [c for c in clips if is_test(c)]
