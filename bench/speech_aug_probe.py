"""Does augmentation help a token-histogram probe on an unseen speaker? Logistic regression on both streams' code
histograms (4 time slices, ``eval/speech.token_features``) for one leave-one-speaker-out speaker: trained on the
other FSDD speakers' clips alone, then with N perturbed renderings of each (``data/speech.augmented``) at each
warp (0 = session 7's speed/shift only). Tests on all the speaker's clips. Issue 20, session 13.

    STEPLAB_SHARED=/work/shared OMP_NUM_THREADS=1 python bench/speech_aug_probe.py TOKENIZER SPEAKER N [WARP ...]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from steplab.data.speech import augmented, load_fsdd, split_clips
from steplab.data.speech_tokenizer import SpeechTokenizer
from steplab.eval.speech import token_features


def main() -> None:
    from sklearn.linear_model import LogisticRegression

    ap = argparse.ArgumentParser()
    ap.add_argument("tokenizer", help="a speech tokenizer trained without SPEAKER")
    ap.add_argument("speaker")
    ap.add_argument("n", type=int, help="renderings per training clip")
    ap.add_argument("warps", type=float, nargs="*", help="warp values to try besides 0")
    args = ap.parse_args()
    tok = SpeechTokenizer.load(args.tokenizer)
    train, test = split_clips(load_fsdd(), args.speaker)
    feats = lambda cs: np.stack([token_features(tok, c.wav, "both") for c in cs])  # noqa: E731
    xtr, xte, ytr, yte = feats(train), feats(test), [c.text for c in train], [c.text for c in test]

    def acc(x, y) -> float:
        clf = LogisticRegression(max_iter=3000, C=10.0, random_state=0).fit(x, y)
        return round(float(np.mean(clf.predict(xte) == yte)), 4)

    print(args.speaker, "plain", acc(xtr, ytr), flush=True)
    for w in [0.0] + args.warps:
        t0 = time.time()
        aug = augmented(train, args.n, warp=w)
        print(args.speaker, f"+{args.n} renderings, warp {w}", acc(np.concatenate([xtr, feats(aug)]), ytr + [c.text for c in aug]),
              f"{time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
