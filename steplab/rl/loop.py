"""The RL loop: ``run_rl(cfg, out)`` samples a rollout batch through the engine, grades it, computes advantages
(PPO's critic + GAE, or the GRPO family's group baselines), updates the policy (and the critic) and logs.

One step: ``prompts_per_step`` training problems (in a seeded order; the position in it is part of every
checkpoint) x ``group_size`` samples each -> rewards (1 = right answer that ended normally) -> the trainer
recomputes the sampled tokens' log-probabilities (checked against the engine's: ``logprob_diff``) and, for
PPO, the values -> K policy updates (+ M critic updates) over ``minibatches`` mini-batches.

Exact resume: the rollouts' seeds derive from (seed, step, problem), the mini-batch order from (seed, step),
and policy, critic, both optimizers, the RNG and the rollout position are checkpointed, so a killed and
resumed run logs the same numbers as an uninterrupted one (CPU, same thread count).
"""
from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from steplab.errors import ConfigError
from steplab.eval.sampling import prompt_ids  # RL prompts: plain text after BOS, as test-time scaling
from steplab.rl import algos
from steplab.rl.checkpoint import latest_checkpoint, load_rl_checkpoint, save_rl_checkpoint
from steplab.rl.policy import Sample, engine_logprobs, make_critic, pack, token_logprobs, token_values
from steplab.rl.rollout import Job, LocalRollouts, RayRollouts, SamplingSpec, grade
from steplab.tasks import get_task
from steplab.train.checkpoint import load_run
from steplab.train.metrics import MetricsLog, read_jsonl
from steplab.utils import atomic_write_json


@dataclass
class RLConfig:
    init_from: str = ""  # the starting run (SFT'd or pretrained on the task format)
    task: str = "countdown3"
    algo: str = "ppo"  # ppo | grpo | dr-grpo | rloo | reinforce
    steps: int = 50
    token_budget: int = 0  # > 0: stop once this many response tokens were sampled (equal-token comparisons)
    prompts_per_step: int = 16
    group_size: int = 8
    max_tokens: int = 0  # 0: the task's own limit
    temperature: float = 1.0
    policy_lr: float = 1e-4
    critic_lr: float = 5e-4
    policy_updates: int = 1  # K (ORZ: 1)
    critic_updates: int = 12  # M (ORZ: 12); ppo only
    minibatches: int = 1
    clip: float = 0.2
    value_clip: float = 0.2
    grad_clip: float = 1.0
    train_items: int = 5000  # the training pool of problems (train split)
    eval_items: int = 200  # held-out problems scored every eval_every steps
    eval_samples: int = 4  # samples per held-out problem (temperature 1): pass@1 = their mean
    eval_every: int = 10
    ckpt_every: int = 10
    keep_last: int = 2
    seed: int = 0
    threads: int = 1
    launcher: str = "local"  # local | ray
    workers: int = 2  # ray rollout actors
    max_batch: int = 64  # engine slots per rollout worker
    device: str = "auto"  # auto | cpu | cuda (the trainer and the in-process engine)

    def validate(self) -> None:
        if self.algo not in algos.ALGOS:
            raise ConfigError(f"--algo {self.algo!r} is not one of {', '.join(algos.ALGOS)}")
        if self.launcher not in ("local", "ray"):
            raise ConfigError(f"--launcher {self.launcher!r} must be local or ray")
        if self.group_size < 2 and self.algo in ("grpo", "dr-grpo", "rloo", "reinforce"):
            raise ConfigError(f"--algo {self.algo} needs a group of at least 2 samples per prompt (--group-size)")
        if self.group_size > self.max_batch:
            raise ConfigError(f"group_size {self.group_size} exceeds the engine's max_batch {self.max_batch}")
        for name in ("steps", "prompts_per_step", "policy_updates", "minibatches", "eval_every", "ckpt_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        if self.temperature <= 0:
            raise ConfigError("RL samples need temperature > 0 (the policy gradient needs a stochastic policy)")


RESUME_SAFE = {"steps", "token_budget", "eval_every", "ckpt_every", "keep_last", "launcher", "workers", "threads", "device"}


def _prepare_dir(cfg: RLConfig, out: Path, resume: bool) -> None:
    rl_json = out / "rl.json"
    if rl_json.exists():
        if not resume:
            raise ConfigError(f"{out} already holds an RL run; pass --resume to continue it or choose another --out")
        saved = json.loads(rl_json.read_text())
        diff = {k: (saved.get(k), v) for k, v in asdict(cfg).items() if saved.get(k) != v and k not in RESUME_SAFE}
        if diff:
            raise ConfigError(f"--resume with settings that differ from {rl_json}: "
                              + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in diff.items()) + "; drop the change or start a new --out")
    elif out.exists() and any(out.iterdir()):
        raise ConfigError(f"output directory {out} exists and is not empty; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    src = Path(cfg.init_from)
    shutil.copyfile(src / "config.json", out / "config.json")  # the policy's model config: load_run reads RL runs
    if not (out / "tokenizer").exists():
        shutil.copytree(src / "tokenizer", out / "tokenizer")
    atomic_write_json(rl_json, asdict(cfg))


def _seed(*parts: int) -> int:
    return random.Random(":".join(map(str, parts))).randrange(1 << 31)


def evaluate_heldout(rollouts, tokenizer, task, items, samples: int, max_tokens: int, seed: int) -> dict[str, float]:
    """Held-out pass@1 (mean over ``samples`` temperature-1 samples per problem), pass@``samples`` (a problem
    counts when any of its samples is right: RL must not buy pass@1 by collapsing diversity), truncation and
    format rates."""
    jobs = [Job(i, i, prompt_ids(tokenizer, it.prompt), _seed(seed, 99991, i)) for i, it in enumerate(items)]
    out = rollouts.run(None, jobs, SamplingSpec(samples, max_tokens, 1.0, task.stop))
    solved = set()
    for s in out:
        grade(task, items[s.item], s)
        if s.correct:
            solved.add(s.item)
    n = max(1, len(out))
    return {"eval_pass1": sum(s.correct for s in out) / n, f"eval_pass{samples}": len(solved) / max(1, len(items)),
            "eval_format_violation": 1 - sum(s.well_formed for s in out) / n,
            "eval_truncated": sum(s.finish_reason == "length" for s in out) / n}


def run_rl(cfg: RLConfig, out: str | Path, *, resume: bool = False, progress: bool = True) -> dict:
    cfg.validate()
    out = Path(out)
    if not (Path(cfg.init_from) / "config.json").is_file():
        raise ConfigError(f"--from {cfg.init_from} is not a run directory (no config.json); pass a `steplab train` --out")
    torch.set_num_threads(cfg.threads)
    task = get_task(cfg.task)
    if task.kind != "generate":
        raise ConfigError(f"task {cfg.task!r} is a {task.kind} task; RL needs a generate task with a grader")
    _prepare_dir(cfg, out, resume)
    from steplab.train.trainer import resolve_device

    _, policy, tokenizer, _ = load_run(cfg.init_from, device=resolve_device(cfg.device))
    policy = policy.float().train()
    critic = make_critic(policy).train()
    policy_opt = torch.optim.AdamW(policy.parameters(), lr=cfg.policy_lr, betas=(0.9, 0.95), weight_decay=0.0)
    critic_opt = torch.optim.AdamW(critic.parameters(), lr=cfg.critic_lr, betas=(0.9, 0.95), weight_decay=0.0)
    max_tokens = cfg.max_tokens or task.max_tokens
    pool = task.items("train", cfg.train_items, seed=0)
    held_out = task.items("test", cfg.eval_items, seed=0)
    start, position, sampled_tokens, seconds = 0, 0, 0, 0.0
    ckpt = latest_checkpoint(out) if resume else None
    if ckpt is not None:
        state = load_rl_checkpoint(ckpt, policy, critic, policy_opt, critic_opt)
        start, position, sampled_tokens, seconds = state["step"], state["position"], state["sampled_tokens"], state["seconds"]
    log = MetricsLog(out / "metrics.jsonl", resume_step=start if ckpt is not None else None)
    Rollouts = RayRollouts if cfg.launcher == "ray" else LocalRollouts
    kw = {"workers": cfg.workers} if cfg.launcher == "ray" else {}
    rollouts = Rollouts(policy, tokenizer, max_batch=cfg.max_batch, **kw)
    spec = SamplingSpec(cfg.group_size, max_tokens, cfg.temperature, task.stop)
    how = algos.AGGREGATION[cfg.algo]
    try:
        if start == 0:
            log.log({"step": 0, "sampled_tokens": 0, **evaluate_heldout(rollouts, tokenizer, task, held_out, cfg.eval_samples,
                                                                         max_tokens, cfg.seed)})
        step = start
        for step in range(start + 1, cfg.steps + 1):
            if cfg.token_budget and sampled_tokens >= cfg.token_budget:
                step -= 1
                break
            t0 = time.perf_counter()
            jobs = []
            for g in range(cfg.prompts_per_step):
                epoch, i = divmod(position, len(pool))
                order = list(range(len(pool)))
                random.Random(f"{cfg.seed}:order:{epoch}").shuffle(order)
                jobs.append(Job(order[i], g, prompt_ids(tokenizer, pool[order[i]].prompt), _seed(cfg.seed, step, g)))
                position += 1
            weights = {k: v.detach().cpu() for k, v in policy.state_dict().items()}
            samples = rollouts.run(weights, jobs, spec)
            for s in samples:
                grade(task, pool[s.item], s)
            record = update(cfg, policy, critic, policy_opt, critic_opt, samples, tokenizer.pad_id, how, max_tokens, step)
            sampled_tokens += sum(len(s.tokens) for s in samples)
            seconds += time.perf_counter() - t0
            record.update(step=step, sampled_tokens=sampled_tokens, seconds=round(seconds, 3))
            if step % cfg.eval_every == 0 or step == cfg.steps:
                record.update(evaluate_heldout(rollouts, tokenizer, task, held_out, cfg.eval_samples, max_tokens, cfg.seed))
            log.log(record)
            if progress:
                print(f"step {step}: reward {record['reward']:.3f} len {record['response_len']:.1f} "
                      f"trunc {record['truncated']:.3f} dlogp {record['logprob_diff']:.1e}"
                      + (f" heldout pass@1 {record['eval_pass1']:.3f}" if "eval_pass1" in record else ""), flush=True)
            if step % cfg.ckpt_every == 0 or step == cfg.steps:
                save_rl_checkpoint(out, step, policy, critic, policy_opt, critic_opt,
                                   {"position": position, "sampled_tokens": sampled_tokens, "seconds": seconds},
                                   keep_last=cfg.keep_last)
        if cfg.token_budget and (latest_checkpoint(out) is None or int(latest_checkpoint(out).name[5:]) != step):
            record = evaluate_heldout(rollouts, tokenizer, task, held_out, cfg.eval_samples, max_tokens, cfg.seed)
            log.log({"step": step, "sampled_tokens": sampled_tokens, **record})
            save_rl_checkpoint(out, step, policy, critic, policy_opt, critic_opt,
                               {"position": position, "sampled_tokens": sampled_tokens, "seconds": seconds}, keep_last=cfg.keep_last)
    finally:
        log.close()
        rollouts.close()
    return write_report(cfg, out)


def update(cfg: RLConfig, policy, critic, policy_opt, critic_opt, samples: list[Sample], pad_id: int, how: str,
           max_tokens: int, step: int) -> dict:
    """One batch: advantages, K policy updates, M critic updates (ppo); returns the step's metrics."""
    device = next(policy.parameters()).device
    batch = pack(samples, pad_id, device)
    mask = batch.mask
    with torch.no_grad():
        old_logp = token_logprobs(policy, batch.ids, cfg.temperature)
        diff = ((old_logp - engine_logprobs(samples, batch.ids.shape[1]).to(device)).abs() * mask).max().item()
        if cfg.algo == "ppo":
            old_values = token_values(critic, batch.ids)
            adv, returns = algos.gae(algos.token_rewards(batch.rewards, mask), old_values, mask.float(), 1.0, 1.0)
            adv = algos.masked_whiten(adv, mask)
        else:
            adv = algos.group_advantages(batch.rewards, batch.groups, cfg.algo)[:, None] * mask
    gen = torch.Generator().manual_seed(_seed(cfg.seed, step, 7))
    stats = {"policy_loss": 0.0, "clip_frac": 0.0, "value_loss": 0.0}
    B = len(samples)
    for _ in range(cfg.policy_updates):
        for rows in torch.randperm(B, generator=gen).chunk(cfg.minibatches):
            logp = token_logprobs(policy, batch.ids[rows], cfg.temperature)
            loss, info = algos.policy_loss(logp, old_logp[rows], adv[rows], mask[rows], cfg.clip, how, max_tokens)
            policy_opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
            policy_opt.step()
            stats["policy_loss"] += loss.item() / (cfg.policy_updates * cfg.minibatches)
            stats["clip_frac"] += info["clip_frac"] / (cfg.policy_updates * cfg.minibatches)
    if cfg.algo == "ppo":
        for _ in range(cfg.critic_updates):
            for rows in torch.randperm(B, generator=gen).chunk(cfg.minibatches):
                values = token_values(critic, batch.ids[rows])
                loss = algos.value_loss(values, old_values[rows], returns[rows], mask[rows], cfg.value_clip)
                critic_opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(critic.parameters(), cfg.grad_clip)
                critic_opt.step()
                stats["value_loss"] += loss.item() / (cfg.critic_updates * cfg.minibatches)
    n = len(samples)
    return {"reward": sum(s.reward for s in samples) / n, "pass1": sum(s.correct for s in samples) / n,
            "truncated": sum(s.finish_reason == "length" for s in samples) / n,
            "format_violation": 1 - sum(s.well_formed for s in samples) / n,
            "response_len": sum(len(s.tokens) for s in samples) / n, "logprob_diff": diff, **stats}


def write_report(cfg: RLConfig, out: Path) -> dict:
    """summary.json, curves.png (reward, held-out pass@1, length, truncation) and report.md."""
    records = read_jsonl(out / "metrics.jsonl")
    train = [r for r in records if "reward" in r]
    evals = [r for r in records if "eval_pass1" in r]
    summary = {"algo": cfg.algo, "task": cfg.task, "init_from": cfg.init_from, "seed": cfg.seed,
               "steps": train[-1]["step"] if train else 0, "sampled_tokens": records[-1]["sampled_tokens"] if records else 0,
               "seconds": train[-1]["seconds"] if train else 0.0,
               "eval_pass1_start": evals[0]["eval_pass1"] if evals else None,
               "eval_pass1_end": evals[-1]["eval_pass1"] if evals else None,
               "eval_format_violation_end": evals[-1]["eval_format_violation"] if evals else None,
               f"eval_pass{cfg.eval_samples}_start": evals[0].get(f"eval_pass{cfg.eval_samples}") if evals else None,
               f"eval_pass{cfg.eval_samples}_end": evals[-1].get(f"eval_pass{cfg.eval_samples}") if evals else None,
               "max_logprob_diff": max((r["logprob_diff"] for r in train), default=0.0)}
    atomic_write_json(out / "summary.json", summary)
    plot_curves(records, out / "curves.png", f"{out.name}: {cfg.algo} on {cfg.task}")
    (out / "report.md").write_text(
        f"# RL run `{out.name}`\n\n" + "".join(f"- {k}: {v}\n" for k, v in summary.items())
        + "\n![curves](curves.png)\n\nFull settings: `rl.json`; per-step metrics: `metrics.jsonl`.\n")
    return summary


def plot_curves(records: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if "reward" in r]
    evals = [r for r in records if "eval_pass1" in r]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot([r["step"] for r in train], [r["reward"] for r in train], label="train reward (pass@1)")
    axes[0].plot([r["step"] for r in evals], [r["eval_pass1"] for r in evals], "o-", label="held-out pass@1")
    axes[0].set_xlabel("step")
    axes[0].legend()
    axes[1].plot([r["step"] for r in train], [r["response_len"] for r in train])
    axes[1].set_title("response length (tokens)")
    axes[2].plot([r["step"] for r in train], [r["truncated"] for r in train], label="truncated")
    axes[2].plot([r["step"] for r in train], [r["format_violation"] for r in train], label="format violations")
    axes[2].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def config_from_dict(d: dict) -> RLConfig:
    known = {f.name for f in fields(RLConfig)}
    return RLConfig(**{k: v for k, v in d.items() if k in known})
