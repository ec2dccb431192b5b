"""Typed run configuration: dataclasses, named presets, ``--set a.b=c`` overrides, TOML/JSON files.

A run is fully described by ``RunConfig`` (model + data + train). The resolved config is saved as
``config.json`` in every run directory, and ``RunConfig.from_dict`` reads it back, so a run can be
re-created or resumed from its directory alone. Validation happens here, before any work starts.
"""
from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steplab.errors import ConfigError

N_SPECIAL_TOKENS = 7  # <|bos|> <|eos|> <|pad|> <|system|> <|user|> <|assistant|> <|end|>
MIN_VOCAB = 256 + N_SPECIAL_TOKENS  # byte-level BPE needs every byte plus the special tokens


@dataclass
class MoEConfig:
    """Step-2 Mixture-of-Experts FFN; ``n_experts == 0`` means a dense (Step-1) model."""

    n_experts: int = 0  # routed experts per MoE layer
    top_k: int = 2  # routed experts per token
    n_shared: int = 0  # shared experts every token goes through
    d_expert: int = 0  # hidden size of each expert; 0: model.d_ff
    score: str = "softmax"  # router scores: softmax | sigmoid
    first_dense: int = 0  # the first k layers stay dense
    every: int = 1  # then every n-th layer is MoE
    bias_update_rate: float = 1e-3  # aux-loss-free balancing (DeepSeek-V3); 0 disables
    aux_loss_coef: float = 0.0  # optional sequence-level balance loss
    z_loss_coef: float = 0.0  # optional router z-loss


@dataclass
class RopeConfig:
    """RoPE context scaling (see models/rope.py); ``scaling="none"`` is plain RoPE and ignores the rest."""

    scaling: str = "none"  # none | linear (position interpolation) | dynamic (NTK) | yarn | llama3
    factor: float = 1.0  # s: the context grows s-fold over original_max_seq_len
    original_max_seq_len: int = 0  # the context the weights were trained at; 0: model.max_seq_len
    beta_fast: float = 32.0  # yarn: dims rotating more than this often over the original context are kept
    beta_slow: float = 1.0  # yarn: dims rotating less than this often are interpolated by 1/s
    attention_factor: float = 0.0  # yarn: cos/sin multiplier; 0: 0.1 ln s + 1 (the paper's temperature)
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3


@dataclass
class VisionConfig:
    """Step-1V image side (models/vision.py): a ViT over square RGB images and an MLP projector into the decoder.
    ``image_size == 0`` means no vision tower (a text model). Stage 1 of LLaVA's recipe trains the projector
    alone (``freeze_encoder`` and ``freeze_decoder``); stage 2 trains everything."""

    image_size: int = 0  # pixels per side; 0: no vision tower
    patch_size: int = 8
    d_model: int = 128  # ViT width
    n_layer: int = 2
    n_head: int = 4
    pixel_shuffle: int = 1  # s: s x s neighbouring patches become one image token (s^2 fewer tokens)
    projector_hidden: int = 0  # 0: the decoder's d_model
    # the projector's lr = train.lr x this. nanoVLM uses ~100x over *pretrained* backbones; here every part starts
    # from scratch, and 10x blew the projector's output up ~10^4-fold over the token embeddings (docs/LOG.md)
    projector_lr_mult: float = 1.0
    # where a message's image tokens go: "start" (LLaVA's order) or "end" (after the text, so each image token can
    # attend to the question); and the slot loss's weight (image token k is read, through the decoder's output head,
    # as the words of grid cell k). The defaults are the first session's model (old checkpoints load as they were);
    # the step1v presets use "end" and 1.0, without which the decoder never learned its lookups (docs/LOG.md)
    image_place: str = "start"
    slot_loss: float = 0.0
    freeze_encoder: bool = False
    freeze_decoder: bool = False

    @property
    def n_tokens(self) -> int:
        """Image tokens per image in the decoder's sequence."""
        side = self.image_size // self.patch_size // self.pixel_shuffle
        return side * side


@dataclass
class VideoConfig:
    """Step-Video (issue 21): the clip shape, the causal video VAE (family video-vae) and the DiT (video-dit).

    One block for both families: the DiT is trained on the latents of a finished VAE run (``vae_run``) and
    both need the clip shape the sampler must produce.
    """

    frames: int = 17  # 1 + k * temporal_down: the first frame is encoded on its own, the rest k-fold in time
    size: int = 32  # square canvas side in pixels
    digit_size: int = 12  # the 8x8 (or 28x28 MNIST) digit is resized to this
    source: str = "digits"  # digits (scikit-learn load_digits) | mnist (../shared/data/mnist)
    channels: int = 32  # VAE width at the lowest resolution (half of it at full resolution)
    z_channels: int = 8  # latent channels
    spatial_down: int = 4  # 1, 2, 4, 8, 16: each factor of 2 is one down block
    temporal_down: int = 4  # 1, 2, 4, 8: must not exceed spatial_down's block count
    kl_weight: float = 1e-4  # per-element KL against the per-element reconstruction MSE
    vae_run: str = ""  # video-dit: the VAE run directory whose latents the DiT learns
    dit_dim: int = 128
    dit_layers: int = 6
    dit_heads: int = 4
    patch: int = 2  # spatial patch over the latents (time patch 1)
    text_layers: int = 2  # the small text encoder's transformer layers
    cond_drop: float = 0.1  # the fraction of training prompts replaced by the empty prompt (for CFG)
    latent_pool: int = 4096  # video-latents: training clips encoded once by the VAE, batches drawn from them
    ema: float = 0.0  # video-dit: decay of an average of the DiT's weights kept for sampling (0: none)


@dataclass
class ModelConfig:
    """Step-1 decoder shape. Defaults follow the Llama layout so HF export is exact."""

    family: str = ""  # "": Step-1 dense, or Step-2 MoE when moe.n_experts > 0; else a registered family (models/__init__.py)
    vocab_size: int = 0  # 0: take it from the dataset's tokenizer
    d_model: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 0  # 0: same as n_head (multi-head attention); fewer: grouped-query attention
    d_ff: int = 0  # 0: SwiGLU default, 8/3 * d_model rounded up to a multiple of 64
    max_seq_len: int = 256
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    moe: MoEConfig = field(default_factory=MoEConfig)
    rope: RopeConfig = field(default_factory=RopeConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    doc_mask_token: int = -1  # >= 0: in training, attention stays inside the documents this token starts
    video: VideoConfig = field(default_factory=VideoConfig)  # issue 21: video-vae / video-dit families

    def __post_init__(self) -> None:
        if self.rope.scaling != "none" and self.rope.original_max_seq_len == 0:
            self.rope.original_max_seq_len = self.max_seq_len
        if self.n_kv_head == 0:
            self.n_kv_head = self.n_head
        if self.d_ff == 0:
            self.d_ff = -(-(8 * self.d_model // 3) // 64) * 64

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head


@dataclass
class ChatDataConfig:
    """Chat data (data kind "chat", ``steplab sft``; steplab/data/chat_data.py)."""

    mask: bool = True  # loss on assistant tokens only; false: on every token but padding (the masking ablation)
    field: str = "messages"  # JSONL field / Parquet or HF column holding the conversation
    skip_bad: bool = False  # skip (and count) bad rows instead of stopping at the first
    tokenizer: str = ""  # tokenizer directory; default: train.init_from's run tokenizer
    mix_path: str = ""  # a prepared pretraining dataset whose windows are mixed into every batch
    mix_fraction: float = 0.0  # share of each batch's rows taken from mix_path
    tasks: str = ""  # builtin data: task weights over BUILTIN_MIX's, e.g. "spelling=3,recall=3" (0 drops a task)


@dataclass
class DataConfig:
    kind: str = "tokens"  # what path holds: "tokens" (token shards) or a registered kind (train/data.py)
    path: str = ""  # tokens: a directory written by `steplab data prepare`; other kinds: what their builder reads
    seq_len: int = 256
    # PoSE (data/loader.py skip_positions): > 0 gives each training row position ids spread over this many
    # positions, so rows of seq_len train the relative distances of a longer context; 0: positions 0..seq_len-1
    pose_length: int = 0
    chat: ChatDataConfig = field(default_factory=ChatDataConfig)


@dataclass
class TrainConfig:
    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 200
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    schedule: str = "cosine"  # cosine | wsd | constant
    warmup_steps: int = 20
    decay_fraction: float = 0.2  # wsd: the last fraction of steps decays linearly
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    dtype: str = "auto"  # auto | bf16 (autocast, fp32 master weights) | fp32; auto: bf16 where native (train/precision.py)
    compile: str = "auto"  # auto | true | false; auto: torch.compile when the run repays it (train/compile.py)
    eval_every: int = 50
    eval_batches: int = 8
    ckpt_every: int = 50
    keep_last: int = 2
    log_every: int = 1
    seed: int = 0
    nan_policy: str = "stop"  # stop | skip: what to do when the loss is NaN/Inf
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # 0: torch default
    tensorboard: bool = False
    parallel: str = "auto"  # under torchrun: fsdp (default) | ddp; ignored in a single process
    init_from: str = ""  # a run directory (e.g. from `steplab import hf`) whose weights start this run
    # init_state: continue from init_from's checkpoint (a run dir's latest, or a checkpoints/step_* dir) with its
    # optimizer state, data position and step, as a resume would; a WSD decay branch of a sweep starts this way.
    init_state: bool = False
    ckpt_at: str = ""  # extra checkpoint steps, comma-separated ("80,160"): kept apart from keep_last (branch points)
    init_optimizer: bool = False  # with init_from: also take that run's optimizer state (AdamW moments)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def tokens_per_step(self) -> int:
        return self.train.batch_size * self.train.grad_accum * self.data.seq_len

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        """Build from nested dicts (a saved config.json, a TOML file); unknown keys and wrong types fail."""
        return _build(cls, d, prefix="")

    def validate(self, *, special_tokens: int = N_SPECIAL_TOKENS) -> "RunConfig":
        check_ranges(self)
        m = self.model
        if m.d_model % m.n_head:
            raise ConfigError(f"model.n_head={m.n_head} does not divide model.d_model={m.d_model}; pick heads that divide it")
        if m.n_head % m.n_kv_head:
            raise ConfigError(f"model.n_kv_head={m.n_kv_head} does not divide model.n_head={m.n_head} (grouped-query attention needs whole groups)")
        if m.head_dim % 2:
            raise ConfigError(f"head dim d_model/n_head={m.head_dim} is odd; RoPE needs an even head dim")
        if m.vocab_size and m.vocab_size < max(MIN_VOCAB, special_tokens + 256):
            raise ConfigError(f"model.vocab_size={m.vocab_size} is smaller than 256 bytes + {special_tokens} special tokens = {256 + special_tokens}")
        if self.data.seq_len > m.max_seq_len:
            raise ConfigError(f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={m.max_seq_len}; raise model.max_seq_len")
        if self.data.pose_length:
            d = self.data
            if not d.seq_len < d.pose_length <= m.max_seq_len:
                raise ConfigError(f"data.pose_length={d.pose_length} must be in (data.seq_len={d.seq_len}, model.max_seq_len="
                                  f"{m.max_seq_len}]: it is the context the rows' positions span; 0 turns PoSE off")
            if d.kind != "tokens" or m.family:
                raise ConfigError(f"data.pose_length works for text token data on Step-1/Step-2 models, not data.kind="
                                  f"{d.kind!r} with model.family={m.family!r}; set data.pose_length=0")
        _validate_rope(m)
        _validate_vision(m)
        return self


def _validate_vision(m: ModelConfig) -> None:
    v = m.vision
    if v.image_size == 0:
        return
    if v.image_size % (v.patch_size * v.pixel_shuffle):
        raise ConfigError(f"model.vision.image_size={v.image_size} must be a multiple of patch_size x pixel_shuffle = "
                          f"{v.patch_size * v.pixel_shuffle}")
    if v.d_model % v.n_head or (v.d_model // v.n_head) % 2:
        raise ConfigError(f"model.vision.n_head={v.n_head} must divide model.vision.d_model={v.d_model} into even head dims")
    if v.d_model % 4:
        raise ConfigError(f"model.vision.d_model={v.d_model} must be a multiple of 4 (2D sin-cos position encoding)")
    if v.slot_loss > 0 and v.n_tokens != 9:
        raise ConfigError(f"model.vision.slot_loss needs one image token per cell of the 3x3 grid (9), but this vision "
                          f"config gives {v.n_tokens}; set model.vision.slot_loss=0 or change patch_size/pixel_shuffle")


def _validate_rope(m: ModelConfig) -> None:
    r = m.rope  # field ranges and the scaling name are checked by check_ranges; here: how the fields relate
    if r.scaling == "none":
        return
    if r.original_max_seq_len <= 0 or r.original_max_seq_len > m.max_seq_len:
        raise ConfigError(f"model.rope.original_max_seq_len={r.original_max_seq_len} must be in 1..model.max_seq_len={m.max_seq_len}")
    if r.scaling == "yarn" and not r.beta_fast > r.beta_slow > 0:
        raise ConfigError(f"model.rope: yarn needs beta_fast > beta_slow > 0, got {r.beta_fast} and {r.beta_slow}")
    if r.scaling == "yarn" and r.attention_factor < 0:
        raise ConfigError(f"model.rope.attention_factor={r.attention_factor} must be >= 0 (0: 0.1 ln s + 1)")
    if r.scaling == "llama3" and not r.high_freq_factor > r.low_freq_factor > 0:
        raise ConfigError(f"model.rope: llama3 needs high_freq_factor > low_freq_factor > 0, got {r.high_freq_factor} and {r.low_freq_factor}")


@dataclass(frozen=True)
class Range:
    """A numeric field's valid values: ``lo``..``hi`` (None: unbounded), each end closed unless marked open."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, x: float) -> bool:
        if not math.isfinite(x):
            return False
        if self.lo is not None and (x <= self.lo if self.lo_open else x < self.lo):
            return False
        return self.hi is None or (x < self.hi if self.hi_open else x <= self.hi)

    def __str__(self) -> str:
        lo = "-inf" if self.lo is None else _number(self.lo)
        hi = "inf" if self.hi is None else _number(self.hi)
        return f"{'(' if self.lo_open or self.lo is None else '['}{lo}, {hi}{')' if self.hi_open or self.hi is None else ']'}"


def _number(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


AT_LEAST_0, AT_LEAST_1, POSITIVE, UNIT = Range(0), Range(1), Range(0, lo_open=True), Range(0, 1)
# Every numeric field's valid range; 0 is valid where it means something (a default taken from elsewhere, "off",
# "keep all"). Strings with a fixed vocabulary are in CHOICES; booleans and free strings (paths) need neither.
# tests/test_config_validation.py fails for a field that is in neither table, so new fields must declare one.
RANGES: dict[str, Range] = {
    "model.vocab_size": AT_LEAST_0,  # 0: the dataset tokenizer's size
    "model.d_model": AT_LEAST_1, "model.n_layer": AT_LEAST_1, "model.n_head": AT_LEAST_1,
    "model.n_kv_head": AT_LEAST_0,  # 0: n_head (becomes n_head when the config is built)
    "model.d_ff": AT_LEAST_0,  # 0: the SwiGLU default (likewise)
    "model.max_seq_len": AT_LEAST_1,
    "model.rope_base": Range(1, lo_open=True),  # base^(-2i/d): a base <= 1 gives no decaying frequencies
    "model.norm_eps": Range(0, 1, lo_open=True), "model.init_std": POSITIVE,
    "model.doc_mask_token": Range(-1),  # -1: off (plain causal attention over the packed row)
    "model.rope.factor": Range(1), "model.rope.original_max_seq_len": AT_LEAST_0,  # 0: model.max_seq_len
    "model.rope.beta_fast": POSITIVE, "model.rope.beta_slow": POSITIVE,
    "model.rope.attention_factor": AT_LEAST_0,  # 0: yarn's 0.1 ln s + 1
    "model.rope.low_freq_factor": POSITIVE, "model.rope.high_freq_factor": POSITIVE,
    "model.vision.image_size": AT_LEAST_0,  # 0: no vision tower
    "model.vision.patch_size": AT_LEAST_1, "model.vision.d_model": AT_LEAST_1, "model.vision.n_layer": AT_LEAST_1,
    "model.vision.n_head": AT_LEAST_1, "model.vision.pixel_shuffle": AT_LEAST_1,
    "model.vision.projector_hidden": AT_LEAST_0,  # 0: the decoder's d_model
    "model.vision.projector_lr_mult": POSITIVE, "model.vision.slot_loss": AT_LEAST_0,
    "model.moe.n_experts": AT_LEAST_0,  # 0: dense (Step-1)
    "model.moe.top_k": AT_LEAST_1, "model.moe.n_shared": AT_LEAST_0,
    "model.moe.d_expert": AT_LEAST_0,  # 0: model.d_ff
    "model.moe.first_dense": AT_LEAST_0, "model.moe.every": AT_LEAST_1,
    "model.moe.bias_update_rate": AT_LEAST_0, "model.moe.aux_loss_coef": AT_LEAST_0, "model.moe.z_loss_coef": AT_LEAST_0,
    "model.video.frames": AT_LEAST_1, "model.video.size": Range(4), "model.video.digit_size": AT_LEAST_1,
    "model.video.channels": Range(8), "model.video.z_channels": AT_LEAST_1, "model.video.spatial_down": AT_LEAST_1,
    "model.video.temporal_down": AT_LEAST_1, "model.video.kl_weight": AT_LEAST_0, "model.video.dit_dim": Range(8),
    "model.video.dit_layers": AT_LEAST_1, "model.video.dit_heads": AT_LEAST_1, "model.video.patch": AT_LEAST_1,
    "model.video.text_layers": AT_LEAST_0, "model.video.cond_drop": Range(0, 1, hi_open=True),
    "model.video.latent_pool": AT_LEAST_1, "model.video.ema": Range(0, 1, hi_open=True),
    "data.seq_len": AT_LEAST_1, "data.pose_length": AT_LEAST_0, "data.chat.mix_fraction": Range(0, 1, hi_open=True),
    "train.batch_size": AT_LEAST_1, "train.grad_accum": AT_LEAST_1, "train.max_steps": AT_LEAST_1,
    "train.lr": POSITIVE, "train.min_lr_ratio": UNIT, "train.warmup_steps": AT_LEAST_0, "train.decay_fraction": UNIT,
    "train.weight_decay": AT_LEAST_0, "train.beta1": Range(0, 1, hi_open=True), "train.beta2": Range(0, 1, hi_open=True),
    "train.grad_clip": AT_LEAST_0,  # 0: no clipping
    "train.eval_every": AT_LEAST_1, "train.eval_batches": AT_LEAST_1, "train.ckpt_every": AT_LEAST_1,
    "train.keep_last": AT_LEAST_0,  # 0: keep every checkpoint
    "train.log_every": AT_LEAST_1, "train.seed": Range(0, 2**63 - 1),
    "train.threads": AT_LEAST_0,  # 0: torch's default
}
CHOICES: dict[str, tuple[str, ...]] = {
    "model.moe.score": ("softmax", "sigmoid"), "model.rope.scaling": ("none", "linear", "dynamic", "yarn", "llama3"),
    "train.schedule": ("cosine", "wsd", "constant"), "train.dtype": ("auto", "bf16", "fp32"),
    "train.nan_policy": ("stop", "skip"), "train.device": ("auto", "cpu", "cuda"),
    "train.parallel": ("auto", "none", "ddp", "fsdp"), "train.compile": ("auto", "true", "false"), "model.video.source": ("digits", "mnist"),
    "model.vision.image_place": ("start", "end"),
}


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(allowed)}")


def config_fields(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted path, value) of every leaf field of a config dataclass, nested sections flattened."""
    out = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out += config_fields(value, f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", value))
    return out


def check_ranges(cfg: Any) -> None:
    """One-line ConfigError for the first field outside its declared range (NaN and infinities included)."""
    for path, value in config_fields(cfg):
        if path in RANGES and not isinstance(value, bool) and isinstance(value, (int, float)):
            r = RANGES[path]
            if value not in r:
                kind = "an integer" if isinstance(value, int) else "a finite number"
                raise ConfigError(f"{path}={value!r} is out of range: it must be {kind} in {r}; fix it in the config or --set")
        elif path in CHOICES:
            _choice(path, value, CHOICES[path])


# The named configurations (steplab/presets.py): a preset is a layer of overrides on the defaults above.
from steplab.presets import CONTEXT_VARIANTS, PRESETS  # noqa: E402


def _preset_dict(name: str) -> dict[str, Any]:
    base, _, ctx = name.rpartition("-")
    if ctx in CONTEXT_VARIANTS and base in PRESETS:
        length = CONTEXT_VARIANTS[ctx]
        # Longer context: the window grows and RoPE gets a Llama-3 style base so far positions stay distinct.
        return _deep_update(PRESETS[base], dict(model=dict(max_seq_len=length, rope_base=500000.0), data=dict(seq_len=length)))
    if name not in PRESETS:
        variants = ", ".join(f"<preset>-{c}" for c in CONTEXT_VARIANTS)
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(PRESETS)} and context variants {variants}")
    return PRESETS[name]


def preset(name: str) -> RunConfig:
    """``step1-mini`` or a context variant such as ``step1-mini-8k``."""
    return RunConfig.from_dict(_preset_dict(name))


def _build(cls: type, d: dict[str, Any], prefix: str) -> Any:
    """Construct dataclass ``cls`` from a nested dict, so derived defaults (d_ff, n_kv_head) see final values."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in d.items():
        path = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"unknown config key {path!r}; known in this section: {', '.join(fields)}")
        default = fields[key].default_factory() if fields[key].default_factory is not dataclasses.MISSING else fields[key].default
        if dataclasses.is_dataclass(default):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {path!r} is a section; give it a table, not {value!r}")
            kwargs[key] = _build(type(default), value, prefix=f"{path}.")
        else:
            kwargs[key] = _coerce(path, value, type(default))
    return cls(**kwargs)


def _deep_update(base: dict[str, Any], layer: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in layer.items():
        out[key] = _deep_update(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _coerce(path: str, value: Any, typ: type) -> Any:
    """Type a value from a file or ``--set`` string against the field's default type."""
    if isinstance(value, bool) and typ is str:  # train.compile was a bool before 2026-11-30: old config.json
        value = "true" if value else "false"
    if isinstance(value, str) and typ is not str:
        text = value.strip()
        if typ is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{path} expects true/false, got {value!r}")
        if typ is int and text.lstrip("+-").isdigit():  # exact: float() would round integers above 2**53
            return int(text)
        try:
            # integers exactly (float() rounds 2**63 - 1 up to 2**63)
            number = int(text) if typ is int and text.lstrip("+-").isdigit() else float(text)
        except ValueError:
            raise ConfigError(f"{path} expects {typ.__name__}, got {value!r}") from None
        value = number
    if typ is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if typ is int and isinstance(value, float):
        if not value.is_integer():
            raise ConfigError(f"{path} expects an integer, got {value!r}")
        return int(value)
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise ConfigError(f"{path} expects {typ.__name__}, got {value!r}")
    return value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["model.n_layer=6", "train.lr=1e-3"]`` -> nested dict; values stay strings and are typed on merge."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects section.key=value, got {item!r}")
        node = out
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def load_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        if path.suffix == ".toml":
            return tomllib.loads(path.read_text())
        return json.loads(path.read_text())
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot parse config file {path}: {e}") from None


def resolve(preset_name: str | None = None, config_file: str | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Preset, then file, then ``--set`` overrides, each on top of the last; validated."""
    raw = _preset_dict(preset_name) if preset_name else {}
    raw = _deep_update(raw, load_config_file(config_file) if config_file else {})
    raw = _deep_update(raw, parse_overrides(overrides or []))
    return RunConfig.from_dict(raw).validate()
