"""``steplab rl``: reasoning RL (ORZ's PPO, GRPO, Dr. GRPO, RLOO, REINFORCE) from a run on a verifiable task;
``--train-verifier`` instead trains an outcome reward model on the run's own graded samples."""
from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    from steplab.rl.algos import ALGOS
    from steplab.rl.loop import RLConfig

    d = RLConfig()
    p = sub.add_parser("rl", help="reasoning RL on a verifiable task (ppo|grpo|dr-grpo|rloo|reinforce)",
                       description="Rollouts through the serving engine, rule-based rewards, ORZ's PPO or the GRPO family.")
    p.add_argument("--from", dest="init_from", required=True, help="the starting run directory")
    p.add_argument("--task", default=d.task, help=f"a generate task with a grader (default {d.task})")
    p.add_argument("--algo", default=d.algo, choices=ALGOS)
    p.add_argument("--out", required=True)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--launcher", default=d.launcher, choices=["local", "ray"], help="ray: rollout workers as Ray actors")
    p.add_argument("--train-verifier", action="store_true",
                   help="train an outcome reward model on --from's graded samples instead (for `steplab eval --verifier`)")
    for f in ("steps", "token_budget", "prompts_per_step", "group_size", "max_tokens", "temperature", "policy_lr",
              "critic_lr", "policy_updates", "critic_updates", "minibatches", "clip", "value_clip", "train_items",
              "eval_items", "eval_samples", "eval_every", "ckpt_every", "seed", "threads", "workers", "max_batch", "device"):
        p.add_argument("--" + f.replace("_", "-"), dest=f, type=type(getattr(d, f)), default=getattr(d, f))
    p.set_defaults(func=cmd_rl)


def cmd_rl(args) -> int:
    from steplab.rl.loop import RLConfig, config_from_dict

    cfg = config_from_dict({k: v for k, v in vars(args).items() if k in RLConfig.__dataclass_fields__})
    if args.train_verifier:
        from steplab.eval.verifier import train_verifier

        out = train_verifier(args.init_from, args.task, args.out, n_items=cfg.train_items, samples=cfg.group_size,
                             max_tokens=cfg.max_tokens, seed=cfg.seed, threads=cfg.threads)
        print(json.dumps(out, indent=2))
        return 0
    from steplab.rl.loop import run_rl

    summary = run_rl(cfg, args.out, resume=args.resume)
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out}/report.md and curves.png")
    return 0
