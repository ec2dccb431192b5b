"""Weight-only int8 / int4 quantization for CPU decoding at the edge: `steplab quantize` and loading its runs.

Why not torchao (checked with torchao 0.18 on torch 2.13 CPU, see docs/LOG.md): its ``Int8WeightOnlyConfig``
works, but ``Int4WeightOnlyConfig`` needs the ``mslk`` kernel package on CPU, both quantize ``nn.Linear`` only
(not the embedding nor our (E, d_in, d_out) expert weights, which dominate small models), and a quantized
model is a tree of tensor subclasses that safetensors cannot hold. The kernels torchao calls on CPU are in
torch itself, so we call them directly and keep plain tensors on disk:

- int8: one symmetric fp32 scale per output row (torchao's int8 weight-only scheme), w = q * s;
  kernel ``aten._weight_int8pack_mm`` (int8 weights are widened inside the GEMM, never materialised).
- int4: asymmetric groups of ``group`` input weights with an fp16 scale and zero (gpt-fast/torchao's
  ``tinygemm`` layout), w = (q - 8) * s + z with q in 0..15; two nibbles a byte on disk, repacked at load
  for ``aten._weight_int4pack_mm_for_cpu``.

Quantized: every linear (attention, FFN, lm_head), the token embedding (rows dequantized after the lookup)
and MoE expert weights (per expert, only experts that received tokens run). Kept in fp32: RMSNorm weights
and the MoE router (E x d, tiny, and top-k selection flips on small logit errors).

A quantized run is a normal run directory plus ``quant.json``; ``train.checkpoint.load_run`` notices that file
and calls :func:`load_quantized_run`, so ``sample``/``eval``/``chat``/``serve`` load it unchanged.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from steplab.errors import CheckpointError, ConfigError

SCHEMES = ("int8", "int4")
GROUPS = (32, 64, 128)
QUANT_FILE = "quant.json"
# torch's weight-only CPU kernels handle one row at a time (measured here: int8 914 ms, int4 1767 ms for 128 rows
# of a 512 x 1408 matrix, vs 13 ms fp32 and 44 ms to dequantize + GEMM), so they serve decoding only
KERNEL_MAX_ROWS = 16
DEQUANT_ROWS = 256  # output rows dequantized at a time on the dense path (bounds the transient memory)


@dataclass
class QuantConfig:
    scheme: str = "int8"  # int8 (per output row) | int4 (groups along the input dimension)
    group: int = 32  # int4 only: input weights per scale/zero pair

    def validate(self) -> "QuantConfig":
        if self.scheme not in SCHEMES:
            raise ConfigError(f"--scheme {self.scheme!r} is not one of {', '.join(SCHEMES)}")
        if self.scheme == "int4" and self.group not in GROUPS:
            raise ConfigError(f"--group {self.group} is not one of {', '.join(map(str, GROUPS))}")
        return self


# ---- the number formats (plain tensors; what goes on disk) -------------------------------------------------

def quantize_tensor(w: torch.Tensor, qc: QuantConfig, name: str = "weight") -> dict[str, torch.Tensor]:
    """w (out, in) fp32 -> {"q", "scale"[, "zero"]}; quantized along the last (input) dimension."""
    w = w.detach().float()
    if qc.scheme == "int8":
        scale = (w.abs().amax(-1) / 127.0).clamp(min=1e-12)
        return {"q": torch.round(w / scale[..., None]).clamp(-127, 127).to(torch.int8), "scale": scale}
    if w.shape[-1] % qc.group:
        raise ConfigError(f"tensor {name}: input size {w.shape[-1]} is not a multiple of the int4 group {qc.group}; "
                          f"choose --group {' or '.join(str(g) for g in GROUPS if w.shape[-1] % g == 0) or '(none fits)'}")
    g = w.reshape(*w.shape[:-1], w.shape[-1] // qc.group, qc.group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15.0).clamp(min=1e-6).half()
    zero = (lo + 8 * scale.float()).half()  # the value of q = 8 (tinygemm's zero point)
    q = torch.round((g - zero.float()[..., None]) / scale.float()[..., None] + 8).clamp(0, 15).to(torch.uint8)
    q = q.reshape(w.shape)
    return {"q": q[..., 0::2] | (q[..., 1::2] << 4), "scale": scale, "zero": zero}  # two nibbles a byte


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def dequantize_tensor(t: dict[str, torch.Tensor], group: int = 0) -> torch.Tensor:
    """The fp32 weights a quantized tensor stands for (the reference every kernel is tested against)."""
    if "zero" not in t:
        return t["q"].float() * t["scale"].float()[..., None]
    q = unpack_int4(t["q"]).float()
    group = q.shape[-1] // t["scale"].shape[-1]
    g = q.reshape(*q.shape[:-1], -1, group)
    return ((g - 8) * t["scale"].float()[..., None] + t["zero"].float()[..., None]).reshape(q.shape)


# ---- runtime modules ---------------------------------------------------------------------------------------

class QuantWeight(nn.Module):
    """One quantized (out, in) matrix in the layout the CPU kernel wants; ``x @ W.T`` via :meth:`matmul`."""

    def __init__(self, t: dict[str, torch.Tensor]):
        super().__init__()
        self.int4 = "zero" in t
        if not self.int4:
            # a fresh (aligned) copy: tensors from a safetensors file can sit at any byte offset, and the
            # kernel's vector loads crashed (SIGSEGV) on such an int8 buffer under bf16 autocast
            self.register_buffer("q", t["q"].clone(memory_format=torch.contiguous_format))
            self.register_buffer("scale", t["scale"].float())
            self.packed = False
            return
        q = unpack_int4(t["q"])
        self.out_features, self.group = q.shape[0], q.shape[1] // t["scale"].shape[1]
        # the portable nibbles, for prefill/eval (see matmul) and shapes the kernel cannot take
        self.register_buffer("nibbles", t["q"].clone())
        self.register_buffer("gscale", t["scale"].float())
        self.register_buffer("gzero", t["zero"].float())
        self.packed = q.shape[0] % 16 == 0  # the int4 CPU kernel's rule
        if self.packed:
            self.register_buffer("q", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1))
            # (in / group, out, 2): scale and zero side by side, as the kernel reads them
            self.register_buffer("scale", torch.stack([t["scale"], t["zero"]], -1).transpose(0, 1).float().contiguous())

    def dequantize(self, dtype=torch.float32, rows: slice = slice(None)) -> torch.Tensor:
        if not self.int4:
            return self.q[rows].to(dtype) * self.scale[rows].to(dtype)[:, None]
        return dequantize_tensor({"q": self.nibbles[rows], "scale": self.gscale[rows], "zero": self.gzero[rows]}).to(dtype)

    def dense_matmul(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 @ W.T dequantizing DEQUANT_ROWS output rows at a time: no full-size fp32 copy is ever resident."""
        n = self.out_features if self.int4 else self.q.shape[0]
        return torch.cat([x2 @ self.dequantize(x2.dtype, slice(i, i + DEQUANT_ROWS)).T for i in range(0, n, DEQUANT_ROWS)], dim=-1)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        if x2.dtype not in (torch.float32, torch.bfloat16):
            x2 = x2.float()
        if x2.shape[0] > KERNEL_MAX_ROWS or (self.int4 and not self.packed):
            y = self.dense_matmul(x2)  # prefill / eval: dequantize, then dense GEMMs
        else:
            scale = self.scale if self.scale.dtype == x2.dtype else self.scale.to(x2.dtype)
            if self.int4:
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.q, self.group, scale)
            else:
                y = torch.ops.aten._weight_int8pack_mm(x2, self.q, scale)
        return y.reshape(*shape[:-1], y.shape[-1])


class QuantLinear(nn.Module):
    """Drop-in for a bias-free ``nn.Linear``."""

    def __init__(self, t: dict[str, torch.Tensor]):
        super().__init__()
        self.w = QuantWeight(t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w.matmul(x)


class QuantEmbedding(nn.Module):
    """Drop-in for ``nn.Embedding``: look up the quantized rows, then dequantize only those."""

    def __init__(self, t: dict[str, torch.Tensor]):
        super().__init__()
        for k, v in t.items():
            self.register_buffer(k, v)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        rows = {k: getattr(self, k)[idx] for k in ("q", "scale", "zero") if hasattr(self, k)}
        return dequantize_tensor(rows)


class QuantGroupedLinear(nn.Module):
    """Drop-in for ``moe.GroupedLinear`` (x rows sorted by expert, ``counts`` rows each)."""

    def __init__(self, t: dict[str, torch.Tensor]):
        super().__init__()
        self.experts = nn.ModuleList(QuantWeight({k: v[e] for k, v in t.items()}) for e in range(t["q"].shape[0]))

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        out = [self.experts[e].matmul(xs) if xs.shape[0] else xs.new_zeros(0, self._out(e))
               for e, xs in enumerate(x.split(counts.tolist()))]
        return torch.cat(out)

    def _out(self, e: int) -> int:
        w = self.experts[e]
        return w.out_features if w.int4 else w.q.shape[0]


# ---- whole models ------------------------------------------------------------------------------------------

def _targets(model: nn.Module) -> dict[str, str]:
    """Module name -> kind ("linear" | "embedding" | "experts") of everything we quantize."""
    from steplab.models.moe import GroupedLinear

    found = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Embedding):
            found[name] = "embedding"
        elif isinstance(mod, GroupedLinear):
            found[name] = "experts"
        elif isinstance(mod, nn.Linear) and not name.endswith("router"):
            found[name] = "linear"
    return found


def quantize_state(model: nn.Module, qc: QuantConfig) -> dict[str, torch.Tensor]:
    """The quantized run's safetensors dict: ``NAME.weight.{q,scale,zero}`` for quantized weights, the rest as is.

    Expert weights (E, d_in, d_out) are stored transposed, (E, d_out, d_in), so every quantized matrix is
    (out, in) and groups run along the input dimension as the kernels want.
    """
    qc.validate()
    targets = _targets(model)
    tied = getattr(getattr(model, "cfg", None), "tie_embeddings", False)
    out: dict[str, torch.Tensor] = {}
    for name, p in model.state_dict().items():
        module = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and module in targets:
            if tied and module == "lm_head":
                continue  # rebuilt from tok_emb at load
            w = p.transpose(1, 2) if targets[module] == "experts" else p
            for k, v in quantize_tensor(w, qc, name).items():
                out[f"{name}.{k}"] = v.contiguous()
        else:
            out[name] = p.detach().contiguous()
    return out


def apply_quantized(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Swap the model's linears/embedding/experts for quantized modules holding ``state``; load the rest."""
    targets = _targets(model)
    tied = getattr(getattr(model, "cfg", None), "tie_embeddings", False)
    plain = {}
    for module, kind in targets.items():
        src = "tok_emb" if tied and module == "lm_head" else module
        t = {k: state[f"{src}.weight.{k}"] for k in ("q", "scale", "zero") if f"{src}.weight.{k}" in state}
        if not t:
            raise CheckpointError(f"quantized checkpoint has no {src}.weight.q; re-run `steplab quantize`")
        new = {"embedding": QuantEmbedding, "experts": QuantGroupedLinear}.get(kind, QuantLinear)(t)
        parent, _, attr = module.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
    prefixes = tuple(f"{m}." for m in targets)
    for name in model.state_dict():
        if not name.startswith(prefixes) and name in state:
            plain[name] = state[name]
    missing = {n for n in model.state_dict() if not n.startswith(prefixes)} - set(plain)
    if missing:
        raise CheckpointError(f"quantized checkpoint is missing {sorted(missing)[:3]}; re-run `steplab quantize`")
    model.load_state_dict(plain, strict=False)
    return model


def is_quantized_run(run_dir: str | Path) -> bool:
    return (Path(run_dir) / QUANT_FILE).is_file()


def quantize_run(run_dir: str | Path, out_dir: str | Path, qc: QuantConfig, force: bool = False) -> dict:
    """Quantize a run's latest checkpoint into a new run directory (written beside, renamed into place)."""
    from steplab.train.checkpoint import load_run

    qc.validate()
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if is_quantized_run(run_dir):
        raise ConfigError(f"{run_dir} is already quantized ({QUANT_FILE}); quantize the original fp32 run")
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise ConfigError(f"{out_dir} exists and is not empty; choose another --out or pass --force")
    cfg, model, _, step = load_run(run_dir)
    state = quantize_state(model, qc)
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    ckpt = tmp / "checkpoints" / f"step_{step:08d}"
    ckpt.mkdir(parents=True)
    shutil.copy(run_dir / "config.json", tmp / "config.json")
    shutil.copytree(run_dir / "tokenizer", tmp / "tokenizer")
    save_file(state, str(ckpt / "model.safetensors"), metadata={"step": str(step), **{k: str(v) for k, v in asdict(qc).items()}})
    (ckpt / "state.json").write_text(json.dumps({"step": step}))
    info = {**asdict(qc), "source": str(run_dir), "step": step}
    (tmp / QUANT_FILE).write_text(json.dumps(info, indent=2))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    fp32 = sum(p.numel() * 4 for p in model.state_dict().values())
    info["bytes"] = (out_dir / ckpt.relative_to(tmp) / "model.safetensors").stat().st_size
    info["ratio_vs_fp32"] = info["bytes"] / fp32
    return info


def load_quantized_run(run_dir: str | Path, device: str = "cpu", checkpoint: str | Path | None = None):
    """(config, model, tokenizer, step) like ``load_run``; quantized kernels are CPU kernels, so CPU only."""
    from steplab.config import RunConfig
    from steplab.data.tokenizer import Tokenizer
    from steplab.models import build_model
    from steplab.train.checkpoint import latest_checkpoint

    run_dir = Path(run_dir)
    if str(device) != "cpu":
        raise ConfigError(f"{run_dir} is a quantized run and its int8/int4 kernels are CPU kernels, but device {device!r} "
                          f"was chosen; run on the CPU (e.g. CUDA_VISIBLE_DEVICES= steplab ...)")
    cfg = RunConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    path = Path(checkpoint) if checkpoint else latest_checkpoint(run_dir)
    if path is None or not (path / "model.safetensors").is_file():
        raise CheckpointError(f"quantized run {run_dir} has no checkpoint; re-run `steplab quantize`")
    try:
        state = load_file(str(path / "model.safetensors"))
    except Exception as e:  # safetensors raises several types for damaged files
        raise CheckpointError(f"{path}/model.safetensors is corrupted ({type(e).__name__}: {e}); re-run `steplab quantize`") from None
    model = apply_quantized(build_model(cfg.model), state)  # the fp32 init is freed as modules are swapped
    release_freed_memory()
    step = json.loads((path / "state.json").read_text())["step"] if (path / "state.json").is_file() else 0
    return cfg, model.eval(), Tokenizer.load(run_dir / "tokenizer"), step


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them after the fp32 init is dropped; RSS would count them)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass
