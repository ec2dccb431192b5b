"""``steplab quickstart``: the main job, end to end on a fresh machine with no data of its own.

corpus (the running Python's standard library sources) -> byte-level BPE tokenizer -> token shards ->
a small Step-1 model -> validation loss and bits per byte -> samples -> a run directory with config,
summary.json, metrics.jsonl, loss.png and report.md.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from steplab.config import resolve
from steplab.data.prepare import META, prepare_data
from steplab.infer.sampling import SamplingParams, generate
from steplab.train.checkpoint import load_run
from steplab.train.trainer import resolve_device, train

CORPUS_BYTES = 8_000_000  # ~2.1M train tokens at vocab 4096: one pass of the default run
VOCAB_SIZE = 4096
BASE_STEPS = 600  # step1-micro at 16 x 256 tokens: about 5 min on 2 CPU cores in bf16
SAMPLE_PROMPTS = ["def ", "import os\n", "class "]


def quickstart(out: str = "runs/quickstart", budget: float = 1.0, source: str = "stdlib", device: str = "auto",
               resume: bool = False, progress: bool = True) -> dict:
    t0 = time.time()
    out_dir = Path(out)
    data_dir, run_dir = out_dir / "data", out_dir / "run"
    print(f"steplab quickstart -> {out_dir}  (budget {budget:g})")

    if (data_dir / META).is_file():
        meta = json.loads((data_dir / META).read_text())
        print(f"[1/3] data: reusing {data_dir}")
    else:
        print(f"[1/3] data: {source} corpus -> byte-level BPE ({VOCAB_SIZE} tokens) -> shards")
        meta = prepare_data(source, data_dir, vocab_size=VOCAB_SIZE, max_bytes=int(CORPUS_BYTES * max(budget, 0.25)), progress=progress)
    print(f"      train {meta['train']['tokens']:,} tokens / val {meta['val']['tokens']:,} tokens "
          f"from {meta['train']['documents'] + meta['val']['documents']:,} documents")

    steps = max(20, int(BASE_STEPS * budget))
    cfg = resolve("step1-micro", overrides=[
        f"data.path={data_dir}", f"train.max_steps={steps}", f"train.warmup_steps={max(5, steps // 20)}",
        f"train.eval_every={max(10, steps // 6)}", f"train.ckpt_every={max(10, steps // 6)}", f"train.device={device}",
    ])
    print(f"[2/3] train: step1-micro ({cfg.model.n_layer} layers, d_model {cfg.model.d_model}), {steps} steps x "
          f"{cfg.tokens_per_step:,} tokens, {cfg.train.dtype}, device {resolve_device(device)}")
    summary = train(cfg, run_dir, resume=resume, progress=progress)

    print("[3/3] samples (temperature 0.8, top-k 50):")
    _, model, tokenizer, _ = load_run(run_dir, device=resolve_device(device))
    params = SamplingParams(max_new_tokens=60, temperature=0.8, top_k=50, seed=0)
    prompts = [[tokenizer.bos_id] + tokenizer.encode(p) for p in SAMPLE_PROMPTS]
    for prompt, completion in zip(SAMPLE_PROMPTS, generate(model, prompts, params, stop_ids={tokenizer.eos_id})):
        print("  ---")
        print("  " + (prompt + tokenizer.decode(completion, skip_special=True)).replace("\n", "\n  "))

    wall = time.time() - t0
    print("\n== result ==")
    print(f"N = {summary['N']:,} non-embedding parameters, D = {summary['D']:,} tokens, C = 6ND = {summary['C_6ND']:.3g} FLOPs")
    print(f"validation loss {summary['val_loss']:.4f} nats/token, {summary['val_bpb']:.4f} bits per byte")
    print(f"throughput {summary['tok_per_s']:,.0f} tokens/s, MFU {summary['mfu']:.1%}")
    print(f"wall time {wall:.1f} s")
    print(f"run directory {run_dir}: " + ", ".join(sorted(p.name for p in run_dir.iterdir())))
    return {**summary, "wall_seconds": wall}
