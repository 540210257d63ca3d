"""Multimodal heterogeneity applied per site after partitioning: pure, seeded, recorded.

`apply_skews` returns a skewed copy of a site's `Encoded` data and the realised statistics.
Missing-modality *clients*: the first round(missing_image_clients * N) sites lose every image,
the last round(missing_text_clients * N) sites lose every text (no overlap while both are
< 0.5). Per-sample missing rates are the same on every site and drawn from one uniform u per
sample: image absent if u < rate_image, else text absent if u >= 1 - rate_text, so both
realised rates are exact (while rate_image + rate_text <= 1) and never overlap. The four
*levels* (image_noise, image_blur, text_corruption, label_noise) are maxima: site i of N gets
level * i / (N - 1). A sample never loses both modalities (the text is kept). Every draw comes
from `numpy.random.default_rng([seed, site])`, one independent child stream per skew, so turning
one skew on never changes the draws of another; nothing touches a global RNG.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from common.config import SkewConfig
from common.data import Encoded

MAX_BLUR_SIGMA = 3.0  # pixels: the Gaussian blur sigma at image_blur level 1
STREAMS = ("missing", "image_noise", "text_corruption", "label_noise")


def site_levels(level: float, num_sites: int) -> list[float]:
    """Return the level of each site: level * i / (N - 1), all 0 for a single site."""
    if num_sites < 1:
        raise ValueError(f"num_sites must be >= 1 (got {num_sites})")
    if num_sites == 1:
        return [0.0]
    return [level * i / (num_sites - 1) for i in range(num_sites)]


def missing_sites(fraction: float, num_sites: int) -> int:
    """Return round(fraction * N), halves rounded up, the number of sites losing a modality."""
    return int(math.floor(fraction * num_sites + 0.5))


def blur_images(pixels: torch.Tensor, level: float) -> torch.Tensor:
    """Gaussian-blur (N, 3, H, W) images with sigma = level * MAX_BLUR_SIGMA pixels (0: none)."""
    sigma = level * MAX_BLUR_SIGMA
    if sigma <= 0 or pixels.shape[0] == 0:
        return pixels
    from torchvision.transforms.v2 import functional as tvf

    side = min(pixels.shape[-2:])
    kernel = min(2 * math.ceil(3 * sigma) + 1, 2 * side - 1)  # odd; reflect pad < side
    return tvf.gaussian_blur(pixels, [kernel, kernel], [sigma, sigma])  # (N, 3, H, W)


def corrupt_text(text: str, p: float, rng: np.random.Generator) -> str:
    """Drop each word, or swap it with the next, with probability `p` (one word always kept)."""
    words = text.split()
    if p <= 0 or not words:
        return text
    out: list[str] = []
    i = 0
    while i < len(words):
        if rng.random() < p:
            if rng.random() < 0.5:  # drop
                i += 1
                continue
            if i + 1 < len(words):  # swap with the adjacent word
                out += [words[i + 1], words[i]]
                i += 2
                continue
        out.append(words[i])
        i += 1
    return " ".join(out) if out else words[int(rng.integers(len(words)))]


def flip_labels(labels: torch.Tensor, p: float, num_classes: int, rng: np.random.Generator
                ) -> torch.Tensor:
    """Flip each label with probability `p` to a uniformly drawn *other* class (per sample)."""
    if num_classes < 2 or p <= 0:
        return labels.clone()
    flip = rng.random(labels.shape[0]) < p  # (N,)
    shift = rng.integers(1, num_classes, labels.shape[0])  # (N,) in [1, C - 1]
    noisy = (labels.numpy() + shift) % num_classes  # (N,) never the true class
    return torch.from_numpy(np.where(flip, noisy, labels.numpy())).to(labels.dtype)  # (N,)


def apply_skews(data: Encoded, cfg: SkewConfig, site: int, num_sites: int, seed: int,
                num_classes: int | None = None) -> tuple[Encoded, dict]:
    """Return site `site`'s skewed copy of `data` and the realised skew statistics.

    `num_classes` is the size of the label set (default: the largest label here + 1; pass
    the real one, a site may lack the last classes).
    """
    if not 0 <= site < num_sites:
        raise ValueError(f"site must be in [0, {num_sites}) (got {site})")
    n = len(data)
    streams = dict(zip(STREAMS, np.random.default_rng([seed, site]).spawn(len(STREAMS))))
    level = {k: site_levels(getattr(cfg, k), num_sites)[site]
             for k in ("image_noise", "image_blur", "text_corruption", "label_noise")}

    no_images = site < missing_sites(cfg.missing_image_clients, num_sites)
    no_texts = site >= num_sites - missing_sites(cfg.missing_text_clients, num_sites)
    u = streams["missing"].random(n)  # (N,)
    drop_image = u < cfg.missing_image_rate  # (N,)
    drop_text = (u >= 1 - cfg.missing_text_rate) & ~drop_image  # (N,) the text wins a tie
    has_image = data.has_image & ~torch.from_numpy(drop_image | no_images)  # (N,)
    has_text = data.has_text & ~torch.from_numpy(drop_text | no_texts)  # (N,)
    neither = ~has_image & ~has_text  # (N,)
    has_text |= neither & data.has_text  # keep the text where there was one ...
    has_image |= neither & ~data.has_text  # ... else the image the row still had

    pixels = blur_images(data.pixel_values, level["image_blur"])  # (N, 3, H, W)
    if level["image_noise"] > 0:
        gen = torch.Generator().manual_seed(int(streams["image_noise"].integers(2**62)))
        noise = torch.randn(pixels.shape, generator=gen, dtype=pixels.dtype)  # (N, 3, H, W)
        pixels = pixels + level["image_noise"] * noise
    pixels = torch.where(has_image.view(-1, 1, 1, 1), pixels, torch.zeros((), dtype=pixels.dtype))
    texts = [corrupt_text(t, level["text_corruption"], streams["text_corruption"]) if keep
             else "" for t, keep in zip(data.texts, has_text.tolist())]

    if num_classes is None:
        num_classes = int(data.labels.max()) + 1 if n else 0
    labels = flip_labels(data.labels, level["label_noise"], num_classes, streams["label_noise"])
    out = Encoded(pixels.contiguous(), texts, labels, has_image, has_text)
    stats = {
        "site": site, "image_missing_site": bool(no_images), "text_missing_site": bool(no_texts),
        "missing_image_rate": float((~has_image).float().mean()) if n else 0.0,
        "missing_text_rate": float((~has_text).float().mean()) if n else 0.0,
        "label_flip_rate": float((labels != data.labels).float().mean()) if n else 0.0,
        "image_noise": level["image_noise"], "image_blur": level["image_blur"],
        "image_blur_sigma": level["image_blur"] * MAX_BLUR_SIGMA,
        "text_corruption": level["text_corruption"], "label_noise": level["label_noise"],
    }
    return out, stats
