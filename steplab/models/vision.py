"""Step-1V: a vision-language model. Reads top to bottom: ViT encoder -> projector -> Step-1 decoder -> accounting.

Layout (LLaVA's): image (B, 3, H, W) -> patch embedding (a stride-p convolution) + fixed 2D sin-cos positions ->
n_layer x [LayerNorm -> bidirectional attention -> residual, LayerNorm -> GELU MLP -> residual] -> LayerNorm
-> pixel shuffle (s x s neighbouring patches concatenated into one vector: s^2 fewer image tokens, as in
nanoVLM/Idefics3) -> MLP projector into the decoder's width -> the Step-1 decoder (models/dense.py, unchanged),
which reads the image tokens at the image's place in the conversation: at the start of the user's message
(LLaVA's order) or, in the step1v presets, after its text (``vision.image_place="end"``), so every image token
can attend to the question; and a *slot loss* (``vision.slot_loss``, :meth:`Step1V.slot_loss`) trains the
decoder's output at image token k to name the words of grid cell k. Without both, the decoder never learned to
look anything up in the image (docs/LOG.md, issue 19).

Where an image goes: the token sequence holds ``cfg.vision.n_tokens`` image *slots* per image, marked by the
``<|pad|>`` id (``IMAGE_SLOT``); the decoder's embedding of those positions is replaced by the projected image
features, in order. ``<|pad|>`` is a control id that plain text can never produce (steplab's tokenizer encodes
user text as bytes), so a prompt cannot forge or misplace an image slot.

The trainer's interface: ``model(idx, targets, images)`` returns the mean cross-entropy over targets != -100
(assistant-only loss: the data sets every other target to -100); ``eval_metrics(batches)`` adds the exact-match
rate of the answers under teacher forcing, which equals greedy decoding's exact match (greedy reproduces a target
exactly iff every target token, the closing <|end|> included, is the argmax given the ones before it).
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from steplab.config import ModelConfig, VisionConfig
from steplab.models import dense
from steplab.models.common import masked_cross_entropy

IMAGE_SLOT = 2  # the <|pad|> id (steplab.data.tokenizer.SPECIAL_TOKENS): one per image token


def sincos_2d(side: int, dim: int) -> torch.Tensor:
    """(side*side, dim) fixed position codes: half the channels encode the row, half the column (MAE's)."""
    quarter = dim // 4
    freq = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    pos = torch.arange(side, dtype=torch.float32)[:, None] * freq[None]  # (side, quarter)
    one = torch.cat([pos.sin(), pos.cos()], dim=1)  # (side, dim/2)
    rows = one[:, None, :].expand(side, side, dim // 2)
    cols = one[None, :, :].expand(side, side, dim // 2)
    return torch.cat([rows, cols], dim=-1).reshape(side * side, dim)


class ViTBlock(nn.Module):
    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.norm1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, T, 3, self.n_head, D // self.n_head).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)  # every patch sees every patch: no causal mask
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, D))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, v: VisionConfig):
        super().__init__()
        self.side = v.image_size // v.patch_size
        self.patch = nn.Conv2d(3, v.d_model, kernel_size=v.patch_size, stride=v.patch_size)
        self.register_buffer("pos", sincos_2d(self.side, v.d_model), persistent=False)
        self.blocks = nn.ModuleList(ViTBlock(v.d_model, v.n_head) for _ in range(v.n_layer))
        self.norm = nn.LayerNorm(v.d_model)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) floats in [0, 1] -> (B, side*side, d) patch features in row-major order.

        Pixels go in unshifted: a black patch embeds to the bias alone, so the empty background adds no large
        component shared by every token (with [-1, 1] inputs it dominated the image tokens, see docs/LOG.md)."""
        x = self.patch(images).flatten(2).transpose(1, 2) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class Projector(nn.Module):
    """Pixel shuffle, then a 2-layer GELU MLP into the decoder's width (LLaVA-1.5's projector)."""

    def __init__(self, v: VisionConfig, d_out: int):
        super().__init__()
        self.s, self.side = v.pixel_shuffle, v.image_size // v.patch_size
        hidden = v.projector_hidden or d_out
        self.mlp = nn.Sequential(nn.Linear(v.d_model * self.s ** 2, hidden), nn.GELU(), nn.Linear(hidden, d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, D = x.shape
        s, n = self.s, self.side // self.s
        # (B, side, side, D) -> (B, n, s, n, s, D) -> (B, n, n, s, s, D): each s x s block of patches in one row
        x = x.view(B, n, s, n, s, D).permute(0, 1, 3, 2, 4, 5).reshape(B, n * n, s * s * D)
        return self.mlp(x)


class Step1V(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vision.image_size <= 0:
            raise ValueError("Step-1V needs model.vision.image_size > 0 (use the step1v-nano/micro presets)")
        self.cfg = cfg
        self.vision = ViT(cfg.vision)
        self.projector = Projector(cfg.vision, cfg.d_model)
        self.decoder = dense.Step1(cfg)
        self.vision.apply(_init_vit)
        self.projector.apply(_init_vit)
        for part, frozen in ((self.vision, cfg.vision.freeze_encoder), (self.decoder, cfg.vision.freeze_decoder)):
            part.requires_grad_(not frozen)

    @property
    def layers(self) -> list[nn.Module]:
        """The blocks FSDP2 shards one by one (train/distributed.py): the ViT's, then the decoder's."""
        return [*self.vision.blocks, *self.decoder.layers]

    def lr_multipliers(self) -> dict[str, float]:
        """Parameter-name prefix -> lr multiplier (steplab.train.optim puts each prefix in its own group)."""
        return {"projector.": self.cfg.vision.projector_lr_mult}

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, n_tokens, d_model) image tokens in the decoder's embedding space."""
        v = self.cfg.vision
        if images.shape[1:] != (3, v.image_size, v.image_size):
            raise ValueError(f"images must be (N, 3, {v.image_size}, {v.image_size}), got {tuple(images.shape)}")
        return self.projector(self.vision(images))

    def embed(self, idx: torch.Tensor, images: torch.Tensor | None, *, zero_images: bool = False) -> torch.Tensor:
        """Token embeddings of ``idx`` with the image slots filled by ``images``' tokens, image after image.

        ``images`` is (n_images, 3, H, W) for all the rows together (row-major: row 0's images first) or
        (B, 3, H, W) with one image per row. ``zero_images`` puts zero vectors in the slots (an ablation)."""
        x = self.decoder.tok_emb(idx)
        slots = idx == IMAGE_SLOT
        n_slots = int(slots.sum())
        if n_slots == 0:
            return x
        if images is None:
            raise ValueError(f"the sequence has {n_slots} image slots but no images were given")
        feats = self.encode_images(images).to(x.dtype).reshape(-1, x.shape[-1])
        if feats.shape[0] != n_slots:
            raise ValueError(f"{n_slots} image slots but {images.shape[0]} images x {self.cfg.vision.n_tokens} tokens = "
                             f"{feats.shape[0]}")
        if zero_images:
            feats = torch.zeros_like(feats)
        return x.masked_scatter(slots[..., None], feats)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, images: torch.Tensor | None = None,
                slot_targets: torch.Tensor | None = None, *, cache=None, slots: torch.Tensor | None = None,
                embeds: torch.Tensor | None = None) -> torch.Tensor:
        """As Step1.forward (logits, or the loss with ``targets``); ``images`` fill the sequence's image slots.
        With ``targets``, ``slot_targets`` (the data's: (n_images, n_tokens, K) token ids, -100 padded) and
        ``vision.slot_loss`` > 0 the loss adds that weight times :meth:`slot_loss`. A prompt's ``embeds`` (from
        :meth:`embed`) may come in chunks with a KV cache (the serving engine)."""
        if embeds is None and images is not None:
            embeds = self.embed(idx, images)
        w = self.cfg.vision.slot_loss
        if targets is None or slot_targets is None or w == 0:
            return self.decoder(idx, targets, cache=cache, slots=slots, embeds=embeds)
        logits = self.decoder(idx, None, embeds=embeds)
        return masked_cross_entropy(logits, targets) + w * self.slot_loss(logits[idx == IMAGE_SLOT], slot_targets)

    @staticmethod
    def slot_loss(slot_logits: torch.Tensor, slot_targets: torch.Tensor) -> torch.Tensor:
        """The decoder's output at each image token (``slot_logits``: (n_images * n_tokens, vocab), in sequence
        order) read as the words of that token's grid cell: per token, the summed cross-entropy of each target
        word (the softmax spreads over them), averaged over the tokens that have targets.

        Why: a decoder that has to learn its lookups and what projected pixels mean at the same time never
        learned them in 3,000+ steps (docs/LOG.md, session 7). With each image token trained to name its cell
        ("red", "circle", "top", "left"), the decoder holds, at the image's places, the words a question is
        matched against and an answer copies (shape and position lookups from ~600 steps, session 9). The
        targets are the caption's words placed at the cell they describe: a dense, grounded caption."""
        logp = slot_logits.float().log_softmax(-1)
        t = slot_targets.reshape(logp.shape[0], -1)
        valid = t != -100
        nll = -logp.gather(1, t.clamp(min=0)) * valid
        return nll.sum() / valid.any(1).sum().clamp(min=1)

    @torch.no_grad()
    def eval_metrics(self, batches: Iterable[tuple[torch.Tensor, ...]]) -> dict[str, float]:
        """val_loss (mean over answer tokens) and answer_acc: the share of rows whose answer greedy decoding
        reproduces exactly (every answer token is the argmax, teacher-forced)."""
        loss_sum, n_tok, right, rows = 0.0, 0, 0, 0
        device = next(self.parameters()).device
        for batch in batches:
            idx, targets, images = (t.to(device) for t in batch[:3])  # the slot targets are not evaluated
            logits = self(idx, None, images).float()
            mask = targets != -100
            loss_sum += F.cross_entropy(logits[mask], targets[mask], reduction="sum").item()
            n_tok += int(mask.sum())
            ok = (logits.argmax(-1) == targets) | ~mask
            right += int(ok.all(dim=1).sum())
            rows += idx.shape[0]
        return {"val_loss": loss_sum / max(n_tok, 1), "val_answer_acc": right / max(rows, 1)}


def _init_vit(m: nn.Module) -> None:
    if isinstance(m, (nn.Linear, nn.Conv2d)):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


# ---- accounting -----------------------------------------------------------------------------------------

def count_params(cfg: ModelConfig) -> dict[str, int]:
    """N = the decoder's N (Step Law's count, models/dense.py) + the ViT's and projector's weight matrices (every
    image token passes through them); embedding as for Step-1; total = every parameter, biases and norms included."""
    v, d = cfg.vision, cfg.d_model
    text = dense.count_params(cfg)
    dv, hidden = v.d_model, v.projector_hidden or d
    vit = v.n_layer * 12 * dv * dv + 3 * v.patch_size ** 2 * dv  # qkv + proj + 4x MLP, and the patch convolution
    proj = dv * v.pixel_shuffle ** 2 * hidden + hidden * d
    small = v.n_layer * 13 * dv + dv + 2 * dv + hidden + d  # biases and LayerNorms: per block, conv bias, final norm, MLP
    N = text["N"] + vit + proj
    return {"N": N, "N_active": N, "embedding": text["embedding"], "total": text["total"] + vit + proj + small}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """Per decoder token, as for Step-1 with N including the vision side: the ViT runs on patches, not on text
    tokens, so this is an approximation (a 48-pixel image has 36 patches for its 9 image tokens)."""
    n = count_params(cfg)["N"]
    model = 6 * (n + cfg.d_model * cfg.vocab_size) + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * seq_len
    return {"6N": 6.0 * n, "model": float(model)}


def _register() -> None:
    from steplab.models import Family, register_family  # the package's registry (models/__init__.py)

    register_family("step1v", lambda: Family("step1v", Step1V, count_params, flops_per_token))


_register()
