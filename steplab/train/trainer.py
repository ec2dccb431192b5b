"""The training loop: one function, ``train(cfg, run_dir)``, that a CLI verb, a sweep or a test calls.

What makes resume exact: the model is initialised from the seed; the data loader's position, the optimizer
state and the RNG are in every checkpoint; the metrics log is cut back to the checkpoint's step on resume.
On CPU the same ops in the same order give the same bits, so an interrupted-and-resumed run reproduces the
loss sequence of an uninterrupted one exactly.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from steplab.config import RunConfig, config_fields
from steplab.errors import ConfigError, StepLabError
from steplab.eval.evaluate import autocast_context
from steplab.models import build_model, count_params, flops_per_token
from steplab.train.distributed import (barrier, grad_sync, init_distributed, mean_across_ranks, sync_step_stats,
                                       uses_autocast, wrap_model)
from steplab.train.compile import resolve_compile
from steplab.train.precision import resolve_dtype
from steplab.train.checkpoint import latest_checkpoint, load_checkpoint, load_weights, save_checkpoint
from steplab.train.data import build_train_data, evaluate_run
from steplab.train.metrics import MetricsLog, peak_flops, plot_loss_curve, read_jsonl
from steplab.train.optim import build_optimizer, lr_at
from steplab.utils import atomic_write_json, atomic_write_text


class TrainingError(StepLabError):
    pass


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is visible; use train.device=auto or cpu")
    return name


# Fields that change how a run is logged, checkpointed or spread over processes, never what it computes: a resume
# may change them (DCP checkpoints reshard, so a 2-process FSDP run resumes in one process and back).
RESUME_SAFE = {"train.log_every", "train.eval_every", "train.eval_batches", "train.ckpt_every", "train.keep_last",
               "train.tensorboard", "train.parallel"}


def config_changes(saved: RunConfig, cfg: RunConfig) -> dict[str, list]:
    """{dotted field: [saved value, new value]} for every field that differs, except ``RESUME_SAFE`` ones."""
    old, new = dict(config_fields(saved)), dict(config_fields(cfg))
    return {k: [old[k], new[k]] for k in new if old.get(k) != new[k] and k not in RESUME_SAFE}


def prepare_run_dir(cfg: RunConfig, run_dir: Path, tokenizer_dir: Path | None, resume: bool,
                    allow_config_change: bool = False) -> dict[str, list]:
    """Write config.json and a copy of the tokenizer; refuse to clobber another run.

    On resume, any change to a field that affects the computation breaks exact resume, so it is refused with
    the changed fields named, unless ``allow_config_change``; the model config can never change (the
    checkpoint's weights are that model). Returns the changes accepted (empty when none).
    """
    config_path = run_dir / "config.json"
    changes: dict[str, list] = {}
    if config_path.exists():
        if not resume:
            raise ConfigError(f"run directory {run_dir} already holds a run; pass --resume to continue it or choose another --out")
        saved = RunConfig.from_dict(json.loads(config_path.read_text()))
        changes = config_changes(saved, cfg)
        listed = ", ".join(f"{k} ({a!r} -> {b!r})" for k, (a, b) in changes.items())
        model = [k for k in changes if k.startswith("model.")]
        if model:
            raise ConfigError(f"--resume cannot change the model ({listed}); start a new run from this one with "
                              f"--set train.init_from={run_dir}")
        if changes and not allow_config_change:
            raise ConfigError(f"--resume with a config that differs from {config_path} in {listed}, which breaks exact "
                              f"resume; drop the change, pass --allow-config-change to resume anyway (recorded in "
                              f"metrics.jsonl and report.md), or branch a new run with --set train.init_from={run_dir}")
    elif run_dir.exists() and any(run_dir.iterdir()) and not resume:
        raise ConfigError(f"output directory {run_dir} exists and is not empty; choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(config_path, cfg.to_dict())
    if tokenizer_dir is not None and not (run_dir / "tokenizer").exists():
        tmp = run_dir / ".tokenizer.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(tokenizer_dir, tmp)
        tmp.rename(run_dir / "tokenizer")
    return changes


def init_checkpoint(source: Path) -> Path:
    """The checkpoint ``train.init_from`` names: a checkpoint directory itself, or a run directory's latest."""
    if (source / "state.json").is_file():
        return source
    init_ckpt = latest_checkpoint(source)
    if init_ckpt is None:
        raise ConfigError(f"train.init_from={source} has no checkpoint; pass a run directory (e.g. made by `steplab import hf`) "
                          "or one of its checkpoints/step_* directories")
    return init_ckpt


def ckpt_steps(tc) -> set[int]:
    try:
        return {int(s) for s in tc.ckpt_at.replace(" ", "").split(",") if s}
    except ValueError:
        raise ConfigError(f"train.ckpt_at={tc.ckpt_at!r}: give comma-separated step numbers, e.g. \"80,160\"") from None


def check_same_tokenizer(tokenizer_dir: Path | None, source: Path, data_path: str) -> None:
    """Weights learned with one tokenizer mean nothing under another: the dataset's tokenizer must be the
    one ``init_from``'s run (or import) was made with."""
    from steplab.data.tokenizer import Tokenizer

    if tokenizer_dir is None:  # a family without a token vocabulary
        return
    if (source / "state.json").is_file():  # a checkpoints/step_* directory: its run is two levels up
        source = source.parent.parent
    theirs = source / "tokenizer"
    if not (theirs / "tokenizer.json").is_file():
        raise ConfigError(f"train.init_from={source} has no tokenizer/tokenizer.json; pass a run directory made by "
                          "`steplab train` or `steplab import hf`")
    if _encoding(Tokenizer.load(theirs)) != _encoding(Tokenizer.load(tokenizer_dir)):
        raise ConfigError(f"the dataset {data_path} was tokenized with another tokenizer than train.init_from={source}; "
                          f"prepare the data with its tokenizer: steplab data prepare --tokenizer {theirs} ...")


def _encoding(tokenizer) -> dict:
    """What decides text -> ids: the whole tokenizer.json except the post-processor (which only adds BOS on a
    default call; an exported or imported tokenizer has one, steplab encodes without it)."""
    spec = json.loads(tokenizer._tok.to_str())
    spec.pop("post_processor", None)
    return spec


def init_from_run(model: torch.nn.Module, source: Path, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Branch: start from another run's latest weights; given the (already wrapped) model's ``optimizer``, take
    that run's AdamW state too, as a resume does (this run's step, schedule and data order still start at 0)."""
    init_ckpt = init_checkpoint(source)
    if optimizer is None and hasattr(model, "load_branch_weights"):
        model.load_branch_weights(init_ckpt)  # the family says what a branch takes (a DiT keeps its own VAE)
    elif optimizer is None:
        load_weights(init_ckpt, model)
    elif not (init_ckpt / "dcp" / ".metadata").is_file():
        raise ConfigError(f"train.init_optimizer=true but {init_ckpt} holds weights only (no optimizer state, e.g. an "
                          "import); set train.init_optimizer=false")
    else:
        load_checkpoint(init_ckpt, model, optimizer)


def train(cfg: RunConfig, run_dir: str | Path, *, resume: bool = False, progress: bool = True,
          allow_config_change: bool = False) -> dict[str, Any]:
    """Train ``cfg`` into ``run_dir``; return the summary (also written to ``summary.json``).

    Under torchrun every rank calls this; rank 0 alone writes logs, plots and the summary.
    """
    run_dir = Path(run_dir)
    tc = cfg.train
    data = build_train_data(cfg)  # cfg.data.kind: token shards, chat, images, speech, video, ...
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = data.vocab_size
    elif cfg.model.vocab_size < data.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {data.vocab_size} tokens")
    cfg.validate(**({"special_tokens": data.special_tokens} if hasattr(data, "special_tokens") else {}))

    device_type = torch.device(resolve_device(tc.device)).type
    info = init_distributed(tc.parallel, device_type)
    device = info.device if info.enabled else resolve_device(tc.device)
    if tc.batch_size % info.world_size:
        raise ConfigError(f"train.batch_size={tc.batch_size} does not split over {info.world_size} processes; use a multiple")
    # auto -> true/false, written into config.json; every rank resolves alike (config and run dir only)
    saved = run_dir / "config.json" if resume else None
    compiled, why = resolve_compile(cfg, device_type, saved)
    cfg.train.compile = "true" if compiled else "false"
    cfg.train.dtype, why_dtype = resolve_dtype(tc.dtype, device_type, saved)
    if progress and info.is_main:
        print(f"{run_dir.name}: torch.compile {'on' if compiled else 'off'} ({why}); {cfg.train.dtype} ({why_dtype})")
    changes = {}
    if info.is_main:
        changes = prepare_run_dir(cfg, run_dir, data.tokenizer_dir, resume, allow_config_change)
    barrier(info)
    if tc.threads:
        torch.set_num_threads(tc.threads)

    torch.manual_seed(tc.seed)  # every rank builds the same initial weights
    model = build_model(cfg.model).to(device)
    ckpt = latest_checkpoint(run_dir) if resume else None
    branch = None  # init_state: (checkpoint, its step); the run continues that run's optimizer and data stream
    if tc.init_from and ckpt is None:
        check_same_tokenizer(data.tokenizer_dir, Path(tc.init_from), cfg.data.path)
        if tc.init_state:
            branch = init_checkpoint(Path(tc.init_from))
        else:
            init_from_run(model, Path(tc.init_from))
    keep_at = ckpt_steps(tc)
    train_module = wrap_model(model, info, tc.dtype, device_type)
    optimizer = build_optimizer(model, tc, device_type)
    if tc.init_from and tc.init_optimizer and not tc.init_state and ckpt is None:
        init_from_run(model, Path(tc.init_from), optimizer)
    start_step, prior_seconds, skipped, init_step = 0, 0.0, 0, 0
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, optimizer)
        data.load_state_dict(state["loader"])
        start_step, prior_seconds, skipped = state["step"], state["train_seconds"], state.get("skipped_steps", 0)
        init_step = state.get("init_step", 0)
    elif branch is not None:  # this run's seconds and skips count from here; its D counts the parent's tokens
        state = load_checkpoint(branch, model, optimizer)
        data.load_state_dict(state["loader"])
        start_step = init_step = state["step"]
        if start_step >= tc.max_steps:
            raise ConfigError(f"train.init_from={tc.init_from} is at step {start_step}, not before train.max_steps={tc.max_steps}")
    log = MetricsLog(run_dir / "metrics.jsonl", resume_step=start_step if ckpt is not None else None,
                     tensorboard_dir=run_dir / "tb" if tc.tensorboard else None) if info.is_main else None
    if log and changes:  # --allow-config-change: the change is part of the run's record
        log.log({"step": start_step, "config_change": changes})
    step_fn = torch.compile(train_module) if compiled else train_module
    autocast = uses_autocast(info, tc.dtype)

    params, flops = count_params(cfg.model), flops_per_token(cfg.model, cfg.data.seq_len)
    peak = peak_flops(device_type, tc.dtype) * info.world_size
    tokens_per_step = data.tokens_per_batch * tc.grad_accum
    rows = slice(info.rank * tc.batch_size // info.world_size, (info.rank + 1) * tc.batch_size // info.world_size)

    def run_eval() -> dict[str, float]:
        return evaluate_run(data, model, device, tc.dtype)

    bar = tqdm(total=tc.max_steps, initial=start_step, desc=run_dir.name, unit="step", disable=not (progress and info.is_main),
               dynamic_ncols=True)
    model.train()
    train_seconds, last = prior_seconds, {}
    for step in range(start_step, tc.max_steps):
        t0 = time.perf_counter()
        lr = lr_at(step, tc)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        loss_sum, extra_stats = 0.0, {}
        for micro in range(tc.grad_accum):
            batch = data.next_batch()  # the global batch; this rank trains on its rows
            batch = tuple(t[rows].to(device, non_blocking=True) for t in batch)
            with grad_sync(train_module, micro == tc.grad_accum - 1):
                with autocast_context(device_type, "bf16" if autocast else "fp32"):
                    loss = step_fn(*batch)
                (loss / tc.grad_accum).backward()
            loss_sum += loss.item()
        loss_value = mean_across_ranks(loss_sum / tc.grad_accum, info)
        grad_norm = clip_gradients(model, tc.grad_clip)
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            optimizer.zero_grad(set_to_none=True)
            if tc.nan_policy == "stop":
                bar.close()
                if log:
                    log.close()
                raise TrainingError(f"loss became {loss_value} (grad norm {grad_norm}) at step {step + 1} with lr {lr:.3g}; "
                                    f"the last good checkpoint is {latest_checkpoint(run_dir) or 'none'}. "
                                    f"Lower train.lr, or set train.nan_policy=skip")
            skipped += 1
            if hasattr(model, "discard_step_stats"):  # families without per-step statistics need not define it
                model.discard_step_stats()  # e.g. MoE: the skipped step's expert counts must not move the bias
            if log:
                log.log({"step": step + 1, "skipped": True, "loss": loss_value, "lr": lr})
        else:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync_step_stats(model, info)
            if hasattr(model, "after_optimizer_step"):
                extra_stats = model.after_optimizer_step()  # e.g. MoE router-bias balancing; returns stats to log
        if device_type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        train_seconds += dt
        tok_s = tokens_per_step / dt
        mfu = flops["model"] * tok_s / peak
        record = {"step": step + 1, "loss": loss_value, "lr": lr, "grad_norm": grad_norm, "tokens": (step + 1) * tokens_per_step,
                  "tok_per_s": tok_s, "mfu": mfu, **extra_stats}
        done = step + 1 == tc.max_steps
        if (step + 1) % tc.eval_every == 0 or done:
            last = run_eval()
            record.update(last)
        if log and ((step + 1) % tc.log_every == 0 or "val_loss" in record or done):
            log.log(record)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tok_s:,.0f}", mfu=f"{mfu:.1%}", refresh=False)
        if (step + 1) % tc.ckpt_every == 0 or done or step + 1 in keep_at:
            save_checkpoint(run_dir, step + 1, model, optimizer, {"loader": data.state_dict(), "train_seconds": train_seconds,
                                                                  "skipped_steps": skipped, "init_step": init_step},
                            keep_last=tc.keep_last, dist_info=info, keep_steps=keep_at)
    bar.close()
    if not last:  # resumed at the very end: nothing left to train, evaluate once more for the summary
        last = run_eval()
    summary = None
    if log:
        log.close()
        summary = write_summary(cfg, run_dir, params, flops, last, train_seconds, peak, skipped, init_step, tokens_per_step)
    barrier(info)
    if summary is None:
        summary = json.loads((run_dir / "summary.json").read_text())
    return summary


def clip_gradients(model: torch.nn.Module, max_norm: float) -> float:
    """Clip to ``max_norm`` (0: measure only) and return the global norm; under FSDP2 the norm is a DTensor."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return norm.item()


def write_summary(cfg: RunConfig, run_dir: Path, params, flops, last_eval, train_seconds, peak, skipped,
                  init_step: int = 0, tokens_per_step: int | None = None) -> dict[str, Any]:
    records = read_jsonl(run_dir / "metrics.jsonl")
    losses = [r["loss"] for r in records if "loss" in r and not r.get("skipped")]
    tail = losses[-max(1, len(losses) // 10):]
    tokens_per_step = tokens_per_step or cfg.tokens_per_step  # the data's count (text: batch x seq_len)
    D = cfg.train.max_steps * tokens_per_step  # a branch's D counts its parent's tokens: what the model saw
    trained = (cfg.train.max_steps - init_step) * tokens_per_step  # this run's own tokens (= D unless a branch)
    tok_s = trained / train_seconds if train_seconds > 0 else 0.0
    summary = {
        "run": run_dir.name,
        "N": params["N"], "N_active": params["N_active"], "params_total": params["total"],
        "D": D, "C_6ND": flops["6N"] * D, "C_model": flops["model"] * D,  # 6N: N_active for MoE (C = 6 N_a D)
        "lr": cfg.train.lr, "batch_tokens": tokens_per_step, "batch_sequences": cfg.train.batch_size * cfg.train.grad_accum,
        "seq_len": cfg.data.seq_len, "steps": cfg.train.max_steps,
        "train_loss_final": losses[-1] if losses else float("nan"),
        "train_loss_smoothed": sum(tail) / len(tail) if tail else float("nan"),
        **last_eval,
        "train_seconds": train_seconds, "tok_per_s": tok_s, "mfu": flops["model"] * tok_s / peak,
        "peak_flops": peak, "skipped_steps": skipped, "threads": torch.get_num_threads(),
        "compiled": cfg.train.compile == "true", "dtype": cfg.train.dtype,
        "init_from": cfg.train.init_from, "init_step": init_step, "trained_tokens": trained,
        "C_trained": flops["6N"] * trained,  # FLOPs this run spent itself (a branch: its decay only)
    }
    atomic_write_json(run_dir / "summary.json", summary)
    plot_loss_curve(records, run_dir / "loss.png", title=f"{run_dir.name}: N={params['N']:,}")
    changes = [(r["step"], r["config_change"]) for r in records if "config_change" in r]
    atomic_write_text(run_dir / "report.md", render_report(cfg, summary, changes))
    return summary


def render_report(cfg: RunConfig, s: dict[str, Any], changes: list[tuple[int, dict]] = ()) -> str:
    m = cfg.model
    notes = "".join(f"\n**Config changed on resume at step {step}** (`--allow-config-change`; the run is not an exact "
                    "replay of one config): " + ", ".join(f"`{k}` {a!r} -> {b!r}" for k, (a, b) in c.items()) + "\n"
                    for step, c in changes)
    # text: bits per byte; other families: whatever their evaluation reports (val_* scalars)
    held_out = "".join(f"| {'bits per byte' if k == 'val_bpb' else k} | {v:.4f} |\n" for k, v in s.items()
                       if k.startswith("val_") and k != "val_loss" and isinstance(v, float))
    return f"""# Run `{s['run']}`

| | |
|---|---|
| model | d_model {m.d_model}, {m.n_layer} layers, {m.n_head} heads ({m.n_kv_head} kv), d_ff {m.d_ff}, vocab {m.vocab_size} |
| N (non-embedding) | {s['N']:,} |
| total parameters | {s['params_total']:,} |
| D (tokens) | {s['D']:,} |
| C = 6ND | {s['C_6ND']:.3g} FLOPs ({s['C_model']:.3g} counting lm_head and attention) |
| lr, batch | {s['lr']:.3g}, {s['batch_tokens']:,} tokens ({s['batch_sequences']} x {s['seq_len']}) |
| final train loss (smoothed) | {s['train_loss_smoothed']:.4f} |
| validation loss | {s['val_loss']:.4f} nats/token |
{held_out}| throughput | {s['tok_per_s']:,.0f} tokens/s, MFU {s['mfu']:.1%} of {s['peak_flops'] / 1e9:,.0f} GFLOP/s |
| training time | {s['train_seconds']:.1f} s |

![loss curve](loss.png)
""" + notes
