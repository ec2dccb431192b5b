"""Context extension at small scale: base vs no scaling vs YaRN vs PI (issue 17's claims).

    python bench/longctx.py --base runs/base --yarn runs/yarn4 --pi runs/pi4 [--yarn8 runs/yarn8] --keys 10

Prints, for the base run: passkey at 1x and 4x without scaling, perplexity at 1x and 4x; for each extension:
passkey at 4x (and 8x for --yarn8) and perplexity at 1x after training, and the passkey curve over its
checkpoints (steps to 90%). Everything is evaluated on held-out keys and held-out documents.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from steplab.data.prepare import load_prepared
from steplab.eval.longctx import passkey_grid, perplexity_by_position, plot_heatmap
from steplab.train.checkpoint import list_checkpoints, load_run

DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]


def evaluate(run, lengths, ppl_lengths, keys, checkpoint=None, val=None):
    cfg, model, tok, step = load_run(run, checkpoint=checkpoint)
    if val is None:
        val = load_prepared(cfg.data.path)[2]
    grid = passkey_grid(cfg.model, model, tok, lengths, DEPTHS, n=keys)
    ppl = {L: perplexity_by_position(cfg.model, model, val, tok.bos_id, L, max_docs=16)["ppl"] for L in ppl_lengths}
    return step, grid, ppl


def hf_parity(run, length: int, out: Path) -> float:
    """Max |logit difference| between our model and transformers' on a held-out document of ``length`` tokens."""
    import shutil

    import transformers

    from steplab.eval.longctx import long_documents
    from steplab.export.hf import export_hf

    target = out / f"hf-{Path(run).name}"
    shutil.rmtree(target, ignore_errors=True)
    export_hf(run, target)
    cfg, model, tok, _ = load_run(run)
    hf = transformers.AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    doc = long_documents(load_prepared(cfg.data.path)[2], tok.bos_id, length, 1)[0][:length]
    x = torch.from_numpy(doc[None])
    from steplab.eval.longctx import at_length

    with torch.no_grad():
        return (at_length(cfg.model, model, length)(x) - hf(x).logits).abs().max().item()


def serve_long_prompt(run, fraction: float = 0.9) -> dict:
    """A passkey prompt at ``fraction`` of the context through /v1/completions (streaming, chunked prefill)."""
    import time

    from fastapi.testclient import TestClient

    from steplab.infer.engine import Engine, kv_cache_bytes
    from steplab.serve.app import create_app
    from steplab.tasks.passkey import Passkey

    cfg, model, tok, _ = load_run(run)
    C = cfg.model.max_seq_len
    e = Passkey(tok).eval_examples(1, int(fraction * C), 0.5, seed=7)[0]
    prompt, answer = e.tokens[:-e.answer_len], tok.decode(e.tokens[-e.answer_len:]).strip()
    engine = Engine(model, tok, name="long", max_batch=2, prefill_chunk=128, kv_budget_bytes=2 * kv_cache_bytes(cfg.model, C))
    body = {"model": "long", "prompt": prompt, "max_tokens": e.answer_len, "temperature": 0, "stream": True}
    with TestClient(create_app({"long": engine}, api_keys=None)) as client:
        t0, ttft, text = time.perf_counter(), None, ""
        with client.stream("POST", "/v1/completions", json=body) as resp:
            status = resp.status_code
            for line in resp.iter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])["choices"][0]["text"]
                    if chunk and ttft is None:
                        ttft = time.perf_counter() - t0
                    text += chunk
        total = time.perf_counter() - t0
        over = client.post("/v1/completions", json={"model": "long", "prompt": prompt * 2, "max_tokens": 4})
    engine.stop()
    return {"context": C, "prompt_tokens": len(prompt), "status": status, "answer": answer, "got": text.strip(),
            "ttft_s": ttft, "total_s": total, "kv_cache_mib": engine.cache.k.numel() * 2 * engine.cache.k.element_size() / 2**20,
            "kv_per_sequence_mib": kv_cache_bytes(cfg.model, C) / 2**20, "too_long_status": over.status_code}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--yarn")
    ap.add_argument("--pi")
    ap.add_argument("--yarn8")
    ap.add_argument("--keys", type=int, default=10)
    ap.add_argument("--extras", action="store_true", help="also HF parity at 4x/8x and a 90%%-of-context prompt served")
    ap.add_argument("--out", default="/tmp/longctx_bench")
    args = ap.parse_args()
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base_cfg, _, _, _ = load_run(args.base)
    L = base_cfg.model.max_seq_len
    val = load_prepared(base_cfg.data.path)[2]
    results = {}
    step, grid, ppl = evaluate(args.base, [L, 4 * L], [L, 4 * L], args.keys, val=val)
    plot_heatmap(grid, out / "base.png", title="base, no scaling")
    results["base"] = {"step": step, "passkey": grid["mean"], "ppl": ppl}
    print(f"base (step {step}): passkey {L}: {grid['mean'][L]:.0%}, {4 * L} (no scaling): {grid['mean'][4 * L]:.0%}; "
          f"ppl {L}: {ppl[L]:.3f}, {4 * L}: {ppl[4 * L]:.3f} ({ppl[4 * L] / ppl[L]:.2f}x)", flush=True)
    for name in ("yarn", "pi", "yarn8"):
        run = getattr(args, name)
        if not run:
            continue
        lengths = [4 * L, 8 * L] if name == "yarn8" else [4 * L]
        curve = {}
        for ckpt in list_checkpoints(run):
            s, g, _ = evaluate(run, [4 * L], [], args.keys, checkpoint=ckpt, val=val)
            curve[s] = g["mean"][4 * L]
        s, grid, ppl = evaluate(run, lengths, [L, 4 * L], args.keys, val=val)
        plot_heatmap(grid, out / f"{name}.png", title=f"{name} after {s} steps")
        to90 = next((k for k in sorted(curve) if curve[k] >= 0.9), None)
        results[name] = {"step": s, "passkey": grid["mean"], "ppl": ppl, "curve": curve, "steps_to_90": to90}
        extra = f", {8 * L}: {grid['mean'][8 * L]:.0%}" if name == "yarn8" else ""
        print(f"{name} (step {s}): passkey {4 * L}: {grid['mean'][4 * L]:.0%}{extra}; ppl {L}: {ppl[L]:.3f} "
              f"({ppl[L] / results['base']['ppl'][L] - 1:+.1%} vs base), {4 * L}: {ppl[4 * L]:.3f}; "
              f"curve {json.dumps(curve)}; steps to 90%: {to90}", flush=True)
    if args.extras:
        for name in ("yarn", "pi", "yarn8"):
            run = getattr(args, name)
            if run:
                for length in ([4 * L, 8 * L] if name == "yarn8" else [4 * L]):
                    diff = hf_parity(run, length, out)
                    results.setdefault("hf_parity", {})[f"{name}@{length}"] = diff
                    print(f"HF parity {name} at {length} tokens: max |logit diff| {diff:.2e}", flush=True)
        served = serve_long_prompt(args.yarn or args.base)
        results["served"] = served
        print(f"served: {json.dumps(served)}", flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {out}/results.json and heat-maps")


if __name__ == "__main__":
    main()
