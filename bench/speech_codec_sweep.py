"""Acoustic autoencoder variants, each trained on FSDD's official train split (64 semantic codes, unused here):
held-out mel L1 and the TTS ceiling (the MFCC judge on every 3rd official test clip after encode -> decode ->
Griffin-Lim). Each argument is JSON: CodecConfig fields plus "steps" and "lr" (issue 20, session 7).

    STEPLAB_SHARED=/work/shared OMP_NUM_THREADS=1 python bench/speech_codec_sweep.py '{}' '{"n_q": 4}' '{"steps": 4000}'
"""
import json
import sys
import time

import numpy as np
import torch

from steplab.data.speech import load_fsdd, split_clips
from steplab.data.speech_tokenizer import SpeechTokenizerConfig, train_speech_tokenizer, reconstruction_error
from steplab.models.audio import CodecConfig
from steplab.eval.speech import train_digit_classifier
torch.set_num_threads(1)
clips = load_fsdd()
tr, te = split_clips(clips)
judge = train_digit_classifier(tr)
te3 = te[::3]
for spec in sys.argv[1:]:
    kw = json.loads(spec)
    steps = kw.pop("steps", 1500); lr = kw.pop("lr", 2e-3)
    t0 = time.time()
    cfg = SpeechTokenizerConfig(semantic_codes=64, steps=steps, lr=lr, codec=CodecConfig(**kw))
    tok = train_speech_tokenizer(tr, cfg)
    t1 = time.time() - t0
    rec = reconstruction_error(tok, te3)
    hit = float(np.mean([p == c.text for p, c in zip(judge.predict([tok.decode_wav(tok.encode(c.wav)[1]) for c in te3]), te3)]))
    print(json.dumps({"codec": kw, "steps": steps, "train_s": round(t1, 1), **rec, "ceiling": hit, "bitrate": tok.bitrate()}), flush=True)
