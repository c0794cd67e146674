"""Semantic segmentation: LoRA adapts a SegFormer to a new image domain; mIoU before and after.

No pretrained SegFormer ships in a package, so the example makes its own base model first: a small
``SegformerForSemanticSegmentation`` (built from a config) trained in full on generated "dark" scenes (bright
rectangles and circles on a dark background, per-pixel labels background/rectangle/circle). The new domain is
"light" scenes: dark shapes on a bright, noisy background, where the base model does poorly. LoRA (rank 8) on
every attention and MLP projection (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, ``fc1``, ``fc2``) plus the
decode head in ``modules_to_save`` learns the light domain from 200 images; with the adapter disabled the model is
the base again, still good on dark scenes. Then merged == unmerged, save in PEFT's format, reload.

    OMP_NUM_THREADS=1 python examples/segmentation.py   # 215 s on the busy 2-core machine (examples/README.md)
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorakit import LoraConfig, get_peft_model

CLASSES = ("background", "rectangle", "circle")
#: background covers about 85% of the pixels; weighted down, it no longer drowns out telling the shapes apart
CLASS_WEIGHTS = torch.tensor([0.3, 1.0, 1.0])
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"]


def make_shapes(n: int, size: int = 64, style: str = "dark", seed: int = 0) -> tuple[Tensor, Tensor]:
    """``n`` scenes of 1–3 rectangles and circles (later ones on top): images ``n × 3 × size × size`` in [0, 1] and
    labels ``n × size × size`` (0 background, 1 rectangle, 2 circle).

    ``style="dark"``: bright shapes on a plain dark background. ``"light"``: dark shapes on a bright background
    with a gradient and pixel noise.
    """
    if style not in ("dark", "light"):
        raise ValueError(f"style={style!r} is invalid: expected 'dark' or 'light'")
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    if style == "dark":
        images = (0.05 + 0.25 * rand(n, 3, 1, 1)).expand(n, 3, size, size).clone()
    else:
        tilt = (xx / size)[None, None] * (0.3 * rand(n, 1, 1, 1) - 0.15)
        images = (0.65 + 0.25 * rand(n, 3, 1, 1) + tilt + 0.08 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 1)
    labels = torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):
        for _ in range(1 + int(rand(1) * 3)):
            kind = 1 + int(rand(1) * 2)
            cy, cx = (rand(2) * size).tolist()
            if kind == 1:
                h, w = (size * (0.2 + 0.25 * rand(2))).tolist()
                mask = ((yy - cy).abs() <= h / 2) & ((xx - cx).abs() <= w / 2)
            else:
                radius = size * (0.1 + 0.12 * rand(1).item())
                mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
            color = 0.6 + 0.4 * rand(3) if style == "dark" else 0.35 * rand(3)
            images[i][:, mask] = color[:, None]
            labels[i][mask] = kind
    return images, labels


def segformer(num_labels: int = len(CLASSES), seed: int = 0) -> nn.Module:
    """A small SegFormer (four stages of one block, 0.46 M parameters) with random weights."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    torch.manual_seed(seed)
    config = SegformerConfig(num_channels=3, num_encoder_blocks=4, depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 64, 128],
                             num_attention_heads=[1, 2, 4, 8], sr_ratios=[8, 4, 2, 1], decoder_hidden_size=64,
                             num_labels=num_labels)
    return SegformerForSemanticSegmentation(config)


def lora_config(r: int = 8) -> LoraConfig:
    return LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, modules_to_save=["decode_head"])


def pixel_logits(model: nn.Module, images: Tensor) -> Tensor:
    """SegFormer predicts at a quarter of the input resolution; upsample its logits to the labels' size."""
    logits = model(pixel_values=images).logits
    return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


def train(model: nn.Module, images: Tensor, labels: Tensor, steps: int, lr: float, batch: int = 16,
          seed: int = 0) -> float:
    """AdamW on the model's trainable parameters with a cosine schedule, class-weighted cross-entropy; returns the
    mean loss of the last 20 steps."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(images), (batch,), generator=g)
        loss = F.cross_entropy(pixel_logits(model, images[idx]), labels[idx], weight=CLASS_WEIGHTS)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    return sum(losses[-20:]) / len(losses[-20:])


@torch.no_grad()
def predict(model: nn.Module, images: Tensor, batch: int = 64) -> Tensor:
    return torch.cat([pixel_logits(model, images[i:i + batch]).argmax(1) for i in range(0, len(images), batch)])


def mean_iou(pred: Tensor, target: Tensor, num_classes: int = len(CLASSES)) -> tuple[float, list[float]]:
    """Dataset-level mIoU: per class, pixels where prediction and label agree over pixels where either says that
    class, summed over the whole set; the mean is over classes that occur in either. Returns ``(mIoU, per-class IoU)``
    (NaN for a class that occurs in neither)."""
    if pred.shape != target.shape:
        raise ValueError(f"pred has shape {tuple(pred.shape)}, target {tuple(target.shape)}: expected the same")
    confusion = torch.bincount(target.flatten() * num_classes + pred.flatten(), minlength=num_classes**2)
    confusion = confusion.reshape(num_classes, num_classes).double()
    intersection = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - intersection
    iou = torch.where(union > 0, intersection / union.clamp(min=1), torch.full_like(union, float("nan")))
    return iou[union > 0].mean().item(), iou.tolist()


def main() -> None:
    from common import Clock, check_merge, describe_files, parse_args, save_and_reload

    args = parse_args("segmentation", __doc__, pretrain_steps=(int, 700, "full training steps of the base model"),
                      steps=(int, 250, "LoRA steps"), rank=(int, 8, "LoRA rank"))
    clock = Clock()
    with clock.phase("data"):
        dark_train, dark_train_y = make_shapes(800, style="dark", seed=1)
        dark_test, dark_test_y = make_shapes(200, style="dark", seed=2)
        light_train, light_train_y = make_shapes(200, style="light", seed=3)
        light_test, light_test_y = make_shapes(200, style="light", seed=4)

    base = segformer(seed=args.seed)
    with clock.phase("base training"):
        loss = train(base, dark_train, dark_train_y, args.pretrain_steps, lr=4e-3, seed=args.seed)
    print(f"base model trained in full on dark scenes: final loss {loss:.3f}")
    base_dark = mean_iou(predict(base, dark_test), dark_test_y)[0]
    base_light, base_light_iou = mean_iou(predict(base, light_test), light_test_y)
    print(f"base model: mIoU dark {base_dark:.3f}, light {base_light:.3f} "
          f"(per class {', '.join(f'{c} {v:.2f}' for c, v in zip(CLASSES, base_light_iou))})")
    base_state = copy.deepcopy(base.state_dict())

    torch.manual_seed(args.seed)
    model = get_peft_model(base, lora_config(args.rank))
    model.print_trainable_parameters()
    with clock.phase("LoRA training"):
        loss = train(model, light_train, light_train_y, args.steps, lr=3e-3, seed=args.seed + 1)
    lora_light, lora_light_iou = mean_iou(predict(model, light_test), light_test_y)
    with model.disable_adapter():
        disabled_dark = mean_iou(predict(model, dark_test), dark_test_y)[0]
    print(f"LoRA on light scenes (200 images): final loss {loss:.3f}; mIoU light {base_light:.3f} -> {lora_light:.3f} "
          f"(per class {', '.join(f'{c} {v:.2f}' for c, v in zip(CLASSES, lora_light_iou))})")
    print(f"adapter disabled: mIoU dark {disabled_dark:.3f} (base {base_dark:.3f})")

    sample = light_test[:16]
    err = check_merge(model, lambda m: pixel_logits(m, sample))
    print(f"merged == unmerged: max |Δlogit| {err:.2e}")

    def fresh_base() -> nn.Module:
        fresh = segformer()
        fresh.load_state_dict(base_state)
        return fresh.eval()

    files, reload_diff = save_and_reload(model, args.output_dir, fresh_base, lambda m: pixel_logits(m, sample))
    print(f"saved to {args.output_dir}: {describe_files(files)}; reloaded: max |Δ| {reload_diff:.1e}")
    print(f"RESULT segmentation: mIoU light {base_light:.3f} -> {lora_light:.3f}, "
          f"dark (adapter off) {disabled_dark:.3f}; "
          f"{clock.report()}")


if __name__ == "__main__":
    main()
