"""GPU memory plan for several vLLM engines on one device.

Each vLLM engine takes ``gpu_memory_utilization`` × the device's memory when it starts and
refuses to start when less is free, so engines that share a GPU must split it. The plan:

- every engine needs its weights (per GPU: the checkpoint's size over tensor × pipeline
  parallel ranks) plus a fixed working set (CUDA context, activations, CUDA graphs);
- a scoring model (verifier / reward model) only reads prompts: it gets KV cache for
  ``SCORE_KV_TOKENS`` tokens;
- the generating models share what is left as KV cache in proportion to their KV bytes per
  token, so a draft holds as many tokens as the policy whose candidates it drafts;
- an engine whose options set ``gpu_memory_utilization`` keeps it; the others fit around it.

When the engines do not fit, :func:`plan_gpu_memory` raises :class:`ConfigError` naming each
model and its numbers. Pure arithmetic: no GPU is needed to compute or test a plan.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ttscale.errors import ConfigError

log = logging.getLogger(__name__)

GIB = 1 << 30
DEFAULT_SHARE = 0.90  # of the device, for all engines together (vLLM's own default for one: 0.92)
OVERHEAD_BYTES = int(2.5 * GIB)  # per engine: CUDA context, activations, CUDA graphs, sampler
OVERHEAD_WEIGHT_FRACTION = 0.10  # plus this share of its weights (activations grow with width)
SCORE_KV_TOKENS = 65_536  # KV cache of a scoring model: its batches of prompts in flight
MIN_GENERATE_KV_TOKENS = 16_384  # a generating model with less cannot serve K long candidates
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


@dataclass(frozen=True)
class MemoryNeed:
    """What one engine needs on each GPU it uses."""

    name: str
    role: Literal["generate", "score"]
    weight_bytes: int
    kv_bytes_per_token: int
    fixed_fraction: float | None = None  # gpu_memory_utilization set by the user

    @property
    def base_bytes(self) -> int:
        return self.weight_bytes + OVERHEAD_BYTES + int(OVERHEAD_WEIGHT_FRACTION * self.weight_bytes)


@dataclass(frozen=True)
class MemoryPlan:
    total_bytes: int
    budget_bytes: int
    fractions: dict[str, float]
    kv_bytes: dict[str, int]
    needs: tuple[MemoryNeed, ...]

    def describe(self) -> str:
        rows = [
            f"GPU memory plan ({self.total_bytes / GIB:.1f} GiB device, "
            f"{self.budget_bytes / GIB:.1f} GiB for {len(self.needs)} engines):"
        ]
        for n in self.needs:
            kv = self.kv_bytes[n.name]
            tokens = kv // max(n.kv_bytes_per_token, 1)
            rows.append(
                f"  {n.name} ({n.role}): gpu_memory_utilization {self.fractions[n.name]:.3f} = "
                f"weights {n.weight_bytes / GIB:.2f} GiB + working set "
                f"{(n.base_bytes - n.weight_bytes) / GIB:.2f} GiB + KV {kv / GIB:.2f} GiB "
                f"(~{tokens:,} tokens)" + (" [set by the user]" if n.fixed_fraction else "")
            )
        return "\n".join(rows)


def plan_gpu_memory(
    needs: list[MemoryNeed], total_bytes: int, *, share: float = DEFAULT_SHARE, free_bytes: int | None = None
) -> MemoryPlan:
    """Split ``share`` of a device of ``total_bytes`` between ``needs`` (see the module doc)."""
    if not needs:
        return MemoryPlan(total_bytes, 0, {}, {}, ())
    if not 0.0 < share <= 1.0:
        raise ConfigError(f"GPU memory share must be in (0, 1], got {share}", param="gpu_memory_utilization")
    budget = int(share * total_bytes)
    if free_bytes is not None:
        budget = min(budget, free_bytes - GIB // 2)
    fixed = [n for n in needs if n.fixed_fraction is not None]
    scorers = [n for n in needs if n.fixed_fraction is None and n.role == "score"]
    gens = [n for n in needs if n.fixed_fraction is None and n.role == "generate"]
    sizes: dict[str, int] = {n.name: int(f * total_bytes) for n in fixed if (f := n.fixed_fraction) is not None}
    kv: dict[str, int] = {n.name: max(0, sizes[n.name] - n.base_bytes) for n in fixed}
    for n in scorers:
        kv[n.name] = max(GIB // 2, SCORE_KV_TOKENS * n.kv_bytes_per_token)
        sizes[n.name] = n.base_bytes + kv[n.name]
    left = budget - sum(sizes.values()) - sum(n.base_bytes for n in gens)
    per_token = sum(n.kv_bytes_per_token for n in gens)
    short = left < MIN_GENERATE_KV_TOKENS * per_token if gens else left < 0
    if short or any(kv[n.name] <= 0 for n in fixed):
        lines = [
            f"the models do not fit on one GPU: {budget / GIB:.1f} GiB available to ttscale "
            f"({share:.2f} of {total_bytes / GIB:.1f} GiB"
            + (f", {free_bytes / GIB:.1f} GiB free" if free_bytes is not None else "")
            + ")"
        ]
        for n in needs:
            if n.fixed_fraction is not None:
                what = f"gpu_memory_utilization {n.fixed_fraction} = {sizes[n.name] / GIB:.2f} GiB (set)"
                if kv[n.name] <= 0:
                    what += f", less than its weights and working set {n.base_bytes / GIB:.2f} GiB"
            elif n.role == "score":
                what = f"{sizes[n.name] / GIB:.2f} GiB (weights {n.weight_bytes / GIB:.2f} GiB)"
            else:
                what = (
                    f"weights {n.weight_bytes / GIB:.2f} GiB + working set "
                    f"{(n.base_bytes - n.weight_bytes) / GIB:.2f} GiB + KV for "
                    f"{MIN_GENERATE_KV_TOKENS:,} tokens {MIN_GENERATE_KV_TOKENS * n.kv_bytes_per_token / GIB:.2f} GiB"
                )
            lines.append(f"  {n.name} ({n.role}): {what}")
        lines.append(
            "serve fewer or smaller models, quantize, use more GPUs (tensor_parallel_size), "
            "or set gpu_memory_utilization per model in a config file"
        )
        raise ConfigError("\n".join(lines), param="gpu_memory_utilization", code="gpu_memory")
    for n in gens:
        kv[n.name] = int(left * n.kv_bytes_per_token / per_token)
        sizes[n.name] = n.base_bytes + kv[n.name]
    fractions = {
        n.name: (n.fixed_fraction if n.fixed_fraction is not None else _floor3(sizes[n.name] / total_bytes))
        for n in needs
    }
    return MemoryPlan(total_bytes, budget, fractions, kv, tuple(needs))


def _floor3(x: float) -> float:
    return int(x * 1000) / 1000


# -- reading a checkpoint -------------------------------------------------------------------------


def checkpoint_bytes(path: Path) -> int:
    """Bytes of the weights a model directory's loader reads: the safetensors index's total size,
    else the ``*.safetensors`` files, else ``pytorch_model*.bin`` (as vLLM prefers them; trainer
    leftovers such as ``optimizer.pt`` are not weights), else any weight file."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            total = json.loads(index.read_text()).get("metadata", {}).get("total_size")
            if total:
                return int(total)
        except (OSError, ValueError):
            pass
    for pattern in ("*.safetensors", "pytorch_model*.bin", "*.gguf"):
        files = [f for f in path.glob(pattern) if f.is_file()]
        if files:
            return sum(f.stat().st_size for f in files)
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))


def _config(path: Path) -> dict[str, Any]:
    try:
        cfg: dict[str, Any] = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    lm: dict[str, Any] = cfg.get("text_config") or cfg  # multimodal checkpoints nest the language model's
    return lm


_DTYPE_BYTES = {
    "float32": 4,
    "float": 4,
    "float16": 2,
    "half": 2,
    "bfloat16": 2,
    "fp8": 1,
    "fp8_e4m3": 1,
    "fp8_e5m2": 1,
    "fp8_inc": 1,
}


def kv_bytes_per_token(
    path: Path,
    *,
    dtype: str = "auto",
    kv_cache_dtype: str = "auto",
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
) -> int:
    """KV cache bytes one token takes on one GPU (K and V of every layer of its ranks)."""
    cfg = _config(path)
    layers = int(cfg.get("num_hidden_layers") or cfg.get("n_layer") or 32)
    heads = int(cfg.get("num_attention_heads") or cfg.get("n_head") or 32)
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or (int(cfg.get("hidden_size") or 4096) // max(heads, 1)))
    if kv_cache_dtype in _DTYPE_BYTES:
        elt = _DTYPE_BYTES[kv_cache_dtype]
    elif dtype in _DTYPE_BYTES:
        elt = _DTYPE_BYTES[dtype]
    else:
        elt = 4 if str(cfg.get("torch_dtype") or cfg.get("dtype")) == "float32" and dtype == "float32" else 2
    kv_heads_here = max(1, kv_heads // max(tensor_parallel, 1))
    layers_here = -(-layers // max(pipeline_parallel, 1))
    return 2 * layers_here * kv_heads_here * head_dim * elt


def need_of(name: str, role: Literal["generate", "score"], path: Path, options: dict[str, Any]) -> MemoryNeed:
    """An engine's :class:`MemoryNeed` from its checkpoint and vLLM options."""
    tp = int(options.get("tensor_parallel_size") or 1)
    pp = int(options.get("pipeline_parallel_size") or 1)
    weights = checkpoint_bytes(path)
    if str(options.get("dtype", "auto")) in ("float32", "float"):
        cfg = _config(path)
        if str(cfg.get("torch_dtype") or cfg.get("dtype")) in ("bfloat16", "float16"):
            weights *= 2
    fixed = options.get("gpu_memory_utilization")
    return MemoryNeed(
        name=name,
        role=role,
        weight_bytes=weights // (tp * pp),
        kv_bytes_per_token=kv_bytes_per_token(
            path,
            dtype=str(options.get("dtype", "auto")),
            kv_cache_dtype=str(options.get("kv_cache_dtype", "auto")),
            tensor_parallel=tp,
            pipeline_parallel=pp,
        ),
        fixed_fraction=float(fixed) if fixed is not None else None,
    )


def device_memory() -> tuple[int, int] | None:
    """(free, total) bytes of the first visible GPU, without creating a CUDA context here when
    NVML is available; ``None`` without a GPU."""
    import os

    try:
        import pynvml  # nvidia-ml-py, a dependency of vLLM's CUDA build

        pynvml.nvmlInit()
        try:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
            if visible.startswith(("GPU-", "MIG-")):
                handle = pynvml.nvmlDeviceGetHandleByUUID(visible)
            else:
                handle = pynvml.nvmlDeviceGetHandleByIndex(int(visible) if visible.isdigit() else 0)
            info = pynvml.nvmlDeviceGetMemoryInfo(handle)
            return int(info.free), int(info.total)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVML: ask torch (creates a context in this process)
        pass
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        free, total = torch.cuda.mem_get_info(0)
        return int(free), int(total)
    except Exception:
        return None
