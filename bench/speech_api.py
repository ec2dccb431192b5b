"""The API round trip of a speech run: every test WAV uploaded through /v1/audio/transcriptions (official openai
client, uvicorn in a thread) must get the transcript `steplab eval --task asr` gives (SpeechModel.transcribe, fp32).

    STEPLAB_SHARED=/work/shared python bench/speech_api.py RUN [--source fsdd] [--checkpoint DIR]

``--checkpoint``: serve that checkpoint of RUN (a dev-chosen one) instead of the latest: the server reads a
temporary run directory that links RUN's config and tokenizer and holds only that checkpoint.
"""
from __future__ import annotations

import argparse
import json
import socket
import threading
import time

from steplab.data.speech import load_audio, load_corpus, split_clips, wav_bytes
from steplab.eval.speech import SpeechModel, normalise


def one_checkpoint_run(run: str, checkpoint: str) -> str:
    import atexit
    import shutil
    import tempfile
    from pathlib import Path

    tmp = Path(tempfile.mkdtemp(prefix="speech-api-"))
    atexit.register(shutil.rmtree, tmp, True)
    for name in ("config.json", "tokenizer"):
        (tmp / name).symlink_to(Path(run).resolve() / name)
    (tmp / "checkpoints").mkdir()
    (tmp / "checkpoints" / Path(checkpoint).name).symlink_to(Path(checkpoint).resolve())
    return str(tmp)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--source", default="fsdd")
    ap.add_argument("--checkpoint", help="a checkpoint directory of RUN (default: the latest)")
    args = ap.parse_args()
    if args.checkpoint:
        args.run = one_checkpoint_run(args.run, args.checkpoint)
    import openai
    import torch
    import uvicorn

    from steplab.serve.app import create_app

    torch.set_num_threads(1)
    _, test = split_clips(load_corpus(args.source))
    files = [wav_bytes(c.wav) for c in test]
    t0 = time.time()
    library = SpeechModel.from_run(args.run, device="cpu").transcribe([load_audio(f) for f in files])
    t_lib = time.time() - t0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app({"speech": args.run}, api_keys=None, dtype="fp32"),
                                           host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
    t0 = time.time()
    api = [client.audio.transcriptions.create(model="speech", file=(f"{c.name}", f, "audio/wav")).text
           for c, f in zip(test, files)]
    t_api = time.time() - t0
    server.should_exit = True
    same = sum(a == b for a, b in zip(api, library))
    correct = sum(normalise(a) == normalise(c.text) for a, c in zip(api, test))
    print(json.dumps({"clips": len(test), "api_equals_eval": same, "api_accuracy": round(correct / len(test), 4),
                      "library_s": round(t_lib, 1), "api_s": round(t_api, 1)}))


if __name__ == "__main__":
    main()
