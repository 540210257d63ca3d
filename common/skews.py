"""Multimodal heterogeneity applied per site after partitioning: pure, seeded, recorded.

`apply_skews` returns a skewed copy of a site's `Encoded` data and the realised statistics.
Missing-modality *clients*: of N sites, the first round(missing_image_clients * N) lose every
image, the next round(missing_audio_clients * N) every audio clip and the last
round(missing_text_clients * N) every text (no overlap while the three fractions sum to <= 1).
Per-sample missing rates are the same on every site and drawn from one uniform u per sample:
image absent if u < rate_image, else audio absent if u < rate_image + rate_audio, else text
absent if u >= 1 - rate_text, so every realised rate is exact (while the rates sum to <= 1)
and they never overlap. The four *levels* (image_noise, image_blur, text_corruption,
label_noise) are maxima: site i of N gets level * i / (N - 1). A sample never loses all its
modalities (it keeps its text, else its image, else its audio). Skews of a modality the data
does not hold do nothing. Every draw comes from `numpy.random.default_rng([seed, site])`, one
independent child stream per skew, so turning one skew on never changes the draws of another;
nothing touches a global RNG.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from common.config import SkewConfig
from common.encoded import Clips, Encoded

MAX_BLUR_SIGMA = 3.0  # pixels: the Gaussian blur sigma at image_blur level 1
STREAMS = ("missing", "image_noise", "text_corruption", "label_noise")
KEEP_ORDER = ("text", "image", "audio")  # what a row that lost every modality keeps


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

    u = streams["missing"].random(n)  # (N,)
    lost_sites = missing_site_ranges(cfg, num_sites)
    present = {}
    for m in data.modalities:
        low, high = _missing_band(cfg, m)
        dropped = (u >= low) & (u < high) | (site in lost_sites[m])  # (N,)
        present[m] = data.has(m) & ~torch.from_numpy(dropped)
    none = ~torch.stack(list(present.values())).any(0)  # (N,) rows that lost everything
    for m in KEEP_ORDER:  # keep the text where there was one, else the image, else the audio
        if m in present:
            kept = none & data.has(m)
            present[m] |= kept
            none &= ~kept

    inputs = dict(data.inputs)
    if "image" in inputs:
        pixels = blur_images(data.pixel_values, level["image_blur"])  # (N, 3, H, W)
        if level["image_noise"] > 0:
            gen = torch.Generator().manual_seed(int(streams["image_noise"].integers(2**62)))
            noise = torch.randn(pixels.shape, generator=gen, dtype=pixels.dtype)
            pixels = pixels + level["image_noise"] * noise  # (N, 3, H, W)
        inputs["image"] = torch.where(present["image"].view(-1, 1, 1, 1), pixels,
                                      torch.zeros((), dtype=pixels.dtype)).contiguous()
    if "text" in inputs:
        inputs["text"] = [corrupt_text(t, level["text_corruption"], streams["text_corruption"])
                          if keep else "" for t, keep in zip(data.texts, present["text"].tolist())]
    if "audio" in inputs:
        clips = data.inputs["audio"]
        keep = present["audio"].view(-1, *[1] * (clips.features.dim() - 1))
        inputs["audio"] = Clips(torch.where(keep, clips.features, 0.0), clips.mask)

    if num_classes is None:
        num_classes = int(data.labels.max()) + 1 if n else 0
    labels = flip_labels(data.labels, level["label_noise"], num_classes, streams["label_noise"])
    out = Encoded(labels, inputs, present)
    stats: dict = {"site": site}
    for m in data.modalities:
        stats[f"{m}_missing_site"] = site in lost_sites[m]
        stats[f"missing_{m}_rate"] = float((~present[m]).float().mean()) if n else 0.0
    stats["label_flip_rate"] = float((labels != data.labels).float().mean()) if n else 0.0
    stats.update(level, image_blur_sigma=level["image_blur"] * MAX_BLUR_SIGMA)
    return out, stats


def missing_site_ranges(cfg: SkewConfig, num_sites: int) -> dict[str, range]:
    """The sites that lose each modality entirely: image first, audio next, text last."""
    images = missing_sites(cfg.missing_image_clients, num_sites)
    audio = missing_sites(cfg.missing_audio_clients, num_sites)
    texts = missing_sites(cfg.missing_text_clients, num_sites)
    return {"image": range(images), "audio": range(images, images + audio),
            "text": range(num_sites - texts, num_sites)}


def _missing_band(cfg: SkewConfig, modality: str) -> tuple[float, float]:
    """The interval of the per-sample uniform u in which `modality` goes missing."""
    image, audio = cfg.missing_image_rate, cfg.missing_audio_rate
    return {"image": (0.0, image), "audio": (image, image + audio),
            "text": (max(1.0 - cfg.missing_text_rate, image + audio), 1.0)}[modality]
