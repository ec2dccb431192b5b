"""Which semantic features / codebook size keep the digit? k-means on FSDD's official train split, then logistic
regression on the codes' histograms in 4 time slices, scored on the official test split (issue 20, session 7).

    STEPLAB_SHARED=/work/shared OMP_NUM_THREADS=1 python bench/speech_semantic_probe.py \
        logmel_cmn,logmel_cmvn,mfcc13_cmvn,mfcc13d_cmvn,mfcc20d_cmvn 256,512
"""
import json
import sys
import time

import numpy as np
import torch
from scipy.fft import dct
from sklearn.cluster import MiniBatchKMeans
from sklearn.linear_model import LogisticRegression
from steplab.data.speech import load_fsdd, split_clips, SEM_FRAMES, N_MELS
from steplab.data.speech_tokenizer import padded_mel, semantic_features
torch.set_num_threads(1)
clips = load_fsdd()
tr, te = split_clips(clips)
mels = {c.name: padded_mel(c.wav) for c in clips}

def f_logmel(m, f):
    return semantic_features(m, f)
def mfcc_cmvn(m, f, n=13, deltas=True):
    c = dct(m.numpy(), type=2, norm="ortho", axis=1)[:, :n]
    mu, sd = c[:f].mean(0), c[:f].std(0) + 1e-3
    c = (c - mu) / sd
    if deltas:
        c = np.concatenate([c, np.gradient(c, axis=0)], axis=1)
    return c.reshape(-1, SEM_FRAMES * c.shape[1])
def logmel_cmvn(m, f):
    x = m.numpy(); mu, sd = x[:f].mean(0), x[:f].std(0) + 1e-3
    return ((x - mu) / sd).reshape(-1, SEM_FRAMES * N_MELS)
VARS = {"logmel_cmn": f_logmel, "logmel_cmvn": logmel_cmvn, "mfcc13_cmvn": lambda m, f: mfcc_cmvn(m, f, 13, False),
        "mfcc13d_cmvn": lambda m, f: mfcc_cmvn(m, f, 13, True), "mfcc20d_cmvn": lambda m, f: mfcc_cmvn(m, f, 20, True)}
def hist(codes, K, seg=4):
    return np.concatenate([np.bincount(p, minlength=K) / max(1, len(p)) for p in np.array_split(codes, seg)])
for name in sys.argv[1].split(","):
    for K in [int(k) for k in sys.argv[2].split(",")]:
        t0 = time.time()
        F = {c.name: VARS[name](*mels[c.name]) for c in clips}
        X = np.concatenate([F[c.name] for c in tr])
        km = MiniBatchKMeans(K, random_state=0, n_init=3, batch_size=2048).fit(X)
        codes = {n: km.predict(v) for n, v in F.items()}
        xtr = np.stack([hist(codes[c.name], K) for c in tr]); xte = np.stack([hist(codes[c.name], K) for c in te])
        clf = LogisticRegression(max_iter=3000, C=10.0, random_state=0).fit(xtr, [c.text for c in tr])
        acc = float(np.mean(clf.predict(xte) == [c.text for c in te]))
        print(json.dumps({"feat": name, "K": K, "probe_acc": acc, "s": round(time.time() - t0, 1)}), flush=True)
