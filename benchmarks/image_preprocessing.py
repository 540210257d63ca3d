"""Which padding, BatchNorm eps and normalisation the packaged EfficientNet-Lite0 weights expect.

    python -m benchmarks.image_preprocessing [--crops 32] [--threads 1]

Each setting classifies random crops (scale 0.35-1, flipped half the time) of scikit-learn's
sample photos at 96/128/224 px and prints one JSON line: top-1/top-5 hit rate and mean NLL of the
photo's classes (china: a building, flower: daisy), and `bn_gap`, a label-free score: how far each
BatchNorm's batch statistics sit from its running statistics (mean over layers of the squared
standardised mean shift plus the squared log variance ratio; the inputs the weights were trained
on give the smallest gap).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import timm
import torch
from sklearn.datasets import load_sample_images
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, ImageNetInfo
from torch import nn
from torchvision.transforms import v2

from common.towers.efficientnet_lite import timm_state_dict

CLASSES = {"china": {"monastery", "palace", "bell cote", "church", "mosque", "stupa", "pagoda",
                     "dome", "castle", "boathouse", "vault"},
           "flower": {"daisy"}}
MODELS = {  # setting -> (timm architecture, kwargs)
    "tf_same_pad_eps1e-3": ("tf_efficientnet_lite0", {}),
    "symmetric_pad_eps1e-3": ("efficientnet_lite0", {"bn_eps": 1e-3}),
    "symmetric_pad_eps1e-5": ("efficientnet_lite0", {}),
}
NORMS = {"mean_std_0.5": ((0.5,) * 3, (0.5,) * 3),
         "imagenet": (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)}


def crops(px: int, n: int) -> tuple[torch.Tensor, list[str]]:
    """`n` random crops of each sample photo at `px`, in [0, 1]: (N, 3, px, px) and photo names."""
    torch.manual_seed(px)
    crop = v2.Compose([v2.RandomResizedCrop(px, scale=(0.35, 1.0), antialias=True,
                                            interpolation=v2.InterpolationMode.BICUBIC),
                       v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True)])
    sample = load_sample_images()
    photos = {Path(f).stem: torch.tensor(img).permute(2, 0, 1)  # (3, H, W) uint8
              for f, img in zip(sample.filenames, sample.images, strict=True)}
    xs = [crop(photos[name]) for name in CLASSES for _ in range(n)]
    return torch.stack(xs), [name for name in CLASSES for _ in range(n)]


def bn_gap(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Run `model` on `x`; return its logits and the mean BatchNorm statistics gap."""
    gaps = []

    def hook(bn: nn.BatchNorm2d, inputs: tuple[torch.Tensor]) -> None:
        a = inputs[0]  # (N, C, H, W)
        var = bn.running_var + bn.eps
        shift = (a.mean((0, 2, 3)) - bn.running_mean) ** 2 / var
        ratio = torch.log((a.var((0, 2, 3)) + bn.eps) / var) ** 2
        gaps.append((shift.mean() + ratio.mean()).item())

    hooks = [m.register_forward_pre_hook(hook) for m in model.modules()
             if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        logits = model(x)
    for h in hooks:
        h.remove()
    return logits, sum(gaps) / len(gaps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--crops", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    info = ImageNetInfo()
    names = [info.index_to_description(i).split(",")[0] for i in range(1000)]
    wanted = {k: torch.tensor([n in v for n in names]) for k, v in CLASSES.items()}  # (1000,)
    data = {px: crops(px, args.crops) for px in (96, 128, 224)}
    for setting, (arch, kwargs) in MODELS.items():
        model = timm.create_model(arch, **kwargs).eval()
        model.load_state_dict(timm_state_dict("efficientnet-lite0", model))
        for norm, (mean, std) in NORMS.items():
            for px, (x, photos) in data.items():
                x = v2.functional.normalize(x, list(mean), list(std))
                logits, gap = bn_gap(model, x)
                logp = logits.log_softmax(-1)  # (N, 1000)
                ok = torch.stack([wanted[p] for p in photos])  # (N, 1000)
                nll = -torch.logsumexp(logp.masked_fill(~ok, -torch.inf), -1).mean()
                top1 = ok.gather(1, logp.argmax(-1, keepdim=True)).float().mean()
                top5 = ok.gather(1, logp.topk(5).indices).any(-1).float().mean()
                print(json.dumps({"setting": setting, "norm": norm, "px": px,
                                  "top1": round(top1.item(), 3), "top5": round(top5.item(), 3),
                                  "nll": round(nll.item(), 3), "bn_gap": round(gap, 3)}),
                      flush=True)


if __name__ == "__main__":
    main()
