"""Speech tokenizer nets: the acoustic stream's residual-VQ autoencoder over log-mel frames.

Encoder: log-mel at 100 Hz -> two stride-2 convolutions -> latent at 25 Hz (Step-Audio's acoustic-stream rate).
Quantiser: ``n_q`` residual codebooks (SoundStream/EnCodec RVQ) updated by exponential moving averages of the
vectors assigned to them (VQ-VAE-2), with dead codes restarted on random encoder outputs: no codebook loss to
balance, and no collapse on a small corpus. Decoder: the mirror image back to 100 Hz log-mel; the waveform comes
from Griffin-Lim (``data/speech.py``), not a neural vocoder.

Bitrate = 25 Hz x n_q x log2(codebook_size).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class CodecConfig:
    n_mels: int = 40
    dim: int = 128  # conv channels
    latent: int = 32  # quantised vector size
    n_q: int = 2  # residual codebooks
    codebook_size: int = 256
    decay: float = 0.95  # EMA of codebook statistics
    commitment: float = 0.25
    recon_loss: str = "mse"  # "mse" | "l1" (less over-smoothing of the mel; measured in docs/benchmarks.md, issue 20)


class ResidualVQ(nn.Module):
    """``n_q`` codebooks, each quantising what the previous ones left over."""

    def __init__(self, cfg: CodecConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.register_buffer("codebooks", torch.randn(cfg.n_q, cfg.codebook_size, cfg.latent) * 0.1)
        self.register_buffer("ema_count", torch.ones(cfg.n_q, cfg.codebook_size))
        self.register_buffer("ema_sum", self.codebooks.clone())

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """(N, latent) -> (N, n_q) codes."""
        codes, residual = [], z
        for q in range(self.cfg.n_q):
            c = torch.cdist(residual, self.codebooks[q]).argmin(dim=-1)
            codes.append(c)
            residual = residual - self.codebooks[q][c]
        return torch.stack(codes, dim=-1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(N, n_q) -> (N, latent): the sum of the chosen code vectors."""
        return sum(self.codebooks[q][codes[:, q]] for q in range(self.cfg.n_q))

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantise (straight-through) and, in training, update the codebooks; returns (z_q, commitment loss)."""
        codes = self.encode(z.detach())
        if self.training:
            self._ema_update(z.detach(), codes)
        zq = self.decode(codes)
        return z + (zq - z).detach(), F.mse_loss(z, zq.detach())

    @torch.no_grad()
    def _ema_update(self, z: torch.Tensor, codes: torch.Tensor) -> None:
        d, residual = self.cfg.decay, z
        for q in range(self.cfg.n_q):
            onehot = F.one_hot(codes[:, q], self.cfg.codebook_size).type_as(z)
            self.ema_count[q].mul_(d).add_(onehot.sum(0), alpha=1 - d)
            self.ema_sum[q].mul_(d).add_(onehot.T @ residual, alpha=1 - d)
            self.codebooks[q].copy_(self.ema_sum[q] / self.ema_count[q].clamp_min(1e-5)[:, None])
            dead = self.ema_count[q] < 1e-2  # unused for ~90 steps at decay 0.95: restart on real vectors
            if dead.any():
                pick = torch.randint(0, residual.size(0), (int(dead.sum()),), device=z.device)
                self.codebooks[q][dead] = residual[pick]
                self.ema_sum[q][dead] = residual[pick]
                self.ema_count[q][dead] = 1.0
            residual = residual - self.codebooks[q][codes[:, q]]


class AcousticCodec(nn.Module):
    """Normalised log-mel (B, T, n_mels), T a multiple of 4 -> codes (B, T/4, n_q) -> log-mel (B, T, n_mels)."""

    def __init__(self, cfg: CodecConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c = cfg.dim
        self.encoder = nn.Sequential(
            nn.Conv1d(cfg.n_mels, c, 3, padding=1), nn.GELU(),
            nn.Conv1d(c, c, 4, stride=2, padding=1), nn.GELU(),
            nn.Conv1d(c, c, 4, stride=2, padding=1), nn.GELU(),
            nn.Conv1d(c, c, 3, padding=1), nn.GELU(),
            nn.Conv1d(c, cfg.latent, 1),
        )
        self.rvq = ResidualVQ(cfg)
        self.decoder = nn.Sequential(
            nn.Conv1d(cfg.latent, c, 3, padding=1), nn.GELU(),
            nn.ConvTranspose1d(c, c, 4, stride=2, padding=1), nn.GELU(),
            nn.ConvTranspose1d(c, c, 4, stride=2, padding=1), nn.GELU(),
            nn.Conv1d(c, c, 3, padding=1), nn.GELU(),
            nn.Conv1d(c, cfg.n_mels, 3, padding=1),
        )

    def _latent(self, mel: torch.Tensor) -> torch.Tensor:
        return self.encoder(mel.transpose(1, 2)).transpose(1, 2)  # (B, T/4, latent)

    def forward(self, mel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training: (reconstruction, commitment loss)."""
        z = self._latent(mel)
        zq, commit = self.rvq(z.reshape(-1, z.size(-1)))
        return self.decoder(zq.view_as(z).transpose(1, 2)).transpose(1, 2), commit

    def loss(self, mel: torch.Tensor) -> torch.Tensor:
        recon, commit = self(mel)
        rec = F.l1_loss(recon, mel) if self.cfg.recon_loss == "l1" else F.mse_loss(recon, mel)
        return rec + self.cfg.commitment * commit

    @torch.no_grad()
    def encode(self, mel: torch.Tensor) -> torch.Tensor:
        z = self._latent(mel)
        return self.rvq.encode(z.reshape(-1, z.size(-1))).view(z.size(0), z.size(1), -1)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        zq = self.rvq.decode(codes.reshape(-1, codes.size(-1))).view(codes.size(0), codes.size(1), -1)
        return self.decoder(zq.transpose(1, 2)).transpose(1, 2)
