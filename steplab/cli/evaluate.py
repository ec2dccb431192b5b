"""``steplab eval``: validation loss and bits per byte, tasks, the downstream suite, lm-evaluation-harness."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a run: val loss / bits per byte, --task, --suite, --lm-eval",
                       description="With no --task/--suite/--lm-eval: validation loss and bits per byte. RUN may be a "
                                   "sweep directory (runs/*) with --suite: scores every run and fits each task vs compute.")
    p.add_argument("run")
    p.add_argument("--data", help="prepared dataset for the loss (default: the run's own)")
    p.add_argument("--batches", type=int, default=50, help="validation batches (default 50)")
    p.add_argument("--task", action="append", default=[], metavar="NAME", help="a steplab task (repeatable); `--task list` lists them")
    p.add_argument("--suite", help="a downstream suite (small)")
    p.add_argument("--lm-eval", metavar="TASKS", help="comma-separated lm-evaluation-harness tasks, run in process")
    p.add_argument("--include-path", help="a folder of extra lm-eval task YAMLs (local tasks)")
    p.add_argument("--limit", type=int, help="lm-eval: at most this many documents per task")
    p.add_argument("-n", "--items", type=int, default=500, help="--task: held-out items per task (default 500)")
    p.add_argument("--scale", type=float, help="--suite: scale the item counts (default 1; 0.2 for the runs of a sweep)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target", help="sweep mode: a run whose suite score is predicted from the sweep and measured")
    p.add_argument("--dtype", choices=["fp32", "bf16"],
                   help="compute dtype (default: fp32 for --task/--suite/--lm-eval, the run's train dtype for the loss)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--samples", type=int, metavar="K",
                   help="--task: test-time scaling from K temperature-1 samples per problem: pass@k, maj@k, best-of-k (k = 1, 2, 4, ... K)")
    p.add_argument("--vote", choices=["majority", "best-of"], default="majority",
                   help="--samples: the headline method (majority vote, or best-of-K by --verifier; the oracle is always shown)")
    p.add_argument("--verifier", metavar="DIR", help="--samples: an outcome reward model from `steplab rl --train-verifier`")
    from steplab.cli.extend import add_eval_args
    add_eval_args(p)  # --lengths --depths --keys --report for --task passkey (long-context evals)
    from steplab.cli.audio import add_eval_args as add_speech_eval_args
    add_speech_eval_args(p)  # --task asr / --task tts
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    from steplab.cli.extend import cmd_eval_passkey, wants_passkey

    if wants_passkey(args):
        return cmd_eval_passkey(args)
    from steplab.cli.audio import cmd_eval_speech, wants_speech

    if wants_speech(args):
        return cmd_eval_speech(args)
    if args.lm_eval and args.checkpoint:
        from steplab.errors import ConfigError

        raise ConfigError("--lm-eval scores the run's latest checkpoint; drop --checkpoint (or export that checkpoint first)")
    if args.task == ["list"]:
        from steplab.tasks import get_task, task_names

        for name in task_names():
            t = get_task(name)
            note = t.unavailable()
            print(f"{name:18s} {t.kind:8s} chance {t.chance:4.0%}  {t.description}" + (f"  [unavailable: {note}]" if note else ""))
        return 0
    if args.task == ["vqa"]:
        return _vqa(args)
    if not (args.task or args.suite or args.lm_eval):
        return _loss(args)
    if args.samples is not None:
        return _tts(args)
    run = Path(args.run)
    if args.suite and (run / "runs").is_dir() and not (run / "config.json").is_file():
        return _sweep(args)
    out: dict = {"run": args.run}
    if args.task or args.suite:
        from steplab.eval.runner import EngineLM

        with EngineLM.from_run(args.run, device=args.device, dtype=args.dtype or "fp32", checkpoint=args.checkpoint) as lm:
            if args.task:
                from steplab.eval.task_eval import run_task
                from steplab.tasks import get_task

                tasks = [get_task(name) for name in args.task]  # unknown names fail before any work
                out["tasks"] = []
                for t in tasks:
                    r = run_task(lm, t, args.items, args.seed)
                    out["tasks"].append(r.to_dict())
                    fmt = f"; format {r.format_rate:.1%}" if r.format_rate is not None else ""
                    print(f"{r.task}: {r.accuracy:.1%} ({r.correct}/{r.n}; 95% {r.ci_low:.1%}-{r.ci_high:.1%}; "
                          f"chance {r.chance:.0%}{fmt})")
            if args.suite:
                from steplab.eval.suite import run_suite, save_suite, suite_markdown

                res = run_suite(lm, args.suite, scale=args.scale or 1.0, seed=args.seed)
                md = save_suite(args.run, res)
                print(suite_markdown(res))
                print(f"wrote {md}")
                out["suite"] = res
    if args.lm_eval:
        from steplab.eval.harness import run_lm_eval


        tasks = [t.strip() for t in args.lm_eval.split(",") if t.strip()]
        res = run_lm_eval(args.run, tasks, args.include_path, device=args.device, dtype=args.dtype or "fp32", limit=args.limit)
        out["lm_eval"] = res["results"]
        for task, metrics in res["results"].items():
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
            print(f"{task}: {shown}")
    if args.task or args.lm_eval:
        print(json.dumps(out, indent=2, default=str))
    return 0


def _tts(args) -> int:
    from steplab.errors import ConfigError
    from steplab.eval.tts import plot_scaling, run_tts
    from steplab.utils import atomic_write_json

    if args.samples < 1 or not args.task:
        raise ConfigError("--samples K needs K >= 1 and at least one --task")
    if args.vote == "best-of" and not args.verifier:
        raise ConfigError("--vote best-of needs --verifier DIR (an outcome reward model from `steplab rl --train-verifier`)")
    for name in args.task:
        res = run_tts(args.run, name, args.samples, args.items, args.seed, args.verifier,
                      device="cpu" if args.device == "auto" else args.device, checkpoint=args.checkpoint)
        t = res["table"]
        K = max(t["pass"])
        head = t["verifier"][K] if args.vote == "best-of" else t["maj"][K]
        print(f"{name}: pass@1 {t['pass'][1]:.1%}, pass@{K} {t['pass'][K]:.1%}, maj@{K} {t['maj'][K]:.1%}, "
              + (f"best-of-{K} (verifier) {t['verifier'][K]:.1%}, " if "verifier" in t else "")
              + f"oracle@{K} {t['oracle'][K]:.1%}  [{args.vote}@{K}: {head:.1%}; {res['items']} problems, {res['seconds']} s]")
        atomic_write_json(Path(args.run) / f"tts_{name}.json", res)
        plot_scaling([res], Path(args.run) / f"tts_{name}.png")
        print(f"wrote {Path(args.run) / f'tts_{name}.json'} and .png")
    return 0


def _vqa(args) -> int:
    """Step-1V: held-out VQA accuracy per question type and the image-use checks (steplab/eval/vqa.py)."""
    from steplab.eval.vqa import markdown, run_vqa
    from steplab.train.checkpoint import load_run
    from steplab.train.trainer import resolve_device

    cfg, model, tokenizer, step = load_run(args.run, device=resolve_device(args.device), checkpoint=args.checkpoint)
    if cfg.model.vision.image_size == 0:
        from steplab.errors import ConfigError

        raise ConfigError(f"{args.run} is not a Step-1V run (model.vision.image_size is 0); --task vqa needs an image model")
    from steplab.data.images import parse_path

    # held-out digit grids from the source the run trained on (data.path "vqa:mnist": MNIST's test images)
    digits = parse_path(cfg.data.path)[1] if cfg.data.kind == "vqa" else "sklearn"
    res = run_vqa(model.float(), tokenizer, n=args.items, seed=args.seed, digits=digits)
    print(markdown(res))
    print(json.dumps({"run": args.run, "step": step, **{k: v for k, v in res.items() if k != "answers"}}, indent=2))
    return 0


def _sweep(args) -> int:
    from steplab.eval.taskfit import suite_over_sweep

    sweep = Path(args.run)
    from steplab.eval.taskfit import sweep_law_runs

    dirs = sweep_law_runs(sweep)
    md = suite_over_sweep(dirs, Path(args.target) if args.target else None, sweep, suite=args.suite, sweep_scale=args.scale or 0.2,
                          device=args.device, dtype=args.dtype or "fp32", seed=args.seed)
    print(md)
    print(f"wrote {sweep / 'task_prediction.md'}")
    return 0


def _loss(args) -> int:
    from steplab.data.loader import iter_eval_batches
    from steplab.data.prepare import load_prepared
    from steplab.eval.evaluate import evaluate, token_byte_lengths
    from steplab.train.checkpoint import load_run
    from steplab.train.trainer import resolve_device

    device = resolve_device(args.device)
    cfg, model, tokenizer, step = load_run(args.run, device=device, checkpoint=args.checkpoint)
    _, _, val, _ = load_prepared(args.data or cfg.data.path)
    batches = iter_eval_batches(val, cfg.data.seq_len, cfg.train.batch_size, max_batches=args.batches)
    result = evaluate(model, batches, token_byte_lengths(tokenizer), device=device, dtype=args.dtype or cfg.train.dtype)
    print(json.dumps({"run": args.run, "step": step, **result}, indent=2))
    return 0
