"""Tiny Stable Diffusion components built from configs, and kohya LoRA files written the way sd-scripts writes them
(``networks/lora.py``), independently of lorakit: which modules it adapts, how it names them, what it stores.

sd-scripts adapts, in the UNet, every ``nn.Linear`` and 1×1 ``nn.Conv2d`` inside a ``Transformer2DModel`` and, with
``conv_dim`` (LoCon), also the layers of ``ResnetBlock2D`` / ``Downsample2D`` / ``Upsample2D`` (3×3 convs at the
conv rank); in the text encoder every ``nn.Linear`` of ``CLIPAttention`` / ``CLIPMLP``. A module's name is
``prefix + "." + block name + "." + child name`` with every ``.`` replaced by ``_``; it stores ``lora_down.weight``
(``r × in`` or ``r × in × kh × kw``), ``lora_up.weight`` (``out × r`` or ``out × r × 1 × 1``) and ``alpha`` (a
scalar in the saved dtype)."""

import copy

import torch
from torch import nn

from reference import dense_update

UNET_BLOCKS = ("Transformer2DModel",)
CONV_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TE_BLOCKS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")


def tiny_unet(dtype=torch.float64, layers_per_block=1, cross_attention_dim=8):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=layers_per_block,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=4, norm_num_groups=4,
    ).to(dtype).eval()


def tiny_clip(dtype=torch.float64, projection=False, hidden=8, seed=0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=50, hidden_size=hidden, intermediate_size=16, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=12, projection_dim=8)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).to(dtype).eval()


def unet_inputs(dtype=torch.float64, cond_dim=8):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 8, 8, generator=g).to(dtype)
    cond = torch.randn(2, 3, cond_dim, generator=g).to(dtype)
    return x, torch.tensor([3, 700]), cond


def run_unet(unet, inputs):
    x, t, cond = inputs
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=cond).sample


def clip_ids():
    return torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(3))


def run_clip(model, ids=None):
    with torch.no_grad():
        return model(clip_ids() if ids is None else ids).last_hidden_state


def sd_scripts_modules(model, kind, conv=False):
    """``[(kohya name without prefix, module name, module)]`` of the layers sd-scripts adapts in ``model``."""
    blocks = TE_BLOCKS if kind == "te" else UNET_BLOCKS + (CONV_BLOCKS if conv else ())
    out = []
    for name, block in model.named_modules():
        if type(block).__name__ not in blocks:
            continue
        for child_name, child in block.named_modules():
            is_linear = isinstance(child, nn.Linear)
            is_conv = isinstance(child, nn.Conv2d)
            if not (is_linear or is_conv) or not child_name:
                continue
            if is_conv and child.kernel_size != (1, 1) and type(block).__name__ not in CONV_BLOCKS:
                continue
            full = f"{name}.{child_name}"
            # sd-scripts' CLIPTextModel (transformers 4) keeps its layers under text_model; transformers 5's does not
            named = full if kind != "te" or full.startswith("text_model.") else f"text_model.{full}"
            if all(full != o[1] for o in out):
                out.append((named.replace(".", "_"), full, child))
    return out


def kohya_file(components, rank=lambda i: 2 + i % 3, alpha=lambda i: float(1 + i % 4), seed=0,
               dtype=torch.float32, conv=False, alpha_dtype=None):
    """A kohya state dict for ``components`` (``{prefix: (model, "unet"|"te")}``): every module sd-scripts adapts
    gets random factors of rank ``rank(i)`` and an ``alpha(i)`` (None: no ``.alpha`` key)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    i = 0
    for prefix, (model, kind) in components.items():
        for kohya, _, module in sd_scripts_modules(model, kind, conv):
            r = rank(i)
            if isinstance(module, nn.Conv2d):
                down = torch.randn(r, module.in_channels, *module.kernel_size, generator=g)
                up = torch.randn(module.out_channels, r, 1, 1, generator=g)
            else:
                down = torch.randn(r, module.in_features, generator=g)
                up = torch.randn(module.out_features, r, generator=g)
            name = f"{prefix}_{kohya}"
            out[f"{name}.lora_down.weight"] = (0.3 * down).to(dtype)
            out[f"{name}.lora_up.weight"] = (0.3 * up).to(dtype)
            if alpha(i) is not None:
                out[f"{name}.alpha"] = torch.tensor(alpha(i), dtype=alpha_dtype or dtype)
            i += 1
    return out


def merged_by_hand(model, state, prefix, kind, conv=False):
    """A float64 copy of ``model`` with ``W + alpha/r · up @ down`` written into each adapted weight, straight from
    the file's tensors (alpha missing or 0: alpha = r, as sd-scripts reads it)."""
    reference = copy.deepcopy(model).double()
    with torch.no_grad():
        for kohya, full, _ in sd_scripts_modules(reference, kind, conv):
            name = f"{prefix}_{kohya}"
            if f"{name}.lora_down.weight" not in state:
                continue
            down, up = state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"]
            r = down.shape[0]
            alpha = float(state[f"{name}.alpha"]) if f"{name}.alpha" in state else 0.0
            alpha = alpha or r
            weight = reference.get_submodule(full).weight
            weight.add_(dense_update(down, up, alpha / r).reshape(weight.shape))
    return reference


def tiny_sdxl_unet(dtype=torch.float64):
    """SDXL's block layout in miniature: three levels, two layers each, attention on the lower two."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16, 16), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8, attention_head_dim=4, norm_num_groups=4,
    ).to(dtype).eval()


_SGM_RESNET = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
               "conv_shortcut": "skip_connection"}


def sgm_name(name, layers_per_block, attention_up_blocks):
    """Stability's (SGM) name of a diffusers UNet module, as sd-scripts' SDXL UNet calls it: ``input_blocks.N.i``
    counts one block per resnet (``.0``, with its attention as ``.1``) and one per downsampler (``.0.op``);
    ``output_blocks.N`` one per up resnet (its upsampler after the attention: ``.2``, or ``.1`` without one)."""
    L = layers_per_block
    parts = name.split(".")
    if parts[0] in ("down_blocks", "up_blocks", "mid_block") and parts[-1] in _SGM_RESNET and "resnets" in parts:
        parts = parts[:-1] + [_SGM_RESNET[parts[-1]]]
    if parts[0] == "down_blocks":
        b, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        if kind == "downsamplers":
            return ".".join(["input_blocks", str(1 + b * (L + 1) + L), "0", "op"])
        return ".".join(["input_blocks", str(1 + b * (L + 1) + j), "0" if kind == "resnets" else "1"] + rest)
    if parts[0] == "mid_block":
        index = {"resnets.0": 0, "attentions.0": 1, "resnets.1": 2}[f"{parts[1]}.{parts[2]}"]
        return ".".join(["middle_block", str(index)] + parts[3:])
    if parts[0] == "up_blocks":
        b, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        if kind == "upsamplers":
            inner = "2" if b in attention_up_blocks else "1"
            return ".".join(["output_blocks", str(b * (L + 1) + L), inner] + rest)
        return ".".join(["output_blocks", str(b * (L + 1) + j), "0" if kind == "resnets" else "1"] + rest)
    return {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
            "time_embedding.linear_2": "time_embed.2"}.get(name, name)


def as_sgm(state, unet):
    """A diffusers-named kohya UNet state dict renamed as sd-scripts names SDXL's UNet."""
    attention_up = {int(n.split(".")[1]) for n, _ in unet.named_modules() if n.startswith("up_blocks.")
                    and n.split(".")[2:3] == ["attentions"]}
    names = {f"lora_unet_{kohya}": f"lora_unet_{sgm_name(full, unet.config.layers_per_block, attention_up)}"
             .replace(".", "_") for kohya, full, _ in sd_scripts_modules(unet, "unet", conv=True)}
    out = {}
    for key, tensor in state.items():
        name, _, part = key.partition(".")
        out[f"{names[name]}.{part}"] = tensor
    return out
