"""Step-1V: the same held-out questions through the HTTP API (base64 PNGs) and through ``steplab eval``'s path.

    python bench/step1v_api.py RUN [-n 200]

Serves RUN with ``steplab.serve.app.create_app`` on a local port, posts every question as an OpenAI chat request
with its image as a ``data:image/png;base64`` part (temperature 0), and compares the replies with the greedy
answers ``steplab.eval.vqa.answer`` produces for the same samples. Prints the agreement and both accuracies.
"""
from __future__ import annotations

import argparse
import base64
import io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # serve_fixtures.Server: uvicorn in a thread


def main() -> None:
    import httpx
    import torch
    from PIL import Image

    from serve_fixtures import Server
    from steplab.data import images as I
    from steplab.eval.vqa import answer
    from steplab.infer.engine import Engine
    from steplab.serve.app import create_app
    from steplab.tasks import vqa
    from steplab.train.checkpoint import load_run

    p = argparse.ArgumentParser()
    p.add_argument("run")
    p.add_argument("-n", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg, model, tok, step = load_run(args.run)
    samples = I.held_out_samples(args.n, "vqa", args.seed)
    pixels = [I.draw(s.image) for s in samples]
    with Engine(model, tok, max_batch=16, max_queue=1 << 20) as engine:
        expected = answer(engine, tok, samples, pixels, cfg.model.vision.n_tokens, cfg.model.vision.image_place)
    app = create_app({"step-1v": (model, tok)}, api_keys=None)
    got = []
    with Server(app) as srv, httpx.Client(timeout=120) as client:
        for s, px in zip(samples, pixels):
            buf = io.BytesIO()
            Image.fromarray(px).save(buf, format="PNG")
            url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
            body = {"model": "step-1v", "temperature": 0, "max_tokens": 32,
                    "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                              {"type": "text", "text": s.prompt}]}]}
            r = client.post(srv.url + "/v1/chat/completions", json=body)
            r.raise_for_status()
            got.append(r.json()["choices"][0]["message"]["content"])
    same = sum(a == b for a, b in zip(got, expected))
    acc = lambda outs: sum(vqa.grade(s, o) for s, o in zip(samples, outs)) / len(samples)  # noqa: E731
    print(f"run {args.run} step {step}: {same}/{len(samples)} API answers equal the eval's; "
          f"accuracy API {acc(got):.1%}, eval {acc(expected):.1%}")


if __name__ == "__main__":
    main()
