"""Serving under load: concurrent streaming clients against `steplab serve` on loopback.

    python bench/serve_load.py [--run RUN | --random-preset step1-mini] [--clients 32] [--seconds 60] [--max-tokens 64]
                               [--max-batch 32] [--sequential-seconds 20] [--warmup 10] [--dtype bf16|fp32] [--json OUT.json]

The server runs in its own process (as a user would run it, API key on), the clients in this one (asyncio +
httpx, each a loop of streaming chat completions with ``stream_options.include_usage`` so output tokens are
the server's own count). Two phases over the same request mix (prompts and seeds cycle identically):

1. sequential: one client, one request at a time, for ``--sequential-seconds``: the baseline tokens/s;
2. concurrent: ``--clients`` clients for ``--seconds``.

Reported: failures (any non-200, error chunk, missing ``[DONE]`` or exception; must be 0), output tokens/s of
both phases and their ratio (target >= 4x), time to first token p50/p99 (request sent -> first content
chunk), and the server's RSS after ``--warmup`` seconds of the concurrent phase vs at its end (growth < 10%).
Without ``--run`` a step1-nano model (0.85M) is trained for a minute first (the numbers are about the serving
stack, not the model). ``--random-preset step1-mini`` serves an *untrained, randomly initialised* model of that
preset instead (25.7M; speed does not depend on the weights' values, and a random model rarely samples a stop
token, so replies run to about ``--max-tokens``): on a model whose step is mostly matrix work rather than Python overhead
the batching gain is different, and both are worth knowing.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPTS = [
    "def main():", "Write a function that parses a config file.", "import os\nimport sys\n", "class Stack:",
    "What does the with statement do?", "for i in range(10):", "Explain list comprehensions.", "try:\n    x = f()\n",
]
KEY = "bench-key-0123456789"


def random_model(preset_name: str, max_len: int):
    """(model, tokenizer): a byte-level BPE tokenizer trained on 1 MB of the stdlib corpus and an untrained model."""
    import dataclasses

    import torch

    from steplab.config import preset
    from steplab.data.sources import iter_documents
    from steplab.data.tokenizer import train_tokenizer
    from steplab.models import build_model

    tok = train_tokenizer(iter_documents("stdlib", max_bytes=1_000_000), 4096)
    torch.manual_seed(0)
    cfg = dataclasses.replace(preset(preset_name).model, vocab_size=tok.vocab_size, max_seq_len=max_len)
    return build_model(cfg).eval(), tok


def serve(run: str, port: int, max_batch: int, max_queue: int, dtype: str) -> None:
    """The server process."""
    import uvicorn

    from steplab.serve.app import create_app

    spec = random_model(run.split(":", 1)[1], 256) if run.startswith("random:") else run
    app = create_app({"bench": spec}, api_keys={KEY}, max_batch=max_batch, max_queue=max_queue, dtype=dtype)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", proxy_headers=False)


def train_tiny(out: Path) -> Path:
    from steplab.config import resolve
    from steplab.data.prepare import prepare_data
    from steplab.train.trainer import train

    prepare_data("stdlib", out / "data", vocab_size=1024, max_bytes=1_000_000, progress=False)
    cfg = resolve("step1-nano", overrides=[f"data.path={out / 'data'}", "train.max_steps=150", "model.max_seq_len=256",
                                           "data.seq_len=128", "train.eval_every=150", "train.ckpt_every=150"])
    train(cfg, out / "run", progress=False)
    return out / "run"


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


class Stats:
    def __init__(self):
        self.ok = 0
        self.failures: list[str] = []
        self.tokens = 0
        self.ttft: list[float] = []


async def one_request(client, url: str, i: int, max_tokens: int, stats: Stats) -> None:
    body = {"model": "bench", "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], "max_tokens": max_tokens,
            "temperature": 0.8, "seed": i, "stream": True, "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    first = None
    usage = None
    done = False
    try:
        async with client.stream("POST", url, json=body, headers={"Authorization": f"Bearer {KEY}"}) as resp:
            if resp.status_code != 200:
                stats.failures.append(f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}")
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    stats.failures.append(f"error chunk: {chunk['error']['message']}")
                    return
                if chunk.get("usage"):
                    usage = chunk["usage"]
                if first is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                    first = time.perf_counter() - sent
    except Exception as e:  # noqa: BLE001 - every failure counts, whatever its kind
        stats.failures.append(f"{type(e).__name__}: {e}")
        return
    if not done or usage is None:
        stats.failures.append("stream ended without usage and [DONE]")
        return
    stats.ok += 1
    stats.tokens += usage["completion_tokens"]
    if first is not None:
        stats.ttft.append(first)


async def phase(base: str, clients: int, seconds: float, max_tokens: int, start_index: int = 0, on_tick=None) -> tuple[Stats, float]:
    import httpx

    stats = Stats()
    counter = iter(range(start_index, 10**9))
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0), limits=limits) as client:
        async def worker():
            while time.perf_counter() < deadline:
                await one_request(client, base + "/v1/chat/completions", next(counter), max_tokens, stats)

        async def ticker():
            while time.perf_counter() < deadline:
                await asyncio.sleep(1.0)
                if on_tick:
                    on_tick()

        started = time.perf_counter()
        tick = asyncio.ensure_future(ticker())
        await asyncio.gather(*[worker() for _ in range(clients)])
        tick.cancel()
        elapsed = time.perf_counter() - started  # includes finishing the requests in flight at the deadline
    return stats, elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="run directory to serve (default: train a step1-nano model first)")
    ap.add_argument("--random-preset", help="serve an untrained, randomly initialised model of this preset, e.g. step1-mini")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="weights and KV cache (steplab serve's default: bf16)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--sequential-seconds", type=float, default=20)
    ap.add_argument("--warmup", type=float, default=10, help="seconds into the concurrent phase for the baseline RSS")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-queue", type=int, default=256)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--serve", help=argparse.SUPPRESS)  # internal: run the server process
    args = ap.parse_args()
    if args.serve:
        serve(args.serve, args.port, args.max_batch, args.max_queue, args.dtype)
        return 0

    import httpx

    run = args.run or (f"random:{args.random_preset}" if args.random_preset else None)
    if run is None:
        tmp = Path(tempfile.mkdtemp(prefix="steplab-serve-bench-"))
        print(f"training a step1-nano model in {tmp} ...", flush=True)
        run = str(train_tiny(tmp))
    if not args.port:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            args.port = s.getsockname()[1]
    base = f"http://127.0.0.1:{args.port}"
    server = subprocess.Popen([sys.executable, __file__, "--serve", run, "--port", str(args.port), "--max-batch", str(args.max_batch),
                               "--max-queue", str(args.max_queue), "--dtype", args.dtype])
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline + 180 or server.poll() is not None:
                raise SystemExit("the server did not come up")
            time.sleep(0.3)
        asyncio.run(phase(base, 4, 3, args.max_tokens, start_index=10**8))  # warm-up, not counted

        print(f"sequential: 1 client for {args.sequential_seconds:g} s ...", flush=True)
        seq, seq_elapsed = asyncio.run(phase(base, 1, args.sequential_seconds, args.max_tokens))
        samples: list[tuple[float, int]] = []
        t0 = time.perf_counter()
        print(f"concurrent: {args.clients} clients for {args.seconds:g} s ...", flush=True)
        con, con_elapsed = asyncio.run(phase(base, args.clients, args.seconds, args.max_tokens,
                                             on_tick=lambda: samples.append((time.perf_counter() - t0, rss_bytes(server.pid)))))
        samples.append((time.perf_counter() - t0, rss_bytes(server.pid)))
    finally:
        server.terminate()
        server.wait(15)

    warm = next((rss for t, rss in samples if t >= args.warmup), samples[0][1])
    end = samples[-1][1]
    seq_tps, con_tps = seq.tokens / seq_elapsed, con.tokens / con_elapsed
    result = {
        "model": args.random_preset + " (random init)" if args.random_preset else "step1-nano (trained)" if not args.run else args.run,
        "dtype": args.dtype, "clients": args.clients, "seconds": args.seconds, "max_tokens": args.max_tokens, "max_batch": args.max_batch,
        "sequential": {"requests": seq.ok, "failures": len(seq.failures), "tokens": seq.tokens, "elapsed_s": seq_elapsed,
                       "tokens_per_s": seq_tps, "ttft_p50_s": percentile(seq.ttft, 50), "ttft_p99_s": percentile(seq.ttft, 99)},
        "concurrent": {"requests": con.ok, "failures": len(con.failures), "tokens": con.tokens, "elapsed_s": con_elapsed,
                       "tokens_per_s": con_tps, "ttft_p50_s": percentile(con.ttft, 50), "ttft_p99_s": percentile(con.ttft, 99)},
        "speedup": con_tps / seq_tps if seq_tps else float("nan"),
        "rss_after_warmup_mb": warm / 2**20, "rss_end_mb": end / 2**20, "rss_growth": (end - warm) / warm if warm else float("nan"),
        "failure_examples": (seq.failures + con.failures)[:5],
    }
    s, c = result["sequential"], result["concurrent"]
    print()
    print(f"model {result['model']}, {args.dtype}, max_tokens {args.max_tokens}, max_batch {args.max_batch}")
    print("| phase | clients | requests | failures | output tok/s | TTFT p50 | TTFT p99 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(f"| one at a time | 1 | {s['requests']} | {s['failures']} | {s['tokens_per_s']:,.0f} | {s['ttft_p50_s'] * 1000:.0f} ms | {s['ttft_p99_s'] * 1000:.0f} ms |")
    print(f"| concurrent | {args.clients} | {c['requests']} | {c['failures']} | {c['tokens_per_s']:,.0f} | {c['ttft_p50_s'] * 1000:.0f} ms | {c['ttft_p99_s'] * 1000:.0f} ms |")
    print()
    print(f"throughput: {result['speedup']:.1f}x one-at-a-time (target >= 4x)")
    print(f"server RSS: {result['rss_after_warmup_mb']:.0f} MB after {args.warmup:g} s warm-up -> {result['rss_end_mb']:.0f} MB at the end "
          f"({result['rss_growth']:+.1%}; target < +10%)")
    if result["failure_examples"]:
        print("failures, e.g.:", *result["failure_examples"], sep="\n  ")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    ok = s["failures"] == 0 and c["failures"] == 0 and result["speedup"] >= 4 and result["rss_growth"] < 0.10
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
