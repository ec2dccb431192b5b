"""Choose the TTS sampling temperature without touching the judge: the run's own ASR listens to what it said.

The official TTS score (`steplab eval RUN --task tts`) uses an MFCC + logistic-regression judge trained on real
recordings and seeds 0-9. Tuning the sampler on that judge would tune on the test; here each temperature is
scored by the speech LM itself (its greedy ASR of the decoded waveform, re-tokenised) on other seeds (1000+).

With ``--candidates K`` (best-of-K by the same own ASR) the own-ASR score of the returned utterance is the
verifier's acceptance, reported for every k' <= K in powers of two from one run (candidate seeds are nested).

    STEPLAB_SHARED=/work/shared OMP_NUM_THREADS=1 python bench/speech_tts_select.py RUN [--checkpoint DIR] [--temperatures 0.3 0.5 0.7 1.0] [--candidates 8]
"""
from __future__ import annotations

import argparse
import json

from steplab.eval.speech import SpeechModel, tts_intelligibility


class OwnASR:
    """The judge interface (``predict(wavs) -> texts``) over the model's own transcription."""

    def __init__(self, sm: SpeechModel) -> None:
        self.sm = sm

    def predict(self, wavs):
        return self.sm.transcribe(wavs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--temperatures", type=float, nargs="+", default=[0.3, 0.5, 0.7, 1.0])
    ap.add_argument("--checkpoint", help="a checkpoint directory of the run (default: the latest)")
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--seed", type=int, default=1, help="seeds seed*1000 + k: keep away from the official seed 0")
    ap.add_argument("--candidates", type=int, default=1, help="best-of-K by the model's own ASR")
    ap.add_argument("--renderings", type=int, default=0, help="perturbed renderings the verifier also hears")
    args = ap.parse_args()
    sm = SpeechModel.from_run(args.run, device="cpu", checkpoint=args.checkpoint)
    out = {}
    for t in args.temperatures:
        r = tts_intelligibility(sm, OwnASR(sm), args.samples, seed=args.seed, temperature=t, candidates=args.candidates,
                                renderings=args.renderings)
        out[t] = round(r["accuracy"], 4)
        extra = f"; verifier accepted at k = {r['own_asr_accepted']}" if args.candidates > 1 else ""
        print(f"temperature {t}: own-ASR intelligibility {r['accuracy']:.1%} (best of {args.candidates}, "
              f"{r['seconds_per_utterance']:.3f} s per utterance){extra}", flush=True)
    best = max(out, key=lambda t: (out[t], -abs(t - 0.7)))
    print(json.dumps({"run": args.run, "own_asr": out, "chosen": best}))


if __name__ == "__main__":
    main()
