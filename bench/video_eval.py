"""Issue 21 benchmark: judge the video VAE and the text-to-video DiT by measurement (numbers for docs/benchmarks.md).

    python bench/video_eval.py probe --out /tmp/i21/probe            # train the probes on real clips, report held-out
    python bench/video_eval.py vae  /tmp/i21/vae1                    # PSNR (whole frame, digit box) on held-out clips
    python bench/video_eval.py dit  /tmp/i21/dit1 --probe /tmp/i21/probe [--per-prompt 20 --steps 30 --cfg 5 --shift 1]
    python bench/video_eval.py grid /tmp/i21/dit1 --out docs/video_grid.png

Every command runs with one thread (the machine is shared) and prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from steplab.eval import video as ev  # noqa: E402
from steplab.infer.video import load_video_run  # noqa: E402
from steplab.models.video import psnr_frames  # noqa: E402


def cmd_probe(a):
    from steplab.config import VideoConfig

    v = VideoConfig()
    t0 = time.time()
    probe = ev.train_probe(v, steps=a.steps, batch=32, seed=0, log=lambda s: print(s, file=sys.stderr))
    ev.save_probe(probe, v, a.out)
    clips, digits, dirs = ev.real_clips(v, a.n, 99, "heldout")
    out = {"what": "probe on real held-out clips", "train_s": round(time.time() - t0, 1), "steps": a.steps, "n": a.n,
           **ev.judge(probe, clips, digits, dirs)}
    shuffled = ev.judge(probe, ev.shuffle_time(clips, 0), digits, dirs)
    out["direction_acc_time_shuffled"] = shuffled["direction_acc"]  # the probe must read motion, not one frame
    print(json.dumps(out))


@torch.no_grad()
def cmd_vae(a):
    cfg, vae = load_video_run(a.run)
    v = cfg.model.video
    clips = ev.real_clips(v, a.n, 99, "heldout")[0].unsqueeze(1) * 2 - 1
    ys = torch.cat([vae.decode(vae.encode(c)[0]).clamp(-1, 1) for c in clips.split(32)])
    lat = vae.encode(clips[:1])[0]
    print(json.dumps({"what": "VAE reconstruction, real held-out clips", "run": a.run, "n": a.n,
                      "latent_shape": list(lat.shape[1:]), "compression": clips[0].numel() / lat[0].numel(),
                      "psnr": psnr_frames(ys, clips).mean().item(), "psnr_box": psnr_frames(ys, clips, box=True).mean().item(),
                      "psnr_first_frame": psnr_frames(ys[:, :, :1], clips[:, :, :1]).mean().item()}))


def generate(dit, prompts, a):
    out = []
    for i in range(0, len(prompts), 40):
        out.append(dit.sample(prompts[i:i + 40], steps=a.steps, cfg_scale=a.cfg, shift=a.shift, seed=a.seed + i))
    return torch.cat(out)


def cmd_dit(a):
    cfg, dit = load_video_run(a.run, average=not a.raw)
    probe = ev.load_probe(a.probe)
    t0 = time.time()
    if a.train_prompts:  # tune sampler settings on training prompts, never on the held-out ones
        from steplab.data.video import TRAIN_PAIRS, prompt_for

        pairs = [TRAIN_PAIRS[i] for i in range(0, 70, 7)]
        prompts = [prompt_for(d, k) for d, k in pairs for _ in range(a.per_prompt)]
        digits = torch.tensor([d for d, _ in pairs for _ in range(a.per_prompt)])
        dirs = torch.tensor([k for _, k in pairs for _ in range(a.per_prompt)])
    else:
        prompts, digits, dirs = ev.heldout_prompts(a.per_prompt)
    clips = generate(dit, prompts, a)
    gen_s = time.time() - t0
    report = ev.generation_report(probe, clips, digits, dirs, cfg.model.video)
    print(json.dumps({"what": "generated from " + ("training" if a.train_prompts else "held-out") + " prompts",
                      "run": a.run, "weights": "raw" if a.raw or dit.ema is None else "average", "steps": a.steps, "cfg": a.cfg, "shift": a.shift, "gen_s": round(gen_s, 1), **report}))


def cmd_grid(a):
    """Rows: prompts; left half generated clips, right half real ones; columns: every other frame."""
    import numpy as np
    from PIL import Image

    cfg, dit = load_video_run(a.run, average=not a.raw)
    prompts, digits, dirs = ev.heldout_prompts(1)
    fake = generate(dit, prompts, a)
    real = torch.stack(ev.real_clips_for(cfg.model.video, digits, dirs, 3))
    frames = list(range(0, cfg.model.video.frames, 4))
    rows = []
    for g, r in zip(fake, real):
        sep = torch.ones(g.shape[-2], 2)
        rows.append(torch.cat([*(torch.cat([g[t], sep], 1) for t in frames), torch.ones(g.shape[-2], 6),
                               *(torch.cat([r[t], sep], 1) for t in frames)], 1))
        rows.append(torch.ones(2, rows[-1].shape[1]))
    img = (torch.cat(rows).numpy() * 255).astype(np.uint8)
    Image.fromarray(img).resize((img.shape[1] * 2, img.shape[0] * 2), Image.NEAREST).save(a.out, optimize=True)
    print(json.dumps({"grid": a.out, "prompts": prompts, "frames": frames}))


def main():
    torch.set_num_threads(1)
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("probe"); s.add_argument("--out", required=True); s.add_argument("--steps", type=int, default=1500)
    s.add_argument("--n", type=int, default=500)
    s = sub.add_parser("vae"); s.add_argument("run"); s.add_argument("--n", type=int, default=256)
    for name in ("dit", "grid"):
        s = sub.add_parser(name); s.add_argument("run")
        s.add_argument("--steps", type=int, default=30); s.add_argument("--cfg", type=float, default=5.0)
        s.add_argument("--shift", type=float, default=1.0); s.add_argument("--seed", type=int, default=0)
        s.add_argument("--raw", action="store_true", help="a DiT trained with video.ema: sample with its last weights, not the average")
        if name == "dit":
            s.add_argument("--probe", required=True); s.add_argument("--per-prompt", type=int, default=20)
            s.add_argument("--train-prompts", action="store_true")
        else:
            s.add_argument("--out", required=True)
    a = p.parse_args()
    {"probe": cmd_probe, "vae": cmd_vae, "dit": cmd_dit, "grid": cmd_grid}[a.cmd](a)


if __name__ == "__main__":
    main()
