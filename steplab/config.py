"""Typed run configuration: dataclasses, named presets, ``--set a.b=c`` overrides, TOML/JSON files.

A run is fully described by ``RunConfig`` (model + data + train). The resolved config is saved as
``config.json`` in every run directory, and ``RunConfig.from_dict`` reads it back, so a run can be
re-created or resumed from its directory alone. Validation happens here, before any work starts.
"""
from __future__ import annotations

import dataclasses
import json
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
class ModelConfig:
    """Step-1 decoder shape. Defaults follow the Llama layout so HF export is exact."""

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
    doc_mask_token: int = -1  # >= 0: in training, attention stays inside the documents this token starts

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
class DataConfig:
    path: str = ""  # a directory written by `steplab data prepare`
    seq_len: int = 256


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
    dtype: str = "bf16"  # bf16 (autocast, fp32 master weights) | fp32
    compile: bool = False
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
        m, t = self.model, self.train
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
        for name in ("d_model", "n_layer", "n_head", "d_ff", "max_seq_len"):
            if getattr(m, name) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(m, name)}")
        _validate_rope(m)
        for name in ("batch_size", "grad_accum", "max_steps"):
            if getattr(t, name) <= 0:
                raise ConfigError(f"train.{name} must be positive, got {getattr(t, name)}")
        if not t.lr > 0:
            raise ConfigError(f"train.lr must be positive, got {t.lr}")
        _choice("train.schedule", t.schedule, ("cosine", "wsd", "constant"))
        _choice("train.dtype", t.dtype, ("bf16", "fp32"))
        _choice("train.nan_policy", t.nan_policy, ("stop", "skip"))
        _choice("train.device", t.device, ("auto", "cpu", "cuda"))
        _choice("train.parallel", t.parallel, ("auto", "none", "ddp", "fsdp"))
        return self


def _validate_rope(m: ModelConfig) -> None:
    r = m.rope
    _choice("model.rope.scaling", r.scaling, ("none", "linear", "dynamic", "yarn", "llama3"))
    if r.scaling == "none":
        return
    if not r.factor >= 1:
        raise ConfigError(f"model.rope.factor={r.factor} must be >= 1 (it is how many times longer the context gets)")
    if r.original_max_seq_len <= 0 or r.original_max_seq_len > m.max_seq_len:
        raise ConfigError(f"model.rope.original_max_seq_len={r.original_max_seq_len} must be in 1..model.max_seq_len={m.max_seq_len}")
    if r.scaling == "yarn" and not r.beta_fast > r.beta_slow > 0:
        raise ConfigError(f"model.rope: yarn needs beta_fast > beta_slow > 0, got {r.beta_fast} and {r.beta_slow}")
    if r.scaling == "yarn" and r.attention_factor < 0:
        raise ConfigError(f"model.rope.attention_factor={r.attention_factor} must be >= 0 (0: 0.1 ln s + 1)")
    if r.scaling == "llama3" and not r.high_freq_factor > r.low_freq_factor > 0:
        raise ConfigError(f"model.rope: llama3 needs high_freq_factor > low_freq_factor > 0, got {r.high_freq_factor} and {r.low_freq_factor}")


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(allowed)}")


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
}
CONTEXT_VARIANTS = {"8k": 8192, "16k": 16384, "32k": 32768}


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
    if isinstance(value, str) and typ is not str:
        text = value.strip()
        if typ is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{path} expects true/false, got {value!r}")
        try:
            number = float(text)
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
