"""Speech evaluation: ASR accuracy of a speech LM, TTS intelligibility judged by an independent classifier,
and the MFCC + logistic-regression baseline that is also that judge.

- ASR: the run transcribes each clip from its discrete audio tokens alone (greedy); a clip is correct when
  the transcript equals the reference text (case and surrounding space ignored).
- TTS: the run speaks each digit word (sampled, seeded), its acoustic tokens are decoded to a waveform
  (autoencoder + Griffin-Lim), and a classifier trained only on real recordings says which digit it hears:
  Step-Audio's ASR-on-TTS score in miniature. The judge never sees the model or its tokens.
- Best-of-k TTS (test-time scaling): k sampled candidates per request, each decoded to a waveform and
  transcribed by the same LM's ASR path; the candidate whose transcript is the requested text is returned (the
  most confident one when several are; none: the one the ASR finds most likely to say it). The judge is never
  part of the choice.
- Baseline: MFCC summary statistics (mean, std and 4 segment means of 13 coefficients) -> scikit-learn
  logistic regression, on the same split as the LM.
"""
from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from steplab.data.speech import DIGITS, Clip, log_mel
from steplab.data.speech_lm import SpeechVocab

VERIFY_RENDERINGS = 0  # perturbed renderings the verifier also hears (4 was chosen on dev, lost on test: benchmarks)
CANDIDATE_SEED_STRIDE = 1_000_003  # a prime above any seed*1000 + round the evals use: candidates never share seeds


def mfcc_features(wav: np.ndarray, n_mfcc: int = 13) -> np.ndarray:
    from scipy.fft import dct

    m = dct(log_mel(wav).numpy(), type=2, norm="ortho", axis=1)[:, :n_mfcc]
    segments = [s.mean(axis=0) for s in np.array_split(m, 4)]
    return np.concatenate([m.mean(axis=0), m.std(axis=0), *segments])


@dataclass
class DigitClassifier:
    """MFCC statistics + logistic regression: the baseline, and the independent judge of TTS output."""
    model: object
    labels: list[str]

    def predict(self, wavs: list[np.ndarray]) -> list[str]:
        return [self.labels[i] for i in self.model.predict(np.stack([mfcc_features(w) for w in wavs]))]

    def accuracy(self, clips: list[Clip]) -> float:
        return float(np.mean([p == c.text for p, c in zip(self.predict([c.wav for c in clips]), clips)]))


def train_digit_classifier(clips: list[Clip], seed: int = 0) -> DigitClassifier:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    labels = sorted({c.text for c in clips})
    x = np.stack([mfcc_features(c.wav) for c in clips])
    y = np.array([labels.index(c.text) for c in clips])
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, random_state=seed)).fit(x, y)
    return DigitClassifier(model, labels)


class SpeechModel:
    """A trained speech LM run: transcribe waveforms, speak text (the library behind eval and serve)."""

    def __init__(self, model: torch.nn.Module, vocab: SpeechVocab, name: str = "", step: int = 0) -> None:
        self.model, self.vocab, self.name, self.step = model.eval(), vocab, name, step
        self.lock = threading.Lock()  # the server runs one decode per model at a time

    @classmethod
    def from_run(cls, run: str | Path, device: str = "auto", checkpoint: str | Path | None = None) -> "SpeechModel":
        from steplab.train.checkpoint import load_run
        from steplab.train.trainer import resolve_device

        _, model, _, step = load_run(run, device=resolve_device(device), checkpoint=checkpoint)
        return cls(model, SpeechVocab.load(Path(run) / "tokenizer"), Path(run).name, step)

    @property
    def context(self) -> int:
        return self.model.cfg.max_seq_len

    def transcribe(self, wavs: list[np.ndarray], batch_size: int = 32, blank: str | None = None) -> list[str]:
        """Greedy transcripts from the audio tokens (``blank``: one stream silenced, an ablation)."""
        return self.transcribe_prompts([self.vocab.asr_prompt(w, blank) for w in wavs], batch_size)

    def transcribe_prompts(self, asr_prompts: list[list[int]], batch_size: int = 32) -> list[str]:
        """Greedy transcripts of ready ASR prompts (``SpeechVocab.asr_prompt``)."""
        from steplab.infer.sampling import SamplingParams, generate

        out = []
        tok = self.vocab.text
        for i in range(0, len(asr_prompts), batch_size):
            prompts = asr_prompts[i:i + batch_size]
            longest = max(len(p) for p in prompts)
            params = SamplingParams(max_new_tokens=max(1, min(16, self.context - longest)), temperature=0.0)
            for ids in generate(self.model, prompts, params, stop_ids={tok.eos_id}):
                out.append(tok.decode([t for t in ids if t < self.vocab.base], skip_special=True).strip())
        return out

    def max_audio_seconds(self) -> float:
        """The longest clip whose ASR prompt (+ a short transcript) fits the context."""
        per_s = self.vocab.speech.bitrate()["tokens_per_second"]
        return max(0.0, (self.context - 24) / per_s)

    def speak(self, texts: list[str], *, temperature: float = 0.7, top_k: int = 0, seed: int = 0,
              candidates: int = 1, renderings: int = VERIFY_RENDERINGS) -> list[np.ndarray]:
        """Text -> audio tokens (sampled, seeded) -> acoustic decoder -> Griffin-Lim waveform (8 kHz); with
        ``candidates`` k > 1, the best of k checked by the model's own ASR (:meth:`speak_best`)."""
        if candidates == 1:
            return self.sample_speech(texts, temperature=temperature, top_k=top_k, seed=seed)
        return [u.wav for u in self.speak_best(texts, candidates, temperature=temperature, top_k=top_k, seed=seed,
                                               renderings=renderings)]

    def speak_best(self, texts: list[str], candidates: int, *, temperature: float = 0.7, top_k: int = 0, seed: int = 0,
                   renderings: int = VERIFY_RENDERINGS, verify=None) -> list["Spoken"]:
        """Best-of-k TTS with the model's own ASR as the verifier (test-time scaling).

        Candidate j of every text is sampled with seed ``candidate_seed(seed, j)``, so candidate 0 is what
        ``speak(candidates=1)`` returns and the first k candidates of a larger k are the same: best-of-k is nested
        in k. ``verify(wavs, texts, seed) -> [(transcript, accepted, score)]`` (default :meth:`own_asr` with
        ``renderings``) listens to each decoded candidate; :func:`select_candidate` picks the one to return."""
        if candidates < 1:
            raise ValueError(f"candidates must be >= 1, got {candidates}")
        verify = verify or partial(self.own_asr, renderings=renderings)
        rows: list[list[tuple]] = [[] for _ in texts]
        for j in range(candidates):
            wavs = self.sample_speech(texts, temperature=temperature, top_k=top_k, seed=candidate_seed(seed, j))
            # one candidate: nothing to choose, so nothing is verified
            checks = verify(wavs, texts, candidate_seed(seed, j)) if candidates > 1 else [("", False, 0.0)] * len(texts)
            for row, w, (heard, ok, score) in zip(rows, wavs, checks):
                row.append((w, heard, bool(ok), float(score)))
        out = []
        for row in rows:
            accepted, scores = [c[2] for c in row], [c[3] for c in row]
            best = select_candidate(accepted, scores) if candidates > 1 else 0
            out.append(Spoken(row[best][0], best, [c[1] for c in row], accepted if candidates > 1 else [], scores))
        return out

    def own_asr(self, wavs: list[np.ndarray], texts: list[str], seed: int = 0,
                renderings: int = VERIFY_RENDERINGS) -> list[tuple[str, bool, float]]:
        """The verifier: each waveform, and ``renderings`` speed/shift-perturbed renderings of it (the training
        augmentation, seeded by ``seed``), re-tokenised and transcribed greedily by this model's ASR path. A
        candidate is accepted when every rendering's transcript is the requested text (a decode the ASR hears
        only by luck does not pass); its confidence is the summed log-likelihood of the text (teacher-forced
        ``text <|eos|>`` after the audio) over the renderings. Returns (the plain waveform's transcript, accepted,
        confidence) per waveform; audio too long to leave room for the text is ("", False, -inf)."""
        from steplab.data.speech import perturb

        rng = np.random.default_rng(seed)
        views = [wavs] + [[perturb(Clip(w, "", "", 0), rng).wav for w in wavs] for _ in range(renderings)]
        heard = [self._asr_check(v, texts) for v in views]
        out = []
        for i, t in enumerate(texts):
            ok = all(normalise(h[i][0]) == normalise(t) for h in heard)
            out.append((heard[0][i][0], ok, float(sum(h[i][1] for h in heard))))
        return out

    def _asr_check(self, wavs: list[np.ndarray], texts: list[str]) -> list[tuple[str, float]]:
        """(greedy transcript, log p(text <|eos|> | audio)) per waveform; ("", -inf) when it does not fit."""
        prompts = [self.vocab.asr_prompt(w) for w in wavs]
        targets = [self.vocab.text.encode(normalise(t)) + [self.vocab.text.eos_id] for t in texts]
        fits = [i for i, (p, t) in enumerate(zip(prompts, targets)) if len(p) + len(t) <= self.context]
        out = [("", float("-inf"))] * len(wavs)
        if fits:
            heard = self.transcribe_prompts([prompts[i] for i in fits])
            scores = self.continuation_logprob([prompts[i] for i in fits], [targets[i] for i in fits])
            for i, h, s in zip(fits, heard, scores):
                out[i] = (h, s)
        return out

    @torch.no_grad()
    def continuation_logprob(self, prompts: list[list[int]], targets: list[list[int]]) -> list[float]:
        """Sum of log p(target | prompt) per row, teacher-forced in one right-padded batch (causal: padding after a
        row never changes its logits)."""
        device = next(self.model.parameters()).device
        seqs = [p + t for p, t in zip(prompts, targets)]
        ids = torch.full((len(seqs), max(len(s) for s in seqs)), self.vocab.text.special_ids["<|pad|>"], dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s)
        logp = self.model(ids.to(device)).float().log_softmax(-1).cpu()
        nxt = logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]  # log p of each next token
        return [float(nxt[i, len(p) - 1:len(p) - 1 + len(t)].sum()) for i, (p, t) in enumerate(zip(prompts, targets))]

    def sample_speech(self, texts: list[str], *, temperature: float = 0.7, top_k: int = 0, seed: int = 0) -> list[np.ndarray]:
        """One sampled utterance per text: text -> audio tokens -> acoustic decoder -> Griffin-Lim (8 kHz)."""
        from steplab.infer.sampling import SamplingParams, generate

        prompts = [self.vocab.tts_prompt(t) for t in texts]
        longest = max(len(p) for p in prompts)
        params = SamplingParams(max_new_tokens=self.context - longest, temperature=temperature, top_k=top_k, seed=seed)
        wavs = []
        for ids in generate(self.model, prompts, params, stop_ids={self.vocab.close_id, self.vocab.text.eos_id}):
            _, acoustic = self.vocab.speech.from_ids(ids, self.vocab.base)
            if len(acoustic) == 0:  # nothing well-formed came out: a short silence, not a crash
                wavs.append(np.zeros(800, dtype=np.float32))
                continue
            wavs.append(self.vocab.speech.decode_wav(acoustic))
        return wavs


def normalise(text: str) -> str:
    return " ".join(text.lower().strip(" .,!?").split())


def candidate_seed(seed: int, j: int) -> int:
    """The sampling seed of candidate ``j`` of a request seeded ``seed`` (candidate 0: the seed itself)."""
    return seed + j * CANDIDATE_SEED_STRIDE


def select_candidate(accepted: list[bool], scores: list[float]) -> int:
    """The candidate to return: the most confident of those the verifier accepted; when none is accepted, the one
    it finds most likely to say the text; ties go to the earlier candidate."""
    return max(range(len(scores)), key=lambda i: (bool(accepted[i]), scores[i], -i))


@dataclass
class Spoken:
    """A best-of-k utterance: the waveform returned and what the verifier said about every candidate."""
    wav: np.ndarray
    chosen: int
    transcripts: list[str]
    accepted: list[bool]  # empty for k = 1 (nothing was verified)
    scores: list[float]


def transcribe_voted(sm: SpeechModel, wavs: list[np.ndarray], votes: int = 1, blank: str | None = None,
                     seed: int = 0) -> list[str]:
    """Greedy transcripts; ``votes`` > 1: also transcribe ``votes - 1`` perturbed renderings of each clip (the
    training augmentation: speed 0.9-1.1, a shift of up to 120 ms; seeded) and keep the most frequent transcript,
    ties going to the unperturbed clip's. Test-time augmentation; still discrete audio tokens only."""
    from collections import Counter

    from steplab.data.speech import perturb

    hyps = [sm.transcribe(wavs, blank=blank)]
    rng = np.random.default_rng(seed)
    for _ in range(votes - 1):
        hyps.append(sm.transcribe([perturb(Clip(w, "", "", 0), rng).wav for w in wavs], blank=blank))
    return [Counter(normalise(h[i]) for h in hyps).most_common(1)[0][0] if votes > 1 else hyps[0][i]
            for i in range(len(wavs))]


def asr_accuracy(sm: SpeechModel, clips: list[Clip], blank: str | None = None, votes: int = 1) -> dict:
    hyps = transcribe_voted(sm, [c.wav for c in clips], votes, blank)
    per = defaultdict(lambda: [0, 0])
    for h, c in zip(hyps, clips):
        per[c.speaker][0] += normalise(h) == normalise(c.text)
        per[c.speaker][1] += 1
    correct = sum(v[0] for v in per.values())
    return {"accuracy": correct / len(clips), "correct": correct, "n": len(clips), "votes": votes,
            "per_speaker": {s: round(v[0] / v[1], 4) for s, v in sorted(per.items())},
            "examples": [{"ref": c.text, "hyp": h} for h, c in list(zip(hyps, clips))[:5]]}


def tts_intelligibility(sm: SpeechModel, judge, samples: int = 10, seed: int = 0, words: list[str] = DIGITS,
                        temperature: float = 0.7, candidates: int = 1, renderings: int = VERIFY_RENDERINGS) -> dict:
    """``judge``: anything with ``predict(wavs) -> texts`` (the independent classifier; a model's own ASR for
    choosing sampler settings without touching the judge). ``candidates`` k: best-of-k by the model's own ASR;
    ``own_asr_accepted`` reports, for each k' <= k in powers of two, how many utterances had a candidate among
    their first k' that the verifier accepted (nested seeds make that exactly best-of-k''s acceptance)."""
    spoken: list[Spoken] = []
    t0 = time.perf_counter()
    for k in range(samples):  # one seed per round, every word in the batch: deterministic per (seed, k)
        spoken += sm.speak_best(list(words), candidates, seed=seed * 1000 + k, temperature=temperature,
                                renderings=renderings)
    seconds = time.perf_counter() - t0
    wavs = [u.wav for u in spoken]
    texts = [w for _ in range(samples) for w in words]
    heard = judge.predict(wavs)
    heard = [normalise(h) for h in heard]
    per = {w: float(np.mean([h == t for h, t in zip(heard, texts) if t == w])) for w in words}
    out = {"temperature": temperature, "candidates": candidates, "verify_renderings": renderings,
           "accuracy": float(np.mean([h == t for h, t in zip(heard, texts)])), "n": len(texts), "per_word": per,
           "mean_seconds": float(np.mean([len(w) / 8000 for w in wavs])),
           "seconds_per_utterance": round(seconds / len(texts), 4)}
    if candidates > 1:
        ks = [2 ** i for i in range(candidates.bit_length()) if 2 ** i <= candidates] + [candidates]
        out["own_asr_accepted"] = {k: float(np.mean([any(u.accepted[:k]) for u in spoken])) for k in sorted(set(ks))}
        out["chosen_candidate_mean"] = float(np.mean([u.chosen for u in spoken]))
    return out


def token_features(tok, wav: np.ndarray, stream: str, segments: int = 4) -> np.ndarray:
    """Code histograms of one stream ("semantic" | "acoustic" | "both") in ``segments`` equal time slices."""
    sem, ac = tok.encode(wav)
    parts = []
    if stream in ("semantic", "both"):
        parts += [(sem, tok.cfg.semantic_codes)]
    if stream in ("acoustic", "both"):
        parts += [(ac[:, q], tok.cfg.codec.codebook_size) for q in range(tok.n_q)]
    out = []
    for codes, size in parts:
        for piece in np.array_split(codes, segments):
            h = np.bincount(piece, minlength=size).astype(np.float32)
            out.append(h / max(1, len(piece)))
    return np.concatenate(out)


def stream_probe(tok, train: list[Clip], test: list[Clip], stream: str, seed: int = 0) -> float:
    """Accuracy of logistic regression on one stream's code histograms: what the stream alone carries."""
    from sklearn.linear_model import LogisticRegression

    x = np.stack([token_features(tok, c.wav, stream) for c in train])
    y = [c.text for c in train]
    clf = LogisticRegression(max_iter=3000, C=10.0, random_state=seed).fit(x, y)
    return float(np.mean(clf.predict(np.stack([token_features(tok, c.wav, stream) for c in test])) == [c.text for c in test]))
