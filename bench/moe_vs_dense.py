"""Step-2 (MoE) against Step-1 (dense) on this CPU, bf16 autocast. Prints a Markdown table.

1. Quality at equal active compute: step2-SIZE (8 routed experts, top-2, 1 shared) and step1-SIZE (the same
   active N, so the same 6 N_a D) trained through the real trainer on the same real text, same tokens, same
   hyper-parameters; final validation loss of each and the wall-clock per token ratio MoE/dense.
1b. Quality where capacity, not data, limits the model ("rich"): dense vs MoE pairs in the quickstart's shape
   family (2 layers, vocab 1024, the whole stdlib) at 2M tokens (9-19 tokens per active parameter), several
   seeds, trained through ``steplab.law.sweep`` (2 workers x 1 thread).
2. Step time, interleaved (fwd + bwd + AdamW, one step of each model in turn, median of rounds), because the
   training runs above are sequential and this machine is shared.
3. The MoE layer alone, forward + backward, identical config everywhere: ours (grouped ``_grouped_mm``), ours
   with the per-expert slice loop fallback, a naive masked loop (every expert on every token, zero-weighted
   where not routed), a per-expert gather loop (HF "eager" style with our weights), transformers'
   ``Qwen2MoeSparseMoeBlock`` (eager and grouped_mm experts implementations), and a dense SwiGLU with the
   same active FLOPs as a floor.
4. Peak memory of a training step (peak RSS, VmHWM, over the process baseline, each model in its own subprocess):
   MoE vs a dense model with the same TOTAL N (d_ff = (E + n_shared) * d_expert) and vs step1-SIZE.

    python bench/moe_vs_dense.py --quick          # ~2 min smoke run
    python bench/moe_vs_dense.py --size micro --steps 200 --seeds 3 --threads 2 --parts train step layer memory
    python bench/moe_vs_dense.py --parts rich     # ~10 min: the tokens-rich pairs (docs/benchmarks.md)

Data: the Python stdlib corpus (``prepare_data("stdlib", max_bytes=8e6)``, ~2.1M train tokens, so the full run
sees each token at most once); ``--data PATH`` uses a file or folder instead (e.g.
/work/shared/data/tinystories, only ~0.2M tokens: the models would see it several times).
"""
from __future__ import annotations

import argparse
import json
import statistics
from statistics import mean
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from steplab.config import ModelConfig, preset, resolve  # noqa: E402
from steplab.models import build_model, count_params  # noqa: E402
from steplab.models.common import SwiGLU  # noqa: E402
import steplab.models.moe as moe_mod  # noqa: E402
from steplab.models.moe import MoE  # noqa: E402

SEQ, BATCH = 256, 16


# ---- helpers ----------------------------------------------------------------------------------------------

def interleaved(fns: dict, rounds: int, warmup: int = 1) -> dict[str, dict[str, float]]:
    """Run each fn once per round, in turn (so machine load hits all alike); median and min seconds."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: {"median": statistics.median(ts), "min": min(ts)} for name, ts in times.items()}


def dense_same_total(cfg: ModelConfig) -> ModelConfig:
    """A dense Step-1 shape with the MoE's total N: the same blocks, d_ff = (E + n_shared) * d_expert."""
    m = cfg.moe
    return ModelConfig(vocab_size=cfg.vocab_size, d_model=cfg.d_model, n_layer=cfg.n_layer, n_head=cfg.n_head,
                       max_seq_len=cfg.max_seq_len, d_ff=(m.n_experts + m.n_shared) * (m.d_expert or cfg.d_ff))


def prepare(data: str | None, cache: Path) -> Path:
    from steplab.data.prepare import prepare_data

    if data is None:
        out = cache / "stdlib_8mb_v4096"
        if not (out / "meta.json").exists():
            prepare_data("stdlib", out, vocab_size=4096, max_bytes=8_000_000, progress=False)
    else:
        out = cache / ("custom_" + Path(data).name)
        if not (out / "meta.json").exists():
            prepare_data(data, out, vocab_size=4096, progress=False)
    return out


# ---- 1. quality and wall clock through the trainer --------------------------------------------------------

def train_pair(size: str, data: Path, steps: int, threads: int, seeds: int, work: Path) -> dict[str, dict]:
    """Train step1-SIZE and step2-SIZE with the same data, tokens and hyper-parameters, for each seed."""
    from steplab.train.metrics import read_jsonl
    from steplab.train.trainer import train

    out = {}
    for seed in range(seeds):
        for name in (f"step1-{size}", f"step2-{size}"):
            cfg = resolve(name, overrides=[
                f"data.path={data}", f"data.seq_len={SEQ}", f"train.batch_size={BATCH}", f"train.max_steps={steps}",
                f"train.warmup_steps={max(1, steps // 20)}", f"train.eval_every={steps}", "train.eval_batches=40",
                f"train.ckpt_every={steps}", "train.dtype=bf16", f"train.threads={threads}", "train.lr=3e-3", f"train.seed={seed}"])
            s = train(cfg, work / f"{name}-seed{seed}", progress=False)
            last = read_jsonl(work / f"{name}-seed{seed}" / "metrics.jsonl")[-1]
            run = out.setdefault(name, {"N": s["N"], "N_active": s["N_active"], "D": s["D"], "val_loss": [], "val_bpb": [],
                                        "tok_per_s": [], "moe_stats": []})
            run["val_loss"].append(s["val_loss"])
            run["val_bpb"].append(s["val_bpb"])
            run["tok_per_s"].append(s["tok_per_s"])
            run["moe_stats"].append({k: v for k, v in last.items() if k.startswith("moe")})
            print(f"  trained {name} (seed {seed}): val_loss {s['val_loss']:.4f}, {s['tok_per_s']:,.0f} tok/s", flush=True)
    return out


# ---- 1b. quality with many tokens per parameter, through the lab's own sweep runner ---------------------------

def rich_pairs(widths: list[int], tokens: float, seeds: int, workers: int, cache: Path, work: Path) -> dict[int, dict]:
    """Dense vs MoE where capacity, not data, limits the model: the quickstart's shape family (2 layers, 2 heads,
    vocab 1024, the whole stdlib: ~4.3M train tokens, no repeats) at D = ``tokens`` (9-19 tokens per active
    parameter at widths 128-64). The MoE has 8 routed experts (top-2) + 1 shared of d_expert = d_ff / 3, so its
    active N equals the dense N up to the router. Both train with the dense model's lr (the quickstart's rule)
    and Step Law's batch, annealed to 0, through ``steplab.law.sweep`` (resumable; ``workers`` x 1 thread)."""
    from steplab.data.prepare import prepare_data
    from steplab.law.hparams import suggest
    from steplab.law.grid import hparam_coefs
    from steplab.law.sweep import run_sweep
    from steplab.quickstart import CORPUS_BYTES, FAMILY, HPARAMS, SEQ_LEN, VOCAB_SIZE, moe_sizes

    data = cache / f"stdlib_full_v{VOCAB_SIZE}"
    if not (data / "meta.json").exists():
        prepare_data("stdlib", data, vocab_size=VOCAB_SIZE, max_bytes=CORPUS_BYTES, progress=False)
    out = {}
    for d in widths:
        dense = {"d_model": d, **FAMILY, "name": f"dense-d{d}"}
        moe = {**moe_sizes([dense])[0], "name": f"moe-d{d}"}
        N = count_params(ModelConfig(vocab_size=VOCAB_SIZE, d_model=d, n_layer=FAMILY["n_layer"], n_head=FAMILY["n_head"]))["N"]
        lr = suggest(N, tokens, SEQ_LEN, hparam_coefs({"hparams": HPARAMS}))["lr"]
        grid = {"sizes": [dense, moe], "tokens": [tokens], "lr": [lr], "batch_tokens": ["steplaw"],
                "seeds": list(range(seeds)), "eval_tokens": 131072, "warmup_fraction": 0.05,
                "fixed": {"data": {"seq_len": SEQ_LEN}, "model": {"max_seq_len": SEQ_LEN}, "train": {"min_lr_ratio": 0.0}}}
        table = run_sweep(grid, work / f"d{d}", data_path=str(data), workers=workers, threads=1, progress=False)
        rows = [json.loads(line) for line in table.with_suffix(".jsonl").read_text().splitlines() if line.strip()]
        for name in ("dense", "moe"):
            mine = sorted((r for r in rows if r["size"] == f"{name}-d{d}"), key=lambda r: r["seed"])
            out.setdefault(d, {})[name] = {"N": mine[0]["N"], "N_active": mine[0]["N_active"], "D": mine[0]["D"],
                                           "lr": lr, "batch_tokens": mine[0]["batch_tokens"],
                                           "val_loss": [r["val_loss"] for r in mine],
                                           "tok_per_s": [r["tok_per_s"] for r in mine]}
        dl, ml = out[d]["dense"]["val_loss"], out[d]["moe"]["val_loss"]
        print(f"  d_model {d}: dense " + ", ".join(f"{v:.4f}" for v in dl) + " | MoE " + ", ".join(f"{v:.4f}" for v in ml),
              flush=True)
    return out


# ---- 2. interleaved step time -----------------------------------------------------------------------------

def step_times(size: str, data: Path, rounds: int) -> dict[str, dict[str, float]]:
    """One training step of each model in turn, on the same sequence of real batches."""
    from steplab.data.loader import TokenLoader
    from steplab.data.prepare import load_prepared
    from steplab.train.optim import build_optimizer

    tokenizer, train_shards, _, _ = load_prepared(data)
    tc = preset(f"step1-{size}").train
    fns = {}
    for name in (f"step1-{size}", f"step2-{size}"):
        cfg = preset(name).model
        cfg.vocab_size = tokenizer.vocab_size
        torch.manual_seed(0)
        model = build_model(cfg).train()
        opt = build_optimizer(model, tc, "cpu")
        loader = TokenLoader(train_shards, SEQ, BATCH, seed=0)

        def step(model=model, opt=opt, loader=loader):
            x, y = loader.next_batch()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if hasattr(model, "after_optimizer_step"):
                model.after_optimizer_step()

        fns[name] = step
    return interleaved(fns, rounds, warmup=3)


# ---- 3. the MoE layer alone -------------------------------------------------------------------------------

def naive_masked(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Every expert on every token; the output weighted by the gate, which is 0 where the token was not routed."""
    flat = x.reshape(-1, x.shape[-1])
    idx, gates, _, _ = moe.route(flat)
    weight = torch.zeros(flat.shape[0], moe.n_experts).scatter(1, idx, gates)
    dt = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else flat.dtype
    h = flat.to(dt)
    y = moe.shared(h)
    for e in range(moe.n_experts):
        gate, up = (h @ moe.w13.weight[e].to(dt)).chunk(2, dim=-1)
        y = y + weight[:, e:e + 1].to(dt) * ((F.silu(gate) * up) @ moe.w2.weight[e].to(dt))
    return y.view_as(x)


def gather_loop(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Per expert: find its tokens (torch.where), gather, SwiGLU, scale, index_add back (HF eager style)."""
    flat = x.reshape(-1, x.shape[-1])
    idx, gates, _, _ = moe.route(flat)
    dt = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else flat.dtype
    h = flat.to(dt)
    y = moe.shared(h)
    for e in range(moe.n_experts):
        token, slot = torch.where(idx == e)
        gate, up = (h[token] @ moe.w13.weight[e].to(dt)).chunk(2, dim=-1)
        out = ((F.silu(gate) * up) @ moe.w2.weight[e].to(dt)) * gates[token, slot, None].to(dt)
        y = y.index_add(0, token, out)
    return y.view_as(x)


def hf_block(moe: MoE, impl: str):
    """transformers' Qwen2-MoE block with our weights; its shared-expert gate is 0 -> x0.5, so we halve our w2."""
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    d, de = moe.router.weight.shape[1], moe.d_expert
    cfg = Qwen2MoeConfig(hidden_size=d, num_experts=moe.n_experts, num_experts_per_tok=moe.top_k, moe_intermediate_size=de,
                         shared_expert_intermediate_size=de, norm_topk_prob=True, hidden_act="silu")
    cfg._experts_implementation = impl
    block = Qwen2MoeSparseMoeBlock(cfg)
    with torch.no_grad():
        block.gate.weight.copy_(moe.router.weight)
        block.experts.gate_up_proj.copy_(moe.w13.weight.transpose(1, 2))
        block.experts.down_proj.copy_(moe.w2.weight.transpose(1, 2))
        block.shared_expert.gate_proj.weight.copy_(moe.shared.w13.weight[:de])
        block.shared_expert.up_proj.weight.copy_(moe.shared.w13.weight[de:])
        block.shared_expert.down_proj.weight.copy_(2 * moe.shared.w2.weight)
        block.shared_expert_gate.weight.zero_()
    return block


def layer_bench(d: int, de: int, n_experts: int, top_k: int, rounds: int) -> dict:
    cfg = ModelConfig(d_model=d, n_head=max(1, d // 64))
    for k, v in dict(n_experts=n_experts, top_k=top_k, n_shared=1, d_expert=de, score="softmax").items():
        setattr(cfg.moe, k, v)
    torch.manual_seed(0)
    moe = MoE(cfg).train()
    for p in moe.parameters():
        torch.nn.init.normal_(p, 0.0, 0.02)
    dense = SwiGLU(d, (top_k + 1) * de)  # top-k + 1 shared: the same active FLOPs
    x = torch.randn(BATCH, SEQ, d)
    grad = torch.randn(BATCH, SEQ, d)

    # Correctness first: all variants give our layer's output (fp32).
    with torch.no_grad():
        ref = moe(x)
        checks = {"naive masked": naive_masked(moe, x), "gather loop": gather_loop(moe, x),
                  "HF Qwen2-MoE": hf_block(moe, "eager")(x)}
    max_diff = {k: (v - ref).abs().max().item() for k, v in checks.items()}
    hf_eager, hf_grouped = hf_block(moe, "eager"), hf_block(moe, "grouped_mm")

    # Each variant gets its own stream of fresh inputs, so routing (and the per-expert matrix shapes) changes
    # every call as in training, and no variant reuses GEMM kernels another variant's shapes made oneDNN build.
    def fwd_bwd(fn, params, seed):
        gen = torch.Generator().manual_seed(seed)
        inputs = iter([torch.randn(BATCH, SEQ, d, generator=gen) for _ in range(rounds + 2)])  # made before timing

        def run():
            for p in params:
                p.grad = None
            xi = next(inputs).requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = fn(xi)
            y.float().backward(grad)
        return run

    def slice_loop(v):
        with _fallback():
            return moe(v)

    variants = {
        "steplab grouped_mm (ours)": (moe, list(moe.parameters())),
        "steplab slice loop (fallback)": (slice_loop, list(moe.parameters())),
        "naive masked loop": (lambda v: naive_masked(moe, v), list(moe.parameters())),
        "per-expert gather loop": (lambda v: gather_loop(moe, v), list(moe.parameters())),
        "transformers Qwen2MoE eager": (hf_eager, list(hf_eager.parameters())),
        "transformers Qwen2MoE grouped_mm": (hf_grouped, list(hf_grouped.parameters())),
        "dense SwiGLU, same active FLOPs": (dense, list(dense.parameters())),
    }
    runs = {name: fwd_bwd(fn, params, seed) for seed, (name, (fn, params)) in enumerate(variants.items())}
    return {"d_model": d, "d_expert": de, "n_experts": n_experts, "top_k": top_k,
            "times": interleaved(runs, rounds, warmup=2), "max_abs_diff_fp32": max_diff}


class _fallback:
    def __enter__(self):
        self.saved = moe_mod.grouped_mm_works
        moe_mod.grouped_mm_works = lambda device_type, dtype: False

    def __exit__(self, *exc):
        moe_mod.grouped_mm_works = self.saved


# ---- 4. peak memory, one subprocess per model ---------------------------------------------------------------

def proc_status_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process in MiB. VmHWM, unlike getrusage's ru_maxrss, starts afresh
    in an exec'd child instead of inheriting the parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_probe(cfg_json: str, threads: int) -> None:
    """Child process: baseline RSS, then a few bf16 training steps; prints peak-over-baseline as JSON."""
    from steplab.train.optim import build_optimizer

    torch.set_num_threads(threads)
    cfg = ModelConfig(**{k: v for k, v in json.loads(cfg_json).items() if k != "moe"})
    for k, v in json.loads(cfg_json).get("moe", {}).items():
        setattr(cfg.moe, k, v)
    x = torch.randint(0, cfg.vocab_size, (BATCH, SEQ))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # warm up the allocator and kernels on a tiny op
        torch.ones(8, 8) @ torch.ones(8, 8)
    base = proc_status_mb("VmRSS")
    model = build_model(cfg).train()
    opt = build_optimizer(model, preset("step1-nano").train, "cpu")
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    peak = proc_status_mb("VmHWM")
    print(json.dumps({"base_mb": base, "peak_mb": peak, "delta_mb": peak - base, "params": sum(p.numel() for p in model.parameters())}))


def memory(size: str, vocab: int, threads: int) -> dict[str, dict]:
    moe_cfg = preset(f"step2-{size}").model
    moe_cfg.vocab_size = vocab
    dense_cfg = preset(f"step1-{size}").model
    dense_cfg.vocab_size = vocab
    configs = {f"step2-{size} (MoE)": moe_cfg, "dense, same total N": dense_same_total(moe_cfg), f"step1-{size} (same active N)": dense_cfg}
    out = {}
    for name, cfg in configs.items():
        import dataclasses

        spec = json.dumps(dataclasses.asdict(cfg))
        res = subprocess.run([sys.executable, __file__, "--memory-probe", spec, "--threads", str(threads)],
                             capture_output=True, text=True, check=True)
        out[name] = {**json.loads(res.stdout.strip().splitlines()[-1]), **{k: v for k, v in count_params(cfg).items() if k in ("N", "N_active")}}
    return out


# ---- report -----------------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short run: fewer steps and rounds (a smoke test, not a result)")
    ap.add_argument("--size", default="nano", choices=["nano", "micro", "mini"], help="preset size for training and memory")
    ap.add_argument("--steps", type=int, default=0, help="training steps per model (default 400, quick 30)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: on a shared machine a busy core makes "
                    "2-thread OpenMP several times slower; use 2 on an idle 2-core machine)")
    ap.add_argument("--seeds", type=int, default=1, help="train each model with this many seeds (~9 min per seed at nano)")
    ap.add_argument("--data", default=None, help="a text file/folder instead of the stdlib corpus")
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "steplab_bench"), help="prepared data lives here")
    ap.add_argument("--json", default=None, help="also write the raw results here")
    ap.add_argument("--parts", nargs="+", default=["train", "rich", "step", "layer", "memory"],
                    choices=["train", "rich", "step", "layer", "memory"], help="which parts to run (default: all)")
    ap.add_argument("--rich-widths", nargs="+", type=int, default=[64, 128], help="d_model of the tokens-rich pairs")
    ap.add_argument("--rich-tokens", type=float, default=2e6, help="tokens per tokens-rich run (quick: 1e5)")
    ap.add_argument("--rich-seeds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2, help="parallel runs in the tokens-rich sweep (1 thread each)")
    ap.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_probe:
        return memory_probe(args.memory_probe, args.threads)
    torch.set_num_threads(args.threads)
    steps = args.steps or (30 if args.quick else 400)
    rounds = 3 if args.quick else 9
    results = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "threads": args.threads, "steps": steps,
               "torch": torch.__version__, "grouped_mm_cpu_bf16": moe_mod.grouped_mm_works("cpu", torch.bfloat16),
               "grouped_mm_cpu_fp32": moe_mod.grouped_mm_works("cpu", torch.float32)}
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    if args.data is None:
        ts = Path("/work/shared/data/tinystories")
        note = "present but only ~0.2M tokens" if ts.exists() else "missing"
        print(f"data: Python stdlib corpus, 8 MB (tinystories at {ts}: {note}; pass --data to use it)", flush=True)
    data = prepare(args.data, cache)
    meta = json.loads((data / "meta.json").read_text())
    results["data"] = {"source": args.data or "stdlib (8 MB)", "train_tokens": meta["train"]["tokens"], "vocab": 4096}

    if "train" in args.parts:
        print(f"training step1-{args.size} and step2-{args.size} ...", flush=True)
        with tempfile.TemporaryDirectory(dir=cache) as work:
            results["train"] = train_pair(args.size, data, steps, args.threads, args.seeds, Path(work))
    if "rich" in args.parts:
        print("tokens-rich pairs through law sweep ...", flush=True)
        widths, tokens = ([32], 1e5) if args.quick else (args.rich_widths, args.rich_tokens)
        results["rich"] = rich_pairs(widths, tokens, 1 if args.quick else args.rich_seeds, args.workers, cache,
                                     cache / f"rich_{int(tokens)}")
    if "step" in args.parts:
        print("interleaved step times ...", flush=True)
        results["step"] = step_times(args.size, data, rounds)
    if "layer" in args.parts:
        print("MoE layer alone ...", flush=True)
        # (d_model, d_expert, routed experts, top-k): the step2-nano and step2-mini layouts (8 experts, top-2),
        # and a fine-grained one in Step-3's proportions (48 routed, top-3, 1 shared; references.md)
        shapes = [(128, 128, 8, 2)] if args.quick else [(128, 128, 8, 2), (512, 464, 8, 2), (512, 128, 48, 3)]
        results["layer"] = [layer_bench(*shape, rounds) for shape in shapes]
    if "memory" in args.parts:
        print("peak memory ...", flush=True)
        results["memory"] = memory(args.size, 4096, args.threads)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print(render(results, args.size))


def render(r: dict, size: str) -> str:
    lines = [f"`{r['command']}`  (torch {r['torch']}, {r['threads']} threads, bf16 autocast; "
             f"torch._grouped_mm on CPU: bf16 {r['grouped_mm_cpu_bf16']}, fp32 {r['grouped_mm_cpu_fp32']})", ""]
    if "train" in r:
        d = r["train"][f"step1-{size}"]
        lines += [f"**Training, equal active N and tokens** ({r['data']['source']}, {r['data']['train_tokens']:,} train "
                  f"tokens, D = {d['D']:,} = {r['steps']} steps x {BATCH} x {SEQ}; {len(d['val_loss'])} seed(s): mean, "
                  "and each)", "", "| model | N total | N active | val loss | val bpb | tok/s (trainer) |",
                  "|---|---|---|---|---|---|"]
        for name, x in r["train"].items():
            each = ", ".join(f"{v:.4f}" for v in x["val_loss"])
            lines.append(f"| {name} | {x['N']:,} | {x['N_active']:,} | {mean(x['val_loss']):.4f} ({each}) | "
                         f"{mean(x['val_bpb']):.4f} | {mean(x['tok_per_s']):,.0f} |")
        s = r["train"][f"step2-{size}"]
        lines += ["", f"Wall-clock per token MoE/dense (trainer runs): {mean(d['tok_per_s']) / mean(s['tok_per_s']):.2f}x. "
                  "Router stats at the end (seed 0): " + ", ".join(
                      f"{k} {v:.3g}" for k, v in s["moe_stats"][0].items() if k.endswith(("load_max_mean", "entropy"))), ""]
    if "rich" in r:
        lines += ["**Tokens-rich pairs** (2 layers, vocab 1024, the whole stdlib; same lr and batch for both; "
                  "through `law sweep`, 1 thread per run)", "",
                  "| d_model | model | N total | N active | D | lr | val loss per seed | mean | MoE - dense | tok/s |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for width, pair in r["rich"].items():
            for name in ("dense", "moe"):
                x = pair[name]
                gap = mean(x["val_loss"]) - mean(pair["dense"]["val_loss"])
                lines.append(f"| {width} | {name} | {x['N']:,} | {x['N_active']:,} | {x['D']:,} | {x['lr']:.3g} | "
                             + ", ".join(f"{v:.4f}" for v in x["val_loss"]) + f" | {mean(x['val_loss']):.4f} | "
                             + (f"{gap:+.4f}" if name == "moe" else "") + f" | {mean(x['tok_per_s']):,.0f} |")
        lines.append("")
    if "step" in r:
        step1, step2 = r["step"][f"step1-{size}"], r["step"][f"step2-{size}"]
        lines += [f"Interleaved training steps, MoE/dense: {step2['median'] / step1['median']:.2f}x (median of "
                  f"{step1['median'] * 1e3:.0f} vs {step2['median'] * 1e3:.0f} ms; min {step2['min'] / step1['min']:.2f}x).", ""]
    for layer in r.get("layer", []):
        t = layer["times"]
        ours = t["steplab grouped_mm (ours)"]["median"]
        lines += [f"**MoE layer fwd+bwd** (d_model {layer['d_model']}, {layer['n_experts']} experts of {layer['d_expert']}, "
                  f"top-{layer['top_k']}, 1 shared; {BATCH}x{SEQ} tokens, bf16; max |diff| vs ours in fp32: "
                  + ", ".join(f"{k} {v:.1e}" for k, v in layer["max_abs_diff_fp32"].items()) + ")", "",
                  "| implementation | median ms | tokens/s | ours is faster by |", "|---|---|---|---|"]
        for name, x in t.items():
            lines.append(f"| {name} | {x['median'] * 1e3:.1f} | {BATCH * SEQ / x['median']:,.0f} | {x['median'] / ours:.2f}x |")
        lines.append("")
    if "memory" in r:
        m = r["memory"]
        moe_name = f"step2-{size} (MoE)"
        lines += ["**Peak memory of a training step** (peak RSS over the process baseline; separate processes)", "",
                  "| model | N total | N active | peak RSS MB | over baseline MB | MoE / this |", "|---|---|---|---|---|---|"]
        for name, x in m.items():
            lines.append(f"| {name} | {x['N']:,} | {x['N_active']:,} | {x['peak_mb']:.0f} | {x['delta_mb']:.0f} | "
                         f"{m[moe_name]['delta_mb'] / x['delta_mb']:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
