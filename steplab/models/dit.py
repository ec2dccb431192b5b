"""Step-Video's DiT, small: a rectified-flow transformer over video-VAE latents, conditioned on text.

Read top to bottom: 3D RoPE -> attention (QK-norm) -> text encoder -> DiT block (AdaLN-single) -> the model
(patchify, frozen VAE, flow-matching loss) -> the Euler sampler with classifier-free guidance and time shift.

What follows Step-Video-T2V (arXiv 2502.10248), scaled down: full 3D self-attention over every latent patch
of every latent frame, 3D RoPE (head dims split between time, height and width), QK-norm, AdaLN-single (one
timestep MLP shared by all blocks plus a learned per-block table, PixArt-alpha style), text through
cross-attention, rectified-flow training (x_t = (1 - t) x_0 + t noise, predict noise - x_0) with logit-normal
t, Euler sampling with CFG and a time shift. The text encoder is a small transformer over a word vocabulary
(data/video.py), trained with the DiT from scratch; its mean-pooled output also joins the timestep
embedding (a single global vector that tells AdaLN which prompt it is).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from steplab.config import ModelConfig
from steplab.data.video import TEXT_LEN, VOCAB, encode_prompts
from steplab.errors import ConfigError
from steplab.models.video import VideoVAE, check_shape, load_vae_run


# ---- 3D RoPE -------------------------------------------------------------------------------------------
def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Head dims given to (time, height, width): height and width equal, time takes the rest; all even."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rope_3d(grid: tuple[int, int, int], head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (T*H*W, head_dim / 2): each axis rotates its own slice of the head by its position."""
    axes = [torch.arange(n, dtype=torch.float32) for n in grid]
    pos = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).view(-1, 3)
    angles = []
    for a, dim in enumerate(rope_split(head_dim)):
        freqs = base ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim)
        angles.append(pos[:, a:a + 1] * freqs)
    ang = torch.cat(angles, dim=-1)
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, heads, L, D): rotate pairs (x[2i], x[2i+1]) by the position's angle."""
    x1, x2 = x.float()[..., 0::2], x.float()[..., 1::2]
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
    return out.type_as(x)


# ---- attention -----------------------------------------------------------------------------------------
class Attention(nn.Module):
    """Multi-head attention with QK-norm (RMSNorm on queries and keys, which keeps logits bounded)."""

    def __init__(self, dim: int, heads: int, cross: bool = False):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.q_norm, self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6), nn.RMSNorm(self.head_dim, eps=1e-6)
        self.out = nn.Linear(dim, dim, bias=False)
        self.cross = cross

    def forward(self, x: torch.Tensor, ctx: torch.Tensor | None = None, rope=None, key_mask=None) -> torch.Tensor:
        b, n, d = x.shape
        ctx = x if ctx is None else ctx
        q = self.q(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(ctx).view(b, ctx.shape[1], 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(b, n, d))


def mlp(dim: int, mult: int = 4) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, mult * dim), nn.GELU(approximate="tanh"), nn.Linear(mult * dim, dim))


# ---- text encoder --------------------------------------------------------------------------------------
class TextEncoder(nn.Module):
    """Words -> contextual vectors. A learned first token is always present, so the empty prompt (CFG's
    unconditional branch) still has one key to attend to."""

    def __init__(self, dim: int, heads: int, layers: int):
        super().__init__()
        self.embed = nn.Embedding(len(VOCAB), dim)
        self.pos = nn.Parameter(torch.randn(TEXT_LEN + 1, dim) * 0.02)
        self.first = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(n1=nn.LayerNorm(dim), attn=Attention(dim, heads),
                                                       n2=nn.LayerNorm(dim), mlp=mlp(dim))) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(tokens (B, 1+L, d), key mask (B, 1+L) bool, pooled (B, d): the mean over the real tokens)."""
        b = ids.shape[0]
        x = torch.cat([self.first.expand(b, -1, -1), self.embed(ids)], dim=1) + self.pos
        keep = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=ids.device), ids != 0], dim=1)
        for blk in self.blocks:
            x = x + blk["attn"](blk["n1"](x), key_mask=keep)
            x = x + blk["mlp"](blk["n2"](x))
        x = self.norm(x)
        pooled = (x * keep[..., None]).sum(1) / keep.sum(1, keepdim=True)
        return x, keep, pooled


# ---- DiT block -----------------------------------------------------------------------------------------
def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of t in [0, 1] (scaled by 1000, as DiT's integer timesteps were)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    ang = 1000.0 * t.float()[:, None] * freqs
    return torch.cat([ang.cos(), ang.sin()], dim=-1)


class DiTBlock(nn.Module):
    """x + gate * SelfAttn(modulate(norm x)); x + CrossAttn(norm x, text); x + gate * MLP(modulate(norm x))."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.n1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.n_cross = nn.LayerNorm(dim, eps=1e-6)
        self.cross = Attention(dim, heads, cross=True)
        self.n2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = mlp(dim)
        self.table = nn.Parameter(torch.randn(6, dim) / dim ** 0.5)  # AdaLN-single: per-block offset

    def forward(self, x, mod, text, text_mask, rope):
        sh1, sc1, g1, sh2, sc2, g2 = (mod + self.table[None]).unbind(1)  # each (B, d)
        x = x + g1[:, None] * self.attn(self.n1(x) * (1 + sc1[:, None]) + sh1[:, None], rope=rope)
        x = x + self.cross(self.n_cross(x), ctx=text, key_mask=text_mask)
        return x + g2[:, None] * self.mlp(self.n2(x) * (1 + sc2[:, None]) + sh2[:, None])


# ---- weight average ------------------------------------------------------------------------------------
class WeightEMA(nn.Module):
    """An exponential moving average of a model's trainable weights, ema <- decay * ema + (1 - decay) * w after
    every optimizer step. Diffusion samples are usually much better from the average than from the last step.

    The averages are buffers, so they are saved in every checkpoint with the weights: resume stays exact and a
    checkpoint alone samples with them. (Under FSDP the weights are sharded and these buffers are not: single
    process only.)
    """

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        self.decay = decay
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        for n in self.names:
            self.register_buffer(n.replace(".", "__"), params[n].detach().clone())

    def averages(self, model: nn.Module):
        params = dict(model.named_parameters())
        return [(params[n], getattr(self, n.replace(".", "__"))) for n in self.names]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for p, avg in self.averages(model):
            avg.lerp_(p.detach(), 1.0 - self.decay)

    @torch.no_grad()
    def reset(self, model: nn.Module) -> None:
        for p, avg in self.averages(model):
            avg.copy_(p.detach())

    @contextlib.contextmanager
    def swapped(self, model: nn.Module):
        """Inside: the model's weights are the averages; after: the trained weights again, bit for bit."""
        pairs = self.averages(model)
        saved = [p.detach().clone() for p, _ in pairs]
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for (p, _), w in zip(pairs, saved):
                    p.copy_(w)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """The model's trainable weights := their averages."""
        for p, avg in self.averages(model):
            p.copy_(avg)


# ---- the model -----------------------------------------------------------------------------------------
class VideoDiT(nn.Module):
    """Text-to-video flow model over a frozen video VAE's latents (family ``video-dit``).

    The VAE (weights from ``video.vae_run``) lives inside as a frozen submodule, so a DiT run's checkpoint
    carries everything sampling needs; so do the latent statistics (``z_mean``, ``z_std``) that scale the
    latents to unit variance, measured once on training clips when the DiT is first built.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        v = self.v = cfg.video
        check_shape(v)
        if v.dit_dim % v.dit_heads or (v.dit_dim // v.dit_heads) % 2 or v.dit_dim // v.dit_heads < 6:
            raise ConfigError(f"model.video.dit_dim={v.dit_dim} / dit_heads={v.dit_heads} must give an even head dim >= 6 (3D RoPE)")
        lat = v.size // v.spatial_down
        if lat % v.patch:
            raise ConfigError(f"model.video.patch={v.patch} must divide the latent side size/spatial_down={lat}")
        self.grid = (1 + (v.frames - 1) // v.temporal_down, lat // v.patch, lat // v.patch)
        self.vae = VideoVAE(cfg).requires_grad_(False)
        self.register_buffer("z_mean", torch.zeros(1, v.z_channels, 1, 1, 1))
        self.register_buffer("z_std", torch.ones(1, v.z_channels, 1, 1, 1))
        d, p = v.dit_dim, v.patch
        self.patch_in = nn.Linear(v.z_channels * p * p, d)
        self.text = TextEncoder(d, v.dit_heads, v.text_layers)
        self.t_mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.pool_proj = nn.Linear(d, d)
        self.adaln = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))  # the single AdaLN MLP shared by all blocks
        self.blocks = nn.ModuleList(DiTBlock(d, v.dit_heads) for _ in range(v.dit_layers))
        self.final_norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.final_mod = nn.Linear(d, 2 * d)
        self.patch_out = nn.Linear(d, v.z_channels * p * p)
        for lin in (self.adaln[1], self.final_mod, self.patch_out):  # start as the identity / zero velocity
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        cos, sin = rope_3d(self.grid, d // v.dit_heads)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        if v.vae_run:  # a new run: take the VAE's weights; a saved DiT's checkpoint holds them already
            self.vae.load_state_dict(load_vae_run(v.vae_run, cfg).state_dict())
            self._measure_latents()
        self.ema = WeightEMA(self, v.ema) if v.ema else None  # last: it averages every trainable weight above

    # the trainer's hooks: after each optimizer step; when a run branches from another (train.init_from)
    def after_optimizer_step(self) -> dict[str, float]:
        if self.ema is not None:
            self.ema.update(self)
        return {}

    # the parent's VAE and latent statistics stay behind: this run's latents come from its own vae_run
    OWN_KEYS = ("vae.", "z_mean", "z_std", "ema.")

    @torch.no_grad()
    def load_branch_weights(self, ckpt: str | Path) -> None:
        """Start from another DiT checkpoint's denoiser (and text encoder), keeping this run's VAE, latent
        statistics and weight average (restarted at the loaded weights). The parent may have been trained on
        another VAE's latents (e.g. an earlier checkpoint of the same VAE run): the DiT then adapts to these."""
        from safetensors.torch import load_file

        from steplab.errors import CheckpointError

        path = Path(ckpt) / "model.safetensors"
        if not path.is_file():
            raise CheckpointError(f"train.init_from: {path} is missing; pass a video-dit run or one of its checkpoints")
        theirs = {k: t for k, t in load_file(str(path)).items() if not k.startswith(self.OWN_KEYS)}
        mine = self.state_dict()
        wanted = {k: tuple(t.shape) for k, t in mine.items() if not k.startswith(self.OWN_KEYS)}
        got = {k: tuple(t.shape) for k, t in theirs.items()}
        if wanted != got:
            diff = sorted(set(wanted) ^ set(got)) or [k for k in wanted if wanted[k] != got[k]]
            raise CheckpointError(f"train.init_from: {ckpt} is not a DiT of this shape (first differences: {diff[:3]}); "
                                  "branch only from a video-dit run with the same dit_* and patch settings")
        self.load_state_dict({**mine, **theirs})
        if self.ema is not None:
            self.ema.reset(self)

    def use_average(self) -> "VideoDiT":
        """For sampling: replace the trained weights by their average (no-op without ``video.ema``)."""
        if self.ema is not None:
            self.ema.copy_to(self)
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        self.vae.eval()  # frozen: always the deterministic encoder/decoder
        return self

    @torch.no_grad()
    def _measure_latents(self, n: int = 256) -> None:
        from steplab.data.video import sample_clips

        v = self.v
        gen = torch.Generator().manual_seed(1234)
        clips = sample_clips(gen, n, frames=v.frames, size=v.size, digit_size=v.digit_size, source=v.source)[0]
        z = torch.cat([self.vae.encode(c.unsqueeze(1) * 2 - 1)[0] for c in clips.split(32)])
        self.z_mean.copy_(z.mean(dim=(0, 2, 3, 4), keepdim=True))
        self.z_std.copy_(z.std(dim=(0, 2, 3, 4), keepdim=True).clamp(min=1e-3))

    # latents <-> tokens
    def patchify(self, z: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = z.shape
        p = self.v.patch
        z = z.view(b, c, t, h // p, p, w // p, p).permute(0, 2, 3, 5, 1, 4, 6)
        return z.reshape(b, t * (h // p) * (w // p), c * p * p)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        (t, gh, gw), p, c = self.grid, self.v.patch, self.v.z_channels
        x = x.view(b, t, gh, gw, c, p, p).permute(0, 4, 1, 2, 5, 3, 6)
        return x.reshape(b, c, t, gh * p, gw * p)

    @torch.no_grad()
    def encode(self, clips: torch.Tensor) -> torch.Tensor:
        """Pixel clips (B, 1, T, H, W) in [-1, 1] -> normalised latents."""
        return self.normalise(self.vae.encode(clips)[0])

    def normalise(self, z: torch.Tensor) -> torch.Tensor:
        return (z.float() - self.z_mean) / self.z_std

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> clips (B, T, H, W) in [0, 1]."""
        x = self.vae.decode(z * self.z_std + self.z_mean).float()
        return ((x.squeeze(1) + 1) / 2).clamp(0, 1)

    def velocity(self, z: torch.Tensor, t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        text, text_mask, pooled = self.text(ids)
        c = self.t_mlp(timestep_embedding(t, self.v.dit_dim).to(z.dtype)) + self.pool_proj(pooled)
        mod = self.adaln(c).view(-1, 6, self.v.dit_dim)
        x = self.patch_in(self.patchify(z))
        rope = (self.rope_cos, self.rope_sin)
        for blk in self.blocks:
            x = blk(x, mod, text, text_mask, rope)
        shift, scale = self.final_mod(F.silu(c)).chunk(2, dim=-1)
        x = self.final_norm(x) * (1 + scale[:, None]) + shift[:, None]
        return self.unpatchify(self.patch_out(x))

    def flow_loss(self, z0: torch.Tensor, ids: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        """Rectified flow: x_t = (1 - t) z0 + t noise, t ~ logit-normal(0, 1); regress v = noise - z0."""
        b = z0.shape[0]
        t = torch.sigmoid(torch.randn(b, generator=gen))
        noise = torch.randn(z0.shape, generator=gen)
        tt = t.view(b, 1, 1, 1, 1)
        pred = self.velocity((1 - tt) * z0 + tt * noise, t, ids)
        return F.mse_loss(pred.float(), noise - z0)

    def forward(self, latents: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """latents: the VAE's posterior means (data kind video-latents encodes its pool once)."""
        z0 = self.normalise(latents)
        drop = torch.rand(ids.shape[0]) < self.v.cond_drop  # the empty prompt, so CFG has an unconditional model
        ids = torch.where(drop[:, None], torch.zeros_like(ids), ids)
        return self.flow_loss(z0, ids)

    @torch.no_grad()
    def eval_metrics(self, batches) -> dict[str, float]:
        """The flow loss on held-out prompts and images with fixed noise and t (comparable across steps)."""
        batches = list(batches)

        def loss() -> float:
            gen = torch.Generator().manual_seed(0)
            losses = [self.flow_loss(self.normalise(z), ids, gen).item() for z, ids in batches]
            return sum(losses) / len(losses)

        out = {"val_loss": loss()}
        if self.ema is not None:  # the same batches, noise and t with the averaged weights
            with self.ema.swapped(self):
                out["val_loss_ema"] = loss()
        return out

    @torch.no_grad()
    def sample(self, prompts: list[str], steps: int = 30, cfg_scale: float = 5.0, shift: float = 1.0,
               seed: int = 0) -> torch.Tensor:
        """Euler from noise (t = 1) to data (t = 0) -> clips (B, T, H, W) in [0, 1].

        Timesteps are spread evenly, then shifted, t' = s t / (1 + (s - 1) t), which spends more steps at high
        noise for s > 1 (Step-Video uses 13 at 540p; small latents need little). CFG: v = v_u + w (v_c - v_u).
        """
        b = len(prompts)
        ids = encode_prompts(prompts)
        both = torch.cat([ids, torch.zeros_like(ids)])
        gen = torch.Generator().manual_seed(seed)
        (t_lat, gh, gw), p = self.grid, self.v.patch
        x = torch.randn(b, self.v.z_channels, t_lat, gh * p, gw * p, generator=gen)
        ts = torch.linspace(1, 0, steps + 1)
        ts = shift * ts / (1 + (shift - 1) * ts)
        for i in range(steps):
            t = ts[i].expand(2 * b)
            v = self.velocity(torch.cat([x, x]), t, both).float()
            v_c, v_u = v.chunk(2)
            x = x + (ts[i + 1] - ts[i]) * (v_u + cfg_scale * (v_c - v_u))
        return self.decode(x)


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """N: the DiT and its text encoder (trained); the frozen VAE is counted in total only."""
    with torch.random.fork_rng(devices=[]):  # counting must not move the run's RNG
        m = VideoDiT(dataclasses.replace(cfg, video=dataclasses.replace(cfg.video, vae_run="")))  # shapes only
    n = sum(p.numel() for p in m.parameters() if p.requires_grad)
    return {"N": n, "N_active": n, "embedding": m.text.embed.weight.numel(), "total": sum(p.numel() for p in m.parameters())}


def flops_per_latent(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """Per latent element (the DiT's "token"); ``model`` counted on one forward of the velocity network."""
    from steplab.models.video import measured_flops

    with torch.random.fork_rng(devices=[]):
        m = VideoDiT(dataclasses.replace(cfg, video=dataclasses.replace(cfg.video, vae_run=""))).eval()
        (t, gh, gw), p = m.grid, cfg.video.patch
        z = torch.zeros(1, cfg.video.z_channels, t, gh * p, gw * p)
        flops = measured_flops(m.velocity, z, torch.zeros(1), encode_prompts(["a 0 moving up"]))
    n_tokens = t * gh * gw
    return {"6N": 6.0 * count_params(cfg)["N"] * n_tokens / z.numel(), "model": flops / z.numel()}


def _register() -> None:
    from steplab.models import Family, register_family

    register_family("video-dit", lambda: Family("video-dit", VideoDiT, count_params, flops_per_latent))


_register()
