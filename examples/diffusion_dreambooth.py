"""Diffusion, Dreambooth-style: LoRA teaches a diffusers UNet a new "subject" from five images.

No pretrained UNet ships in a package, so the example makes its own base model first: a small
``UNet2DConditionModel`` (built from a config) trained with a DDPM noise schedule on scikit-learn's 8×8 digits
0–8, each class conditioned on a fixed random "prompt" embedding. The subject is the digit 9, which the base never
saw: five images of it and a new fixed embedding (a rare token, as in Dreambooth). LoRA (rank 8) on the attention
projections ``to_q``, ``to_k``, ``to_v``, ``to_out.0`` learns it. Measured before and after:

- the denoising loss on held-out 9s (images not trained on, fixed noise seeds and timesteps), and on held-out
  digits 0–8 with their own prompts (what the adapter may disturb);
- samples drawn with the subject prompt (DDIM, 50 steps), read by a logistic-regression digit classifier trained
  on the real digits: the share that reads as a 9.

Then merged == unmerged, save in PEFT's format, reload, and export for diffusers (``pytorch_lora_weights.safetensors``,
for ``pipeline.load_lora_weights(folder)`` or ``unet.load_lora_adapter(folder, prefix="unet",
weight_name="pytorch_lora_weights.safetensors")``), loaded back by diffusers itself with the same outputs; and in
kohya's format (``kohya/dreambooth_lora.safetensors``, ``lora_unet_…`` keys with ``.alpha``: what A1111 and ComfyUI
load), read back by lorakit. ``lorakit convert OUTPUT_DIR lora.safetensors --to kohya`` does the same from the saved
PEFT folder.

    OMP_NUM_THREADS=1 python examples/diffusion_dreambooth.py   # 260 s on the busy 2-core machine (examples/README.md)
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorakit import LoraConfig, PeftModel, get_peft_model

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
KOHYA_NAME = "dreambooth_lora.safetensors"
COND_DIM = 32
SUBJECT = 9


def unet(seed: int = 0, size: int = 8, channels: tuple[int, int] = (32, 32)) -> nn.Module:
    """A small conditional UNet (one cross-attention level, 0.36 M parameters) with random weights."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=size, in_channels=1, out_channels=1, block_out_channels=channels, layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=COND_DIM, attention_head_dim=8, norm_num_groups=8,
    )


def scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True)


def prompts(n_classes: int = 10, seed: int = 1234) -> Tensor:
    """Fixed random "prompt" embeddings, one per class plus the subject's token (last row): ``(n + 1) × 1 × dim``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_classes + 1, 1, COND_DIM, generator=g)


def digit_images() -> tuple[Tensor, Tensor]:
    """scikit-learn's digits scaled to [-1, 1]: images ``N × 1 × 8 × 8`` and labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return torch.tensor(data.images, dtype=torch.float32)[:, None] / 8.0 - 1.0, torch.tensor(data.target)


def save_kohya_file(model: nn.Module, folder: Path) -> Path:
    """The adapter in kohya's format (A1111, ComfyUI, sd-scripts, ``pipeline.load_lora_weights``)."""
    from lorakit.kohya_file import save_kohya

    return save_kohya(folder / KOHYA_NAME, model)


def lora_config(r: int = 8) -> LoraConfig:
    return LoraConfig(r=r, lora_alpha=r, target_modules=TARGETS)


def noisy_batch(sched, images: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """The DDPM training input: ``(noisy images, timesteps, the noise to predict)``."""
    noise = torch.randn(images.shape, generator=g)
    t = torch.randint(0, sched.config.num_train_timesteps, (len(images),), generator=g)
    return sched.add_noise(images, noise, t), t, noise


def train(model: nn.Module, sched, images: Tensor, cond: Tensor, steps: int, lr: float, batch: int,
          seed: int = 0) -> float:
    """Noise-prediction (ε) MSE with AdamW; ``cond[i]`` is image ``i``'s prompt. Returns the mean of the last 50
    losses."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(images), (batch,), generator=g)
        noisy, t, noise = noisy_batch(sched, images[idx], g)
        loss = F.mse_loss(model(noisy, t, encoder_hidden_states=cond[idx]).sample, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return sum(losses[-50:]) / len(losses[-50:])


@torch.no_grad()
def denoising_loss(model: nn.Module, sched, images: Tensor, cond: Tensor, seeds: range) -> float:
    """Mean ε-MSE over ``images``, once per seed in ``seeds`` (each seed fixes the noise and the timesteps)."""
    total = 0.0
    for seed in seeds:
        noisy, t, noise = noisy_batch(sched, images, torch.Generator().manual_seed(seed))
        total += F.mse_loss(model(noisy, t, encoder_hidden_states=cond).sample, noise).item()
    return total / len(seeds)


@torch.no_grad()
def sample(model: nn.Module, cond: Tensor, n: int, steps: int = 50, seed: int = 0) -> Tensor:
    """``n`` images drawn with DDIM (``steps`` steps) under one prompt ``cond`` (``1 × dim``), in [-1, 1]."""
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler.from_config(scheduler().config)
    ddim.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    c = cond.expand(n, *cond.shape)
    for t in ddim.timesteps:
        x = ddim.step(model(x, t, encoder_hidden_states=c).sample, t, x).prev_sample
    return x.clamp(-1, 1)


def digit_reader(images: Tensor, labels: Tensor):
    """A logistic-regression classifier of 8×8 digits (scikit-learn), to read generated samples."""
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(max_iter=2000).fit(images.flatten(1).numpy(), labels.numpy())


def main() -> None:
    from common import Clock, check_merge, describe_files, parse_args, save_and_reload

    args = parse_args("diffusion_dreambooth", __doc__, pretrain_steps=(int, 600, "base model training steps"),
                      steps=(int, 300, "LoRA steps"), rank=(int, 8, "LoRA rank"), shots=(int, 5, "subject images"))
    clock = Clock()
    images, labels = digit_images()
    emb = prompts()
    subject_token = emb[-1]
    g = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(labels), generator=g)
    images, labels = images[order], labels[order]
    subject = images[labels == SUBJECT]
    shots, held_out = subject[: args.shots], subject[args.shots:]
    others = images[labels != SUBJECT]
    other_labels = labels[labels != SUBJECT]
    prior_train, prior_test = others[:-200], others[-200:]
    prior_train_y, prior_test_y = other_labels[:-200], other_labels[-200:]
    print(f"base data: {len(prior_train)} digits 0–8 (+{len(prior_test)} held out); "
          f"subject: {len(shots)} images of a {SUBJECT} (+{len(held_out)} held out)")
    sched = scheduler()
    reader = digit_reader(images, labels)

    base = unet(seed=args.seed)
    with clock.phase("base training"):
        loss = train(base, sched, prior_train, emb[prior_train_y], args.pretrain_steps, lr=2e-3, batch=32,
                     seed=args.seed)
    print(f"base UNet trained on digits 0–8: final loss {loss:.4f}")
    base_state = copy.deepcopy(base.state_dict())

    seeds = range(1000, 1008)  # held-out noise seeds
    subject_cond = subject_token.expand(len(held_out), *subject_token.shape)

    def measure(model: nn.Module) -> tuple[float, float, float]:
        subject_loss = denoising_loss(model, sched, held_out, subject_cond, seeds)
        prior_loss = denoising_loss(model, sched, prior_test, emb[prior_test_y], seeds)
        drawn = sample(model, subject_token, 64, seed=args.seed)
        share = float((reader.predict(drawn.flatten(1).numpy()) == SUBJECT).mean())
        return subject_loss, prior_loss, share

    with clock.phase("evaluation"):
        before = measure(base)
    print(f"base model: held-out subject loss {before[0]:.4f}, digits 0–8 loss {before[1]:.4f}, "
          f"subject-prompt samples read as {SUBJECT}: {before[2]:.0%}")

    torch.manual_seed(args.seed)
    model = get_peft_model(base, lora_config(args.rank))
    model.print_trainable_parameters()
    with clock.phase("LoRA training"):
        loss = train(model, sched, shots, subject_token.expand(len(shots), *subject_token.shape), args.steps,
                     lr=1e-3, batch=20, seed=args.seed + 1)
    with clock.phase("evaluation"):
        after = measure(model)
    print(f"LoRA on {len(shots)} images: final loss {loss:.4f}; held-out subject loss {before[0]:.4f} -> "
          f"{after[0]:.4f}, digits 0–8 loss {before[1]:.4f} -> {after[1]:.4f}, samples read as {SUBJECT}: "
          f"{before[2]:.0%} -> {after[2]:.0%}")

    x = held_out[:8]
    t = torch.tensor([10, 100, 200, 400, 600, 800, 900, 999])
    c = subject_cond[:8]
    forward = lambda m: m(x, t, encoder_hidden_states=c).sample  # noqa: E731
    err = check_merge(model, forward)
    print(f"merged == unmerged: max |Δε| {err:.2e}")

    def fresh_base() -> nn.Module:
        fresh = unet()
        fresh.load_state_dict(base_state)
        return fresh.eval()

    files, reload_diff = save_and_reload(model, args.output_dir, fresh_base, forward)
    print(f"saved to {args.output_dir}: {describe_files(files)}; reloaded: max |Δ| {reload_diff:.1e}")

    from lorakit.integrations.diffusers_export import save_diffusers_lora

    path = save_diffusers_lora(model, args.output_dir / "diffusers")
    theirs = fresh_base()
    # diffusers' own loader (it builds PEFT layers); a bare folder makes it look for a .bin unless told otherwise
    theirs.load_lora_adapter(str(path.parent), prefix="unet", weight_name=path.name)
    with torch.no_grad():
        diff = (forward(theirs) - forward(model)).abs().max().item()
    print(f"exported for diffusers: {path} ({path.stat().st_size / 1024:.1f} KiB); diffusers' UNet with it "
          f"differs by {diff:.2e}")
    kohya = save_kohya_file(model, args.output_dir / "kohya")
    with torch.no_grad():
        diff = (forward(PeftModel.from_pretrained(fresh_base(), kohya)) - forward(model)).abs().max().item()
    print(f"kohya format (A1111 / ComfyUI): {kohya} ({kohya.stat().st_size / 1024:.1f} KiB); read back by lorakit: "
          f"max |Δ| {diff:.1e}")
    print(f"RESULT diffusion_dreambooth: subject loss {before[0]:.4f} -> {after[0]:.4f}, prior loss {before[1]:.4f} -> "
          f"{after[1]:.4f}, samples read as {SUBJECT} {before[2]:.0%} -> {after[2]:.0%}; {clock.report()}")


if __name__ == "__main__":
    main()
