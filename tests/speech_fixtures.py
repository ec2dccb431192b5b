"""One tiny speech run per test process: espeak-ng digits -> speech tokenizer -> ASR+TTS shards -> 40 trainer steps.

Needs espeak-ng (callers skip when it is missing). About 20 s on a quiet machine, once per process.
"""
from __future__ import annotations

import atexit
import shutil
import tempfile
import threading
from pathlib import Path

_CACHE: dict = {}
_LOCK = threading.Lock()


def tiny_speech_run() -> tuple[Path, list]:
    """(run directory, its held-out clips)."""
    with _LOCK:
        if "run" not in _CACHE:
            import torch

            from steplab.config import resolve
            from steplab.data.speech import DIGITS, espeak_clips, split_clips
            from steplab.data.speech_lm import prepare_speech_data
            from steplab.data.speech_tokenizer import SpeechTokenizerConfig, train_speech_tokenizer
            from steplab.models.audio import CodecConfig
            from steplab.train.trainer import train

            tmp = Path(tempfile.mkdtemp(prefix="steplab-speech-test-"))
            atexit.register(shutil.rmtree, tmp, True)
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                clips = espeak_clips(DIGITS[:4], voices=["en-us", "en-gb"], speeds=(140, 180), pitches=(40, 50, 60))
                train_clips, test_clips = split_clips(clips)
                cfg = SpeechTokenizerConfig(semantic_codes=16, steps=40, batch_size=8, lr=3e-3,
                                            codec=CodecConfig(dim=32, latent=8, n_q=2, codebook_size=16))
                train_speech_tokenizer(train_clips, cfg).save(tmp / "speechtok")
                prepare_speech_data(train_clips, test_clips, tmp / "speechtok", tmp / "data", seq_len=128, packings=2)
                run_cfg = resolve("step1-nano", overrides=[
                    f"data.path={tmp / 'data'}", "data.seq_len=128", "model.max_seq_len=128", "model.d_model=64",
                    "model.n_layer=2", "train.batch_size=4", "train.max_steps=40", "train.eval_every=40",
                    "train.ckpt_every=20", "train.warmup_steps=5", "train.threads=1", "train.dtype=fp32"])
                train(run_cfg, tmp / "run", progress=False)
            finally:
                torch.set_num_threads(threads)
            _CACHE["run"] = (tmp / "run", test_clips)
        return _CACHE["run"]
