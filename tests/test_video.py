"""Step-Video (issue 21): bouncing-digit data, the causal video VAE, the flow-matching DiT and the probes."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from steplab.config import ConfigError, RunConfig, preset
from steplab.data import video as vd
from steplab.eval import video as ev
from steplab.models import dit as dm
from steplab.models import video as vm


def tiny(**video) -> RunConfig:
    base = dict(frames=9, size=16, digit_size=6, channels=8, z_channels=4, dit_dim=24, dit_heads=2, dit_layers=2,
                text_layers=1)
    base.update(video)
    return RunConfig.from_dict(dict(model=dict(video=base), train=dict(batch_size=4, seed=3, eval_batches=2)))


# ---- data ----------------------------------------------------------------------------------------------
def test_clips_move_one_pixel_per_frame_in_the_prompted_direction():
    gen = torch.Generator().manual_seed(0)
    clips, digits, dirs = vd.sample_clips(gen, 16, frames=17, size=32, digit_size=12)
    assert clips.shape == (16, 17, 32, 32) and clips.min() >= 0 and clips.max() <= 1
    ys, xs = torch.arange(32.0).view(1, 1, 32, 1), torch.arange(32.0).view(1, 1, 1, 32)
    mass = clips.sum((2, 3))
    cy, cx = (clips * ys).sum((2, 3)) / mass, (clips * xs).sum((2, 3)) / mass  # centre of brightness per frame
    for i in range(16):
        dy, dx = vd.DIRECTIONS[vd.DIRECTION_NAMES[int(dirs[i])]]
        assert torch.allclose(cy[i, 1:] - cy[i, :-1], torch.full((16,), float(dy)), atol=1e-3)
        assert torch.allclose(cx[i, 1:] - cx[i, :-1], torch.full((16,), float(dx)), atol=1e-3)
        assert torch.allclose(mass[i], mass[i, :1].expand(17))  # never clipped by a wall


def test_heldout_prompts_are_never_trained_and_cover_every_digit_and_direction():
    assert len(vd.HELDOUT_PAIRS) == 10 and len(vd.TRAIN_PAIRS) == 70
    assert not set(vd.HELDOUT_PAIRS) & set(vd.TRAIN_PAIRS)
    assert {d for d, _ in vd.HELDOUT_PAIRS} == set(range(10)) and {k for _, k in vd.HELDOUT_PAIRS} == set(range(8))
    data = vd.build_text_clip_data(tiny())
    for _ in range(3):
        clips, ids = data.next_batch()
        for row in ids.tolist():
            words = [vd.VOCAB[i] for i in row if i]
            assert vd.parse_prompt(" ".join(words)) in set(vd.TRAIN_PAIRS)


def test_prompt_text_is_bounded_data():
    assert vd.parse_prompt("a 7 moving up-left") == (7, vd.DIRECTION_NAMES.index("up-left"))
    assert vd.parse_prompt("A SEVEN going Down-Right") == (7, vd.DIRECTION_NAMES.index("down-right"))
    assert vd.parse_prompt("a 7 moving sideways") is None and vd.parse_prompt("77 up") is None
    ids = vd.encode_prompts(["<|bos|> ../../etc " + "up " * 1000])
    assert ids.shape == (1, vd.TEXT_LEN)  # "bos", "etc" are unknown words; then "up" until the cap
    assert ids[0].tolist() == [vd.WORD_ID["<unk>"]] * 2 + [vd.WORD_ID["up"]] * (vd.TEXT_LEN - 2)


def test_data_stream_resumes_exactly():
    a = vd.build_text_clip_data(tiny())
    a.next_batch()
    state = a.state_dict()
    want = a.next_batch()
    b = vd.build_text_clip_data(tiny())
    b.load_state_dict(json.loads(json.dumps(state)))
    got = b.next_batch()
    assert all(torch.equal(x, y) for x, y in zip(want, got))
    e1, e2 = list(a.eval_batches()), list(b.eval_batches())
    assert len(e1) == 2 and all(torch.equal(x[0], y[0]) for x, y in zip(e1, e2))


# ---- VAE -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sd,td", [(4, 4), (2, 2), (4, 1)])
def test_vae_shapes_and_causality(sd, td):
    torch.manual_seed(0)
    cfg = tiny(spatial_down=sd, temporal_down=td)
    vae = vm.VideoVAE(cfg.model).eval()
    x = torch.randn(2, 1, 9, 16, 16)
    mean, logvar = vae.encode(x)
    assert mean.shape == (2, 4, 1 + 8 // td, 16 // sd, 16 // sd)
    assert vae.decode(mean).shape == x.shape
    later = x.clone()
    later[:, :, 5:] = torch.randn_like(later[:, :, 5:])  # change frames 5..8 only
    mean2, _ = vae.encode(later)
    untouched = 1 + 4 // td - 1 if td > 1 else 5  # latent frames built from frames 0..4 only
    assert torch.equal(mean[:, :, :untouched], mean2[:, :, :untouched])
    assert not torch.equal(mean, mean2)
    only_first = x.clone()
    only_first[:, :, 1:] = 0  # the first latent frame sees the first frame alone
    assert torch.equal(vae.encode(only_first)[0][:, :, 0], mean[:, :, 0])


def test_vae_rejects_shapes_it_cannot_round_trip():
    with pytest.raises(ConfigError, match="frames"):
        vm.VideoVAE(tiny(frames=8).model)
    with pytest.raises(ConfigError, match="powers"):
        vm.VideoVAE(tiny(spatial_down=3).model)


def test_psnr_whole_frame_and_box():
    x = -torch.ones(1, 1, 2, 8, 8)
    x[..., 2:4, 2:6] = 1.0  # a lit 2x4 box
    y = x.clone()
    y[..., 2:4, 2:6] = 0.8  # error 0.1 on [0, 1] pixels inside the box only
    assert vm.psnr_frames(y, x).item() == pytest.approx(10 * np.log10(1 / (0.01 * 8 / 64)), abs=1e-3)
    assert vm.psnr_frames(y, x, box=True).item() == pytest.approx(20.0, abs=1e-3)


def test_vae_learns_a_fixed_batch():
    torch.manual_seed(0)
    cfg = tiny()
    vae = vm.VideoVAE(cfg.model)
    (x,) = vd.build_clip_data(cfg).next_batch()
    x = x[:2]
    opt = torch.optim.AdamW(vae.parameters(), lr=3e-3)
    first = vae(x).item()
    for _ in range(12):
        loss = vae(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


# ---- DiT -----------------------------------------------------------------------------------------------
def test_rope_3d_rotates_each_axis_and_keeps_norms():
    assert dm.rope_split(32) == (12, 10, 10) and dm.rope_split(12) == (4, 4, 4)
    cos, sin = dm.rope_3d((2, 3, 3), 12)
    assert cos.shape == (18, 6)
    q = torch.randn(1, 1, 18, 12)
    assert torch.allclose(dm.apply_rope(q, cos, sin).norm(dim=-1), q.norm(dim=-1), atol=1e-5)
    assert torch.equal(cos[0], torch.ones(6))  # position (0, 0, 0) is not rotated
    # moving one step in time rotates only the time slice (the first 2 pairs)
    assert not torch.allclose(cos[9, :2], cos[0, :2]) and torch.equal(cos[9, 2:], cos[0, 2:])


def vae_run(tmp_path, cfg):
    run = tmp_path / "vae"
    (run / "checkpoints" / "step_00000001").mkdir(parents=True)
    torch.manual_seed(1)
    state = {k: v.contiguous() for k, v in vm.VideoVAE(cfg.model).state_dict().items()}
    save_file(state, str(run / "checkpoints" / "step_00000001" / "model.safetensors"))
    (run / "config.json").write_text(json.dumps(cfg.to_dict()))
    return run, state


def test_dit_loads_a_frozen_vae_and_trains_only_itself(tmp_path):
    cfg = tiny()
    run, state = vae_run(tmp_path, cfg)
    dit_cfg = tiny(vae_run=str(run))
    model = dm.VideoDiT(dit_cfg.model)
    assert torch.equal(model.vae.conv_in.weight, state["conv_in.weight"])
    assert not any(p.requires_grad for p in model.vae.parameters())
    clips, ids = vd.build_text_clip_data(dit_cfg).next_batch()
    z = model.encode(clips)
    assert z.shape == (4, 4, 3, 4, 4)
    assert torch.equal(model.unpatchify(model.patchify(z)), z)
    loss = model(model.vae.encode(clips)[0], ids)
    loss.backward()
    assert model.vae.conv_in.weight.grad is None and model.patch_in.weight.grad is not None
    with pytest.raises(ConfigError, match="VAE shape"):
        dm.VideoDiT(tiny(vae_run=str(run), z_channels=8).model)
    counted = dm.count_params(dit_cfg.model)
    data = vd.VideoLatentData(dit_cfg, pool=128)  # the DiT's training data: latents of a pool of clips
    assert data.latents.shape == (128, 4, 3, 4, 4) and data.ids.shape == (128, vd.TEXT_LEN)
    z, i = data.next_batch()
    state = data.state_dict()
    z2, _ = data.next_batch()
    data.load_state_dict(state)
    assert torch.equal(data.next_batch()[0], z2) and not torch.equal(z, z2)
    assert torch.allclose(model.normalise(data.latents).mean(dim=(0, 2, 3, 4)), torch.zeros(4), atol=0.3)
    assert counted["N"] == sum(p.numel() for p in model.parameters() if p.requires_grad) < counted["total"]


def test_dit_text_padding_and_empty_prompt():
    torch.manual_seed(0)
    model = dm.VideoDiT(tiny().model).eval()
    for p in model.parameters():  # leave the zero-initialised output layers: make the net depend on its inputs
        torch.nn.init.normal_(p, std=0.1) if p.requires_grad else None
    z, t = torch.randn(2, 4, 3, 4, 4), torch.tensor([0.3, 0.7])
    ids = vd.encode_prompts(["a 7 moving up", "a 7 moving up"])
    v1 = model.velocity(z, t, ids)
    assert torch.allclose(v1[0], model.velocity(z[:1], t[:1], ids[:1])[0], atol=1e-5)  # batch-independent
    v_other = model.velocity(z, t, vd.encode_prompts(["a 3 moving down", "a 3 moving down"]))
    assert not torch.allclose(v1, v_other)
    empty = model.velocity(z, t, vd.encode_prompts(["", ""]))
    assert torch.isfinite(empty).all()


def test_dit_sampler_is_seeded_and_shapes_clips():
    torch.manual_seed(0)
    model = dm.VideoDiT(tiny().model).eval()
    a = model.sample(["a 1 moving left", "a 2 moving up"], steps=3, cfg_scale=3.0, shift=2.0, seed=5)
    b = model.sample(["a 1 moving left", "a 2 moving up"], steps=3, cfg_scale=3.0, shift=2.0, seed=5)
    assert a.shape == (2, 9, 16, 16) and torch.equal(a, b) and a.min() >= 0 and a.max() <= 1


def test_zero_initialised_dit_predicts_zero_velocity():
    torch.manual_seed(0)
    model = dm.VideoDiT(tiny().model)
    z0 = torch.randn(3, 4, 3, 4, 4)
    assert torch.equal(model.velocity(z0, torch.rand(3), vd.encode_prompts(["a 1"] * 3)), torch.zeros_like(z0))
    gen = torch.Generator().manual_seed(0)
    loss = model.flow_loss(z0, vd.encode_prompts(["a 1"] * 3), gen)
    gen = torch.Generator().manual_seed(0)
    torch.sigmoid(torch.randn(3, generator=gen))
    noise = torch.randn(z0.shape, generator=gen)
    assert loss.item() == pytest.approx(((noise - z0) ** 2).mean().item(), rel=1e-6)


def test_dit_weight_average_follows_the_steps_and_swaps_back_exactly():
    torch.manual_seed(0)
    assert dm.VideoDiT(tiny().model).ema is None and not any(k.startswith("ema.") for k in dm.VideoDiT(tiny().model).state_dict())
    model = dm.VideoDiT(tiny(ema=0.75).model)
    w0 = model.patch_in.weight.detach().clone()
    assert torch.equal(model.state_dict()["ema.patch_in__weight"], w0)  # saved with the weights: resume stays exact
    assert not any(n.startswith("vae.") for n in model.ema.names)  # the frozen VAE is not averaged
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        model(torch.randn(2, 4, 3, 4, 4), vd.encode_prompts(["a 1", "a 2"])).backward()
        opt.step()
        opt.zero_grad()
        model.after_optimizer_step()
    w1, avg = model.patch_in.weight.detach().clone(), model.ema.patch_in__weight
    assert not torch.equal(w1, w0) and not torch.equal(avg, w1)
    with model.ema.swapped(model):
        assert torch.equal(model.patch_in.weight, avg)
    assert torch.equal(model.patch_in.weight, w1)  # the trained weights are back, bit for bit
    # by hand: ema_1 = 0.75 w0 + 0.25 w_a, ema_2 = 0.75 ema_1 + 0.25 w1; check the last step's update
    before = avg.clone()
    model.patch_in.weight.data.add_(1.0)
    model.after_optimizer_step()
    assert torch.allclose(model.ema.patch_in__weight, 0.75 * before + 0.25 * (w1 + 1.0), atol=1e-6)
    model.use_average()
    assert torch.equal(model.patch_in.weight, model.ema.patch_in__weight)


def test_dit_branch_keeps_its_own_vae_and_restarts_the_average(tmp_path):
    from steplab.errors import CheckpointError

    cfg = tiny()
    run_a, _ = vae_run(tmp_path / "a", cfg)
    run_b, state_b = vae_run(tmp_path / "b", cfg)
    state_b = {k: v + 0.01 for k, v in state_b.items()}  # another VAE (e.g. the same run trained further)
    save_file(state_b, str(run_b / "checkpoints" / "step_00000001" / "model.safetensors"))
    torch.manual_seed(1)
    parent = dm.VideoDiT(tiny(vae_run=str(run_a)).model)
    for p in parent.parameters():
        torch.nn.init.normal_(p, std=0.1) if p.requires_grad else None
    ckpt = tmp_path / "parent"
    ckpt.mkdir()
    save_file({k: v.contiguous() for k, v in parent.state_dict().items()}, str(ckpt / "model.safetensors"))
    torch.manual_seed(2)
    child = dm.VideoDiT(tiny(vae_run=str(run_b), ema=0.9).model)
    own_z = child.z_std.clone()
    child.load_branch_weights(ckpt)
    assert torch.equal(child.patch_in.weight, parent.patch_in.weight)  # the denoiser and text encoder: the parent's
    assert torch.equal(child.text.embed.weight, parent.text.embed.weight)
    assert torch.equal(child.vae.conv_in.weight, state_b["conv_in.weight"])  # the VAE: this run's own
    assert torch.equal(child.z_std, own_z) and not torch.equal(child.z_std, parent.z_std)
    assert torch.equal(child.ema.patch_in__weight, parent.patch_in.weight)  # the average restarts at the branch point
    with pytest.raises(CheckpointError, match="not a DiT of this shape"):
        dm.VideoDiT(tiny(vae_run=str(run_b), dit_dim=36, dit_heads=3).model).load_branch_weights(ckpt)


# ---- probes and Frechet distance -----------------------------------------------------------------------
def test_frechet_distance_values():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    assert ev.frechet(a, a) == pytest.approx(0.0, abs=1e-6)
    shifted = a + np.array([1.0, 2.0, 0.0])
    assert ev.frechet(shifted, a) == pytest.approx(5.0, abs=1e-6)
    wide = rng.normal(size=(4000, 3)) * 2  # (2 - 1)^2 per dim
    assert ev.frechet(wide, a) == pytest.approx(3.0, abs=0.3)


def test_shuffle_time_keeps_frames_and_breaks_order():
    clips = torch.arange(2 * 9 * 4.0).view(2, 9, 2, 2)
    s = ev.shuffle_time(clips, seed=0)
    assert not torch.equal(s, clips)
    for i in range(2):
        assert sorted(s[i, :, 0, 0].tolist()) == sorted(clips[i, :, 0, 0].tolist())


def test_judge_counts_right_answers():
    probe = ev.Probe().eval()
    clips = torch.rand(3, 9, 16, 16)
    d_logits, k_logits, _ = probe(clips)
    out = ev.judge(probe, clips, d_logits.argmax(-1), k_logits.argmax(-1))
    assert out["digit_acc"] == 1.0 and out["direction_acc"] == 1.0
    fixed = clips[:, :1].expand(-1, 9, -1, -1)  # one frame repeated: every frame gets the same digit
    assert ev.judge(probe, fixed, d_logits.argmax(-1), k_logits.argmax(-1))["frame_consistency"] == 1.0



def test_jittered_crops_are_shifted_windows_of_the_centred_crop():
    frames = torch.zeros(3, 32, 32)
    frames[:, 10:22, 8:20] = torch.rand(3, 12, 12) + 0.1  # a 12x12 "digit"
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(ev.jittered_crops(frames, 0, gen), ev.centre_crops(frames))
    big = ev.centre_crops(frames, ev.CROP + 4)[:, 0]
    crops = ev.jittered_crops(frames, 2, gen)[:, 0]
    assert crops.shape == (3, ev.CROP, ev.CROP)
    for c, b in zip(crops, big):  # each crop is one of the 5 x 5 windows of the wider centred crop
        assert any(torch.equal(c, b[dy:dy + ev.CROP, dx:dx + ev.CROP]) for dy in range(5) for dx in range(5))
    assert all(torch.isclose(c.sum(), b.sum()) for c, b in zip(crops, big))  # the whole digit stays inside


def test_probe_learns_digits_from_real_frames_only():
    from steplab.config import VideoConfig

    v = VideoConfig(frames=9)  # 12x12 digits as in the real probe, shorter clips
    probe = ev.train_probe(v, steps=120, dir_steps=2, frame_batch=32, seed=0)
    clips, digits, dirs = ev.real_clips(v, 64, 5, "heldout")  # held-out digit images
    acc = ev.judge(probe, clips, digits, dirs)["digit_acc"]
    assert acc > 0.6, acc  # chance is 0.1; 120 steps give 0.84 (the real probe: 1,500 steps, 99.6%)


def test_presets_build():
    for name in ("stepvideo-vae-nano", "stepvideo-dit-nano"):
        cfg = preset(name).validate()
        assert cfg.model.video.spatial_down == 4 and cfg.model.video.temporal_down == 4


# ---- through the one trainer ---------------------------------------------------------------------------
def _losses(run_dir) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def _video_cfg(name: str, **video) -> RunConfig:
    from steplab.config import resolve

    shape = dict(frames=9, size=16, digit_size=6, channels=8, z_channels=4, dit_dim=24, dit_heads=2, dit_layers=1,
                 text_layers=1, latent_pool=32, **video)
    return resolve(name, overrides=[f"model.video.{k}={v}" for k, v in shape.items()] + [
        "train.max_steps=4", "train.ckpt_every=2", "train.eval_every=2", "train.eval_batches=1", "train.batch_size=2",
        "train.keep_last=0", "train.threads=1", "train.device=cpu", "train.warmup_steps=1"])


def test_vae_and_dit_train_and_resume_exactly_through_the_trainer(tmp_path):
    import shutil

    from steplab.infer.video import load_video_run
    from steplab.train.trainer import train

    vae = train(_video_cfg("stepvideo-vae-nano"), tmp_path / "vae", progress=False)
    assert {"val_loss", "val_psnr", "val_psnr_box"} <= set(vae)
    dit_cfg = _video_cfg("stepvideo-dit-nano", vae_run=tmp_path / "vae", ema=0.5)
    full = train(dit_cfg, tmp_path / "dit", progress=False)
    shutil.copytree(tmp_path / "dit", tmp_path / "part")
    shutil.rmtree(tmp_path / "part" / "checkpoints" / "step_00000004")  # killed between steps 2 and 4
    from steplab.train.metrics import peak_flops

    peak_flops.cache_clear()  # as in a fresh process: measuring the peak must not move the restored RNG
    resumed = train(dit_cfg, tmp_path / "part", resume=True, progress=False)
    assert len(_losses(tmp_path / "dit")) == 4 and _losses(tmp_path / "part") == _losses(tmp_path / "dit")
    assert resumed["val_loss"] == full["val_loss"] and resumed["val_loss_ema"] == full["val_loss_ema"] != full["val_loss"]
    _, raw = load_video_run(tmp_path / "dit", average=False)
    _, model = load_video_run(tmp_path / "dit")  # self-contained: the VAE and latent statistics are in the checkpoint
    assert torch.equal(model.patch_in.weight, raw.ema.patch_in__weight) and not torch.equal(model.patch_in.weight, raw.patch_in.weight)
    branch_cfg = _video_cfg("stepvideo-dit-nano", vae_run=tmp_path / "vae", ema=0.5)
    branch_cfg.train.init_from, branch_cfg.train.max_steps, branch_cfg.train.lr = str(tmp_path / "dit"), 1, 1e-9
    train(branch_cfg, tmp_path / "branch", progress=False)  # through the family's load_branch_weights
    _, child = load_video_run(tmp_path / "branch", average=False)
    assert torch.allclose(child.patch_in.weight, raw.patch_in.weight, atol=1e-7)  # started at the parent's weights
    assert not torch.allclose(child.patch_in.weight, raw.ema.patch_in__weight, atol=1e-6)  # not its average
    shutil.rmtree(tmp_path / "vae")
    _, again = load_video_run(tmp_path / "dit")
    assert torch.equal(again.z_std, model.z_std) and torch.equal(again.sample(["a 1"], steps=2), model.sample(["a 1"], steps=2))


def test_sample_verb_writes_a_gif_and_refuses_other_formats(tmp_path, capsys):
    import imageio.v3 as iio

    from steplab.cli import main

    cfg = tiny()
    cfg.model.family = "video-dit"
    torch.manual_seed(0)
    run = tmp_path / "dit"
    (run / "checkpoints" / "step_00000001").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in dm.VideoDiT(cfg.model).state_dict().items()},
              str(run / "checkpoints" / "step_00000001" / "model.safetensors"))
    (run / "config.json").write_text(json.dumps(cfg.to_dict()))
    out = tmp_path / "clip.gif"
    assert main(["sample", str(run), "--prompt", "a 1 moving up", "--out", str(out), "--steps", "2", "-n", "2"]) == 0
    for i in (1, 2):
        frames = iio.imread(tmp_path / f"clip-{i}.gif", index=None)
        assert frames.shape[:3] == (9, 64, 64)
    assert main(["sample", str(run), "--prompt", "a 1", "--out", str(tmp_path / "clip.avi")]) == 2
    assert "must end in .gif or .mp4" in capsys.readouterr().err
    assert main(["sample", str(run), "--prompt", "a 1"]) == 2  # a video run needs --out
    assert "pass --out" in capsys.readouterr().err


def test_centre_crops_follow_the_digit():
    gen = torch.Generator().manual_seed(1)
    clips = vd.sample_clips(gen, 4, frames=17, size=32, digit_size=12)[0]
    crops = ev.centre_crops(clips[:, 0])
    assert crops.shape == (4, 1, ev.CROP, ev.CROP)
    assert torch.allclose(crops.sum((1, 2, 3)), clips[:, 0].sum((1, 2)))  # the whole digit is inside the window
    assert torch.equal(ev.centre_crops(torch.zeros(1, 32, 32)), torch.zeros(1, 1, ev.CROP, ev.CROP))
