"""The one independent reference for the numerical tests: LoRA's definition, ``W + s·B@A``, computed densely in
float64 from an adapter's stored factors, never through lorakit's own maths (:mod:`lorakit.ops`)."""

import math

import torch


def scale_of(alpha: float, r: int, rslora: bool = False) -> float:
    """``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    return alpha / (math.sqrt(r) if rslora else r)


def dense_update(A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale · B @ A`` as an ``out × in·k`` matrix in float64 (PEFT's orientation: rows are outputs)."""
    return scale * B.detach().double().flatten(1) @ A.detach().double().flatten(1)


def dense_delta(layer, name: str = "default") -> torch.Tensor:
    """``s·B@A`` of one adapter of an adapted layer, in float64, shaped and oriented like the base weight (embeddings
    and GPT-2 Conv1D store ``in × out``; a grouped conv's B is expanded to the dense update it means)."""
    A, B = (t.detach().double() for t in layer.factors(name))
    s = layer.scaling[name]
    if type(layer).__name__ == "Embedding":
        return s * (B @ A).T
    if type(layer).__name__ == "Conv":
        groups = layer.base_layer.groups
        out, rg = B.shape[0], B.shape[1]  # a grouped B: output o reads the r-slice of its group
        B_full = torch.zeros(out, rg * groups, dtype=B.dtype)
        for o in range(out):
            g = o // (out // groups)
            B_full[o, g * rg:(g + 1) * rg] = B[o].flatten()
        return s * torch.einsum("or,r...->o...", B_full, A)
    delta = s * B @ A
    return delta.T if layer.fan_in_fan_out else delta


def dense_linear(layer, x: torch.Tensor, name) -> torch.Tensor:
    """``x @ (W + s·B@A).T + b`` for an adapted ``nn.Linear`` in float64; ``name`` None: the base alone."""
    W = layer.base_layer.weight.detach().double()
    if name is not None:
        W = W + dense_update(*layer.factors(name), layer.scaling[name])
    bias = layer.base_layer.bias
    return x @ W.T + (0 if bias is None else bias.detach().double())


def dense_dora_weight(layer, name: str = "default") -> torch.Tensor:
    """DoRA's adapted weight ``m / ‖W + ΔW‖ ⊙ (W + ΔW)`` in float64, shaped like the base weight: the norm per
    output (rows of Linear/conv weights, columns of the ``in × out`` weights of embeddings and GPT-2 Conv1D),
    taken densely over everything else; ``m`` is the layer's ``lora_magnitude_vector[name].weight``."""
    W = layer.base_layer.weight.detach().double() + dense_delta(layer, name)
    m = layer.lora_magnitude_vector[name].weight.detach().double().reshape(-1)
    columns = type(layer).__name__ == "Embedding" or getattr(layer, "fan_in_fan_out", False)
    if columns:
        return W * (m / W.norm(dim=0)).reshape(1, -1)
    norm = W.flatten(1).norm(dim=1)
    return W * (m / norm).reshape(-1, *[1] * (W.dim() - 1))
