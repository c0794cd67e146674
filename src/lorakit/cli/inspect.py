"""``lorakit inspect``: what an adapter folder holds, read from its files alone (no base model needed).

For each adapted module: rank, alpha, scaling, parameter count and the Frobenius norm of its weight update
``ΔW = s·B@A``. The norm is computed from the two small Gram matrices, ``‖BA‖² = Σ (BᵀB) ∘ (AAᵀ)``, in float64,
so no ``out × in`` matrix is ever formed.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import torch

from lorakit.checkpoint import read_weights
from lorakit.config import read_config
from lorakit.ops import lora_scaling
from lorakit.targeting import pattern_value

_FACTOR = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
                     r"(?:\.[^.]+)*?(?:\.weight)?$")


def delta_norm(A: torch.Tensor, B: torch.Tensor, scaling: float) -> float:
    """``‖scaling · B @ A‖_F`` for factors in PEFT's layout (convolutions flattened to matrices)."""
    a = A.flatten(1).double() if A.dim() > 1 else A.double()[None]
    b = B.flatten(1).double()
    if a.shape[0] != b.shape[1]:  # embeddings store A as (r, vocab) and B as (dim, r): same contraction
        raise ValueError(f"factor shapes {tuple(A.shape)} and {tuple(B.shape)} do not share a rank dimension")
    gram = (b.T @ b) * (a @ a.T)
    return abs(scaling) * math.sqrt(max(float(gram.sum()), 0.0))


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """Everything ``inspect`` shows, as a JSON-ready dict."""
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"{folder} does not exist: expected an adapter folder (adapter_config.json + "
                                "adapter_model.safetensors)")
    config = read_config(folder)
    tensors, weights_file = read_weights(folder)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    other: dict[str, list[int]] = {}
    for key, tensor in tensors.items():
        match = _FACTOR.match(key)
        if match:
            pairs.setdefault(match["module"], {})[match["kind"].replace("embedding_", "")] = tensor
        else:
            other[key] = list(tensor.shape)
    modules = []
    for name, factors in pairs.items():
        if set(factors) != {"lora_A", "lora_B"}:
            raise ValueError(f"{weights_file}: module {name} has {sorted(factors)} but needs both lora_A and lora_B")
        A, B = factors["lora_A"], factors["lora_B"]
        rank = A.shape[0]
        alpha = pattern_value(name, config.alpha_pattern, config.lora_alpha)
        scaling = lora_scaling(alpha, rank, config.use_rslora)
        modules.append({
            "module": name,
            "rank": int(rank),
            "alpha": alpha,
            "scaling": scaling,
            "shape_A": list(A.shape),
            "shape_B": list(B.shape),
            "parameters": A.numel() + B.numel(),
            "delta_norm": delta_norm(A, B, scaling),
        })
    modules.sort(key=lambda m: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", m["module"])])
    total = sum(t.numel() for t in tensors.values())
    return {
        "path": str(folder),
        "weights_file": str(weights_file),
        "file_size_bytes": os.path.getsize(weights_file),
        "config": config.to_dict(),
        "parameters": total,
        "modules": modules,
        "other_tensors": other,
    }


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)  # pragma: no cover


def format_table(info: dict[str, Any]) -> str:
    """The human-readable report: a header, then one row per adapted module."""
    c = info["config"]
    targets = c["target_modules"] if isinstance(c["target_modules"], str) else ",".join(c["target_modules"] or [])
    lines = [
        f"adapter      {info['path']}",
        f"file         {Path(info['weights_file']).name}, {_size(info['file_size_bytes'])}",
        f"base model   {c.get('base_model_name_or_path') or '(not recorded)'}",
        f"config       r={c['r']} lora_alpha={c['lora_alpha']:g} lora_dropout={c['lora_dropout']:g} "
        f"use_rslora={c['use_rslora']} bias={c['bias']} task_type={c['task_type']} target_modules={targets}",
        f"parameters   {info['parameters']:,} in {len(info['modules'])} adapted modules"
        + (f" and {len(info['other_tensors'])} other tensors" if info["other_tensors"] else ""),
        "",
    ]
    width = max([len("module")] + [len(m["module"]) for m in info["modules"]])
    lines.append(f"{'module':<{width}}  {'rank':>4}  {'alpha':>6}  {'scaling':>8}  {'params':>10}  {'|dW|_F':>10}")
    for m in info["modules"]:
        lines.append(f"{m['module']:<{width}}  {m['rank']:>4}  {m['alpha']:>6g}  {m['scaling']:>8.4g}  "
                     f"{m['parameters']:>10,}  {m['delta_norm']:>10.4g}")
    for key, shape in info["other_tensors"].items():
        lines.append(f"{key}  (trained in full, shape {shape})")
    return "\n".join(lines)
