"""Training throughput: steplab Step-1 vs transformers' LlamaForCausalLM at the identical configuration.

    python bench/train_throughput.py [--d-model 512 --layers 8 --heads 8 --vocab 8192 --seq 256 --batch 16]
                                     [--dtype bf16|fp32] [--threads 2] [--rounds 5] [--no-compile]

One process, same threads, same random batches, the same fused AdamW for every contender. Each round times a forward + backward + AdamW step of
every contender (interleaved, so background load hits all alike); the best round of each is reported, plus
the median of the per-round ratios. MFU divides model FLOPs/token x tokens/s by the bf16 (or fp32) matmul
peak measured in this same run (2048^3 matmul). Default shape: ~25.7M N (step1-mini).

The roofline (printed after the table): the step's own matmuls, each timed alone at its exact shape (every
nn.Linear's forward GEMM and its two backward GEMMs, and the attention forward + backward through SDPA), best
of ``--rounds``. Their sum is the time the step would take if it did nothing but those matmuls at the rate this
CPU reaches on those shapes: step time / roofline says how much goes to everything else (norms, RoPE, SiLU,
the loss, the optimizer, framework overhead), and roofline FLOP/s / peak how far the shapes themselves are from
the 2048^3 peak.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from steplab.config import ModelConfig
from steplab.export.hf import llama_config_dict, to_hf_state_dict
from steplab.models import count_params, flops_per_token
from steplab.models.dense import Step1
from steplab.train.metrics import measure_matmul_flops


def make_step(model, loss_fn, dtype, fused: bool):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)

    def step(x, y):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss = loss_fn(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def _best(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def roofline(model, cfg: ModelConfig, x: torch.Tensor, dtype: str, repeats: int) -> list[tuple[str, float, float]]:
    """(name, FLOPs, best seconds) of every matmul in one training step of ``model`` on batch ``x``, at its shape."""
    shapes: list[tuple[str, int, int, int]] = []
    hooks = [m.register_forward_hook(lambda m, i, o, name=name: shapes.append((name, i[0].numel() // i[0].shape[-1],
                                                                               m.in_features, m.out_features)))
             for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    out = []
    for name, M, K, N in shapes:  # forward x W^T, backward dX = dY W and dW = dY^T x: three GEMMs of 2 M K N
        a, w, g = torch.randn(M, K, dtype=dt), torch.randn(N, K, dtype=dt), torch.randn(M, N, dtype=dt)
        secs = (_best(lambda: a @ w.t(), repeats) + _best(lambda: g @ w, repeats) + _best(lambda: g.t() @ a, repeats))
        out.append((name.rsplit(".", 1)[-1] if "layers" in name else name, 6 * M * K * N, secs))
    B, T = x.shape
    hd, kv = cfg.d_model // cfg.n_head, cfg.n_kv_head or cfg.n_head
    # attention runs in the dtype the model's rule picks under autocast (steplab.models.common.upcast_attention)
    from steplab.models.common import FP32_ATTENTION_MAX_HEAD_DIM
    adt = torch.float32 if dtype == "fp32" or hd <= FP32_ATTENTION_MAX_HEAD_DIM else torch.bfloat16
    q = torch.randn(B, cfg.n_head, T, hd, dtype=adt, requires_grad=True)
    k, v = (torch.randn(B, kv, T, hd, dtype=adt, requires_grad=True) for _ in range(2))

    def attn():
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kv != cfg.n_head)
        y.backward(torch.ones_like(y))

    # causal: half of QK^T and PV; backward twice the forward
    out += [("attention (SDPA fwd+bwd)", cfg.n_layer * 3 * 2 * 2 * B * cfg.n_head * T * T * hd // 2, cfg.n_layer * _best(attn, repeats))]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=0)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--no-roofline", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    cfg = ModelConfig(vocab_size=args.vocab, d_model=args.d_model, n_layer=args.layers, n_head=args.heads,
                      n_kv_head=args.kv_heads, max_seq_len=args.seq)
    torch.manual_seed(0)
    ours = Step1(cfg)
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in llama_config_dict(cfg).items() if k not in ("architectures", "model_type")})
    hf = transformers.LlamaForCausalLM(hf_cfg)
    hf.load_state_dict(to_hf_state_dict(ours.state_dict(), cfg))
    hf.config._attn_implementation = "sdpa"

    contenders = {
        "transformers Llama (eager)": make_step(hf, lambda x, y: hf(input_ids=x, labels=y).loss, args.dtype, fused=True),
        "steplab Step-1 (eager)": make_step(ours, lambda x, y: ours(x, y), args.dtype, fused=True),
    }
    if not args.no_compile:
        # Both compiled the same way (default torch.compile of the module that computes the loss), so the
        # compiled pair is as like-for-like as the eager pair.
        ours_c = Step1(cfg)
        ours_c.load_state_dict(ours.state_dict())
        compiled = torch.compile(ours_c)
        contenders["steplab Step-1 (torch.compile)"] = make_step(ours_c, lambda x, y: compiled(x, y), args.dtype, fused=True)
        hf_c = transformers.LlamaForCausalLM(hf_cfg)
        hf_c.load_state_dict(hf.state_dict())
        hf_c.config._attn_implementation = "sdpa"
        hf_compiled = torch.compile(hf_c)
        contenders["transformers Llama (torch.compile)"] = make_step(
            hf_c, lambda x, y: hf_compiled(input_ids=x, labels=y).loss, args.dtype, fused=True)

    x = torch.randint(0, args.vocab, (args.batch, args.seq))
    y = torch.randint(0, args.vocab, (args.batch, args.seq))
    t0 = time.perf_counter()
    for step in contenders.values():  # warm-up (and compile)
        step(x, y)
        step(x, y)
    print(f"warm-up/compile {time.perf_counter() - t0:.1f} s")
    times: dict[str, list[float]] = {name: [] for name in contenders}
    peak = 0.0
    for _ in range(args.rounds):
        for name, step in contenders.items():
            t = time.perf_counter()
            step(x, y)
            times[name].append(time.perf_counter() - t)
        # The peak is measured between rounds too, so background load cannot flatter MFU.
        peak = max(peak, measure_matmul_flops("cpu", torch.bfloat16 if args.dtype == "bf16" else torch.float32, repeats=3))

    tokens = args.batch * args.seq
    flops = flops_per_token(cfg, args.seq)["model"]
    base = "transformers Llama (eager)"
    print(f"\nN = {count_params(cfg)['N']:,} (non-embedding), vocab {args.vocab}, batch {args.batch} x {args.seq}, {args.dtype}, "
          f"{args.threads} threads, torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"measured {args.dtype} matmul peak: {peak / 1e9:,.0f} GFLOP/s\n")
    print("| contender | tokens/s | vs transformers eager (median of rounds) | GFLOP/s | MFU |")
    print("|---|---:|---:|---:|---:|")
    for name, ts in times.items():
        tok_s = tokens / min(ts)
        ratio = statistics.median(b / t for b, t in zip(times[base], ts))
        print(f"| {name} | {tok_s:,.0f} | {ratio:.2f}x | {flops * tok_s / 1e9:,.0f} | {flops * tok_s / peak:.1%} |")
    # Like for like: each of ours against the transformers contender run the same way (median of per-round ratios)
    pairs = [("eager vs eager", "steplab Step-1 (eager)", base)]
    if not args.no_compile:
        pairs.append(("compiled vs compiled", "steplab Step-1 (torch.compile)", "transformers Llama (torch.compile)"))
    print()
    for label, a, b in pairs:
        ratio = statistics.median(tb / ta for ta, tb in zip(times[a], times[b]))
        print(f"steplab / transformers, {label}: {ratio:.2f}x (median of {args.rounds} per-round ratios)")
    if not args.no_roofline:
        rows = roofline(ours, cfg, x, args.dtype, repeats=args.rounds)
        flops_r, secs_r = sum(r[1] for r in rows), sum(r[2] for r in rows)
        per: dict[str, list[float]] = {}
        for name, f, s in rows:
            per.setdefault(name, [0.0, 0.0])
            per[name][0] += f
            per[name][1] += s
        print("\nroofline: the step's own matmuls, each timed alone at its shape (forward + both backward GEMMs)")
        print("| matmul | GFLOP per step | ms at its shape | GFLOP/s | of the peak |")
        print("|---|---:|---:|---:|---:|")
        for name, (f, s) in per.items():
            print(f"| {name} | {f / 1e9:.2f} | {s * 1e3:.1f} | {f / s / 1e9:,.0f} | {f / s / peak:.1%} |")
        print(f"| **all** | {flops_r / 1e9:.2f} | {secs_r * 1e3:.1f} | {flops_r / secs_r / 1e9:,.0f} | {flops_r / secs_r / peak:.1%} |")
        for name, ts in times.items():
            if name.startswith("steplab"):
                print(f"{name}: step {min(ts) * 1e3:.1f} ms = {min(ts) / secs_r:.2f}x the roofline "
                      f"({secs_r / min(ts):.0%} of the step is the matmuls at their shapes' rate)")


if __name__ == "__main__":
    main()
