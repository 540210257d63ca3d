"""Cost of the embedded EfficientNet-Lite image tower on CPU: one JSON line per figure.

    python -m benchmarks.image_tower [--variant efficientnet-lite0] [--px 96] [--batch 16]
                                     [--threads 2] [--reps 5]

Figures: LoRA r=8 trainable parameters (default targets) and the linear head's; training
images/s (AdamW over the LoRA tensors + a linear head) with the stem computed every step and
with stem outputs cached (the stem's cost then comes once per row, not once per step); stem
forward seconds per image; cached stem activation bytes per row at 64/96/128/160 px. Times are
the median of `--reps` runs after one warm-up, and their min (the least disturbed by other load
on a shared machine).
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from benchmarks.measure import emit, timed
from common.towers.image import EfficientNetTower

NUM_LABELS = 10


class Probe(nn.Module):
    """The tower and a linear head on its pooled features; `cached`: inputs are stem outputs."""

    def __init__(self, tower: EfficientNetTower):
        super().__init__()
        self.tower = tower
        self.fc = nn.Linear(tower.out_dim, NUM_LABELS)

    def forward(self, x: torch.Tensor, cached: bool = False) -> torch.Tensor:
        features = self.tower.head(x) if cached else self.tower(x)  # (B, D)
        return self.fc(features)  # (B, C)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", default="efficientnet-lite0")
    parser.add_argument("--px", type=int, default=96)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    common = {"variant": args.variant, "threads": args.threads}

    tower = EfficientNetTower(args.variant)
    config = LoraConfig(r=args.r, lora_alpha=2 * args.r, modules_to_save=["fc"],
                        target_modules=[f"tower.{n}" for n in tower.lora_targets])
    model = get_peft_model(Probe(tower), config).train()
    lora = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)
    head = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "fc" in n)
    emit(figure="trainable_params", r=args.r, lora=lora, linear_head=head,
         lora_layers=len(tower.lora_targets), stem_blocks=tower.split, **common)

    pixels = torch.rand(args.batch, 3, args.px, args.px) * 2 - 1  # (B, 3, H, W), mean/std 0.5
    labels = torch.randint(0, NUM_LABELS, (args.batch,))
    with torch.no_grad():
        cached = tower.stem(pixels)  # (B, C, h, w)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step(x: torch.Tensor, from_cache: bool) -> None:
        loss = nn.functional.cross_entropy(model(x, cached=from_cache), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()

    for mode, x, from_cache in (("stem_every_step", pixels, False), ("stem_cached", cached, True)):
        median, best = timed(partial(step, x, from_cache), args.reps)
        emit(figure="train_images_per_s", mode=mode, px=args.px, batch=args.batch, r=args.r,
             median=round(args.batch / median, 1), best=round(args.batch / best, 1), **common)

    with torch.no_grad():
        median, best = timed(lambda: tower.stem(pixels), args.reps)
    emit(figure="stem_forward_ms_per_image", px=args.px, batch=args.batch,
         median=round(1e3 * median / args.batch, 2), best=round(1e3 * best / args.batch, 2),
         **common)

    for px in (64, 96, 128, 160):
        with torch.no_grad():
            shape = tuple(tower.stem(torch.zeros(1, 3, px, px)).shape[1:])  # (C, h, w)
        numel = int(torch.Size(shape).numel())
        emit(figure="cached_bytes_per_row", px=px, shape=list(shape), float32=4 * numel,
             float16=2 * numel, variant=args.variant)


if __name__ == "__main__":
    main()
