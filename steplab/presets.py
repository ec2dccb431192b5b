"""The presets: Step-family names with a size, each a layer of overrides on the dataclass defaults of
``steplab.config`` (``steplab.config.preset(name)`` builds one; a ``-8k``/``-16k``/``-32k`` suffix sets the
context length). Data only: this module imports nothing from steplab."""
from __future__ import annotations

from typing import Any

# Presets: Step-family names with a size. N is Step Law's non-embedding count (see models/dense.py).
PRESETS: dict[str, dict[str, Any]] = {
    "step1-nano": dict(model=dict(d_model=128, n_layer=4, n_head=4)),  # ~0.85M N: CPU smoke tests, quickstart
    "step1-micro": dict(model=dict(d_model=256, n_layer=6, n_head=4)),  # ~4.8M N
    "step1-mini": dict(model=dict(d_model=512, n_layer=8, n_head=8)),  # ~25.7M N: the CPU benchmark size
    # edge (issue 18): every matmul dim a multiple of 256 (with a 4096 vocabulary), so q8_0/q4_0 and K-quants fit
    "step1-edge": dict(model=dict(d_model=512, n_layer=8, n_head=8, n_kv_head=4, d_ff=1536)),
    "step1-125m": dict(model=dict(d_model=1024, n_layer=10, n_head=16, n_kv_head=4, max_seq_len=2048), data=dict(seq_len=2048)),
    "step1-350m": dict(model=dict(d_model=1024, n_layer=28, n_head=16, n_kv_head=4, max_seq_len=2048), data=dict(seq_len=2048)),
    "step1-1b": dict(model=dict(d_model=2048, n_layer=20, n_head=32, n_kv_head=8, max_seq_len=2048), data=dict(seq_len=2048)),
    # Step-2 (MoE): 8 fine-grained routed experts, top-2, plus 1 shared; d_expert ~ d_ff/3 of the same-named
    # step1 preset, so active N matches it (within 1%) and total N is ~2.35x. Sigmoid scores and a bias rate of
    # 1e-2 (DeepSeek-V3 uses 1e-3): at our learning rates the router collapses within ~10 steps and 1e-3 is too
    # slow to undo it (measured in docs/moe.md).
    "step2-nano": dict(model=dict(d_model=128, n_layer=4, n_head=4, moe=dict(n_experts=8, top_k=2, n_shared=1, d_expert=128, score="sigmoid", bias_update_rate=1e-2))),  # N_a ~0.86M, N ~2.0M
    "step2-micro": dict(model=dict(d_model=256, n_layer=6, n_head=4, moe=dict(n_experts=8, top_k=2, n_shared=1, d_expert=232, score="sigmoid", bias_update_rate=1e-2))),  # N_a ~4.8M, N ~11.2M
    "step2-mini": dict(model=dict(d_model=512, n_layer=8, n_head=8, moe=dict(n_experts=8, top_k=2, n_shared=1, d_expert=464, score="sigmoid", bias_update_rate=1e-2))),  # N_a ~25.5M, N ~59.7M
    # Step-1V (issue 19): 48x48 images; nano: 16x16 patches (one per cell of the drawn 3x3 grid) -> 9 image tokens;
    # micro: 8x8 patches (6x6) pixel-shuffled 2x2 -> 9 image tokens. Decoders: step1-nano / step1-micro. Images after
    # the question, the slot loss, lr 5e-4 (3e-3 trapped the decoder in "answer a colour that is present"; docs/LOG.md)
    "step1v-nano": dict(model=dict(family="step1v", d_model=128, n_layer=4, n_head=4, max_seq_len=64, vision=dict(
        image_size=48, patch_size=16, d_model=128, n_layer=2, n_head=4, pixel_shuffle=1, image_place="end", slot_loss=1.0)),
        data=dict(kind="vqa", path="vqa", seq_len=48), train=dict(lr=5e-4, warmup_steps=50, batch_size=32)),
    "step1v-micro": dict(model=dict(family="step1v", d_model=256, n_layer=6, n_head=4, max_seq_len=64, vision=dict(
        image_size=48, patch_size=8, d_model=192, n_layer=4, n_head=4, pixel_shuffle=2, image_place="end", slot_loss=1.0)),
        data=dict(kind="vqa", path="vqa", seq_len=48), train=dict(lr=5e-4, warmup_steps=50, batch_size=32)),
    # Step-Video (issue 21): 32x32 bouncing digits, 17 frames; VAE 4x4 spatial, 4x temporal -> 5x8x8x8 latents.
    # Step counts are the measured recipes of docs/benchmarks.md (issue 21, session 9): the VAE's digit box
    # PSNR was still rising at 4,000 steps; at 750 it was 19.9 dB.
    "stepvideo-vae-nano": dict(model=dict(family="video-vae", video=dict(channels=32, z_channels=8)),
                               data=dict(kind="video-clips", path="builtin"),
                               train=dict(batch_size=8, lr=2e-3, warmup_steps=20, weight_decay=0.0, max_steps=4000)),
    # DiT 0.97M N (with its text encoder) over 80 latent patches (5 x 4 x 4); fp32: on this CPU bf16 autocast made its backward slower
    "stepvideo-dit-nano": dict(model=dict(family="video-dit", video=dict(dit_dim=96, dit_layers=5, dit_heads=4, patch=2, text_layers=1,
                                                                         latent_pool=16384, ema=0.999)),
                               data=dict(kind="video-latents", path="builtin"),
                               train=dict(batch_size=16, lr=1e-3, warmup_steps=50, weight_decay=0.0, max_steps=5000,
                                          dtype="fp32")),
}
CONTEXT_VARIANTS = {"8k": 8192, "16k": 16384, "32k": 32768}
