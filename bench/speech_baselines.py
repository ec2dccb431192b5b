"""Speech baselines and tokenizer diagnostics on FSDD (official split and leave-one-speaker-out):

- MFCC + logistic regression (eval/speech.py's DigitClassifier: the baseline and the TTS judge);
- what each token stream alone carries: logistic regression on per-stream code histograms (4 time slices);
- the TTS ceiling: the judge on real test clips, on Griffin-Lim of their real log-mel, and on Griffin-Lim of
  the acoustic stream's reconstruction (what perfect acoustic tokens would score).

    STEPLAB_SHARED=/work/shared OMP_NUM_THREADS=1 python bench/speech_baselines.py SPEECH_TOKENIZER_DIR
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from steplab.data.speech import griffin_lim, load_fsdd, log_mel, split_clips
from steplab.data.speech_tokenizer import SpeechTokenizer
from steplab.eval.speech import token_features, train_digit_classifier

STREAMS = ("semantic", "acoustic", "both")


def main() -> None:
    from sklearn.linear_model import LogisticRegression

    ap = argparse.ArgumentParser()
    ap.add_argument("tokenizer")
    ap.add_argument("--ceiling-every", type=int, default=3, help="TTS ceiling on every k-th official test clip")
    ap.add_argument("--official-only", action="store_true", help="skip the leave-one-speaker-out rows")
    args = ap.parse_args()
    tok = SpeechTokenizer.load(args.tokenizer)
    clips = load_fsdd()
    feats = {s: {c.name: token_features(tok, c.wav, s) for c in clips} for s in STREAMS}
    out: dict = {}
    for holdout in [None] + ([] if args.official_only else sorted({c.speaker for c in clips})):
        train, test = split_clips(clips, holdout)
        row = {"mfcc_logreg": round(train_digit_classifier(train).accuracy(test), 4)}
        for s in STREAMS:
            x = np.stack([feats[s][c.name] for c in train])
            clf = LogisticRegression(max_iter=3000, C=10.0, random_state=0).fit(x, [c.text for c in train])
            pred = clf.predict(np.stack([feats[s][c.name] for c in test]))
            row[f"tokens_{s}"] = round(float(np.mean(pred == [c.text for c in test])), 4)
        out[holdout or "official"] = row
        print(holdout or "official", row, flush=True)
    train, test = split_clips(clips)
    judge = train_digit_classifier(train)
    test = test[::args.ceiling_every]
    hit = lambda wavs: round(float(np.mean([p == c.text for p, c in zip(judge.predict(wavs), test)])), 4)  # noqa: E731
    out["tts_ceiling"] = {"clips": len(test), "real": hit([c.wav for c in test]),
                          "griffin_lim_of_real_mel": hit([griffin_lim(log_mel(c.wav)) for c in test]),
                          "acoustic_stream_then_griffin_lim": hit([tok.decode_wav(tok.encode(c.wav)[1]) for c in test])}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
