"""Site datasets as manifests: load, validate and encode image+text+label rows.

A manifest is a CSV (`.csv`) or JSON Lines (`.jsonl`, or `.json` holding lines or one list)
file with columns `image` (path relative to the manifest's folder, or absolute), `text`,
`label` (class name) and optionally `site`. `load_manifest` checks every row cheaply (image
header only), skips and counts bad rows, and returns a `datasets.Dataset` with absolute
image paths; `encode` turns it into tensors for training.
"""

from __future__ import annotations

import csv
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import datasets
import numpy as np
import torch
from PIL import Image, ImageOps

log = logging.getLogger(__name__)
REQUIRED = ("image", "text", "label")
_HIGH_BIT_MODES = ("I", "F", "I;16", "I;16L", "I;16B", "I;16N")


class ManifestError(ValueError):
    """A manifest or its data is unusable; the message names the file."""


@dataclass
class ManifestStats:
    path: Path
    rows: int  # rows kept
    skipped: int
    reasons: dict[str, int] = field(default_factory=dict)


@dataclass
class Encoded:
    """Encoded rows; `has_image` / `has_text` mark which modalities each row really has."""

    pixel_values: torch.Tensor  # (N, 3, H, W) float32, normalised
    texts: list[str]
    labels: torch.Tensor  # (N,) int64 class indices
    has_image: torch.Tensor | None = None  # (N,) bool; None: all True
    has_text: torch.Tensor | None = None  # (N,) bool; None: all True
    stems: dict = field(default_factory=dict, compare=False, repr=False)  # common/stems.py

    def __post_init__(self) -> None:
        n = len(self.texts)
        if self.pixel_values.shape[0] != n or self.labels.shape[0] != n:
            raise RuntimeError(f"Encoded sizes disagree: {self.pixel_values.shape[0]}, {n}, "
                               f"{self.labels.shape[0]}")
        for name in ("has_image", "has_text"):
            mask = getattr(self, name)
            mask = torch.ones(n, dtype=torch.bool) if mask is None else torch.as_tensor(
                mask).to(torch.bool).reshape(-1)
            if mask.shape[0] != n:
                raise RuntimeError(f"Encoded {name} has {mask.shape[0]} rows, expected {n}")
            setattr(self, name, mask)
        neither = ~(self.has_image | self.has_text)  # (N,)
        if bool(neither.any()):
            raise ValueError(f"{int(neither.sum())} rows have neither image nor text (first: row "
                             f"{int(neither.nonzero()[0])}); a row must keep one modality")

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int]) -> Encoded:
        """Return the rows at `indices`, in that order."""
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return Encoded(self.pixel_values[idx], [self.texts[i] for i in idx.tolist()],
                       self.labels[idx], self.has_image[idx], self.has_text[idx])


def _read_rows(path: Path) -> tuple[set[str], list[Any]]:
    """Read raw rows and the column names from a CSV or JSON(L) manifest."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            with path.open(newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f)
                rows: list[Any] = list(reader)
                return set(reader.fieldnames or ()), rows
        if suffix not in (".jsonl", ".json"):
            raise ManifestError(f"{path}: unsupported manifest type '{suffix}' "
                                "(use .csv, .jsonl or .json)")
        content = path.read_text(encoding="utf-8-sig")
        if content.lstrip().startswith("["):
            rows = json.loads(content)
        else:
            rows = []
            for lineno, line in enumerate(content.splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise ManifestError(f"{path}:{lineno}: invalid JSON ({err.msg})") from None
    except json.JSONDecodeError as err:
        raise ManifestError(f"{path}: invalid JSON ({err.msg}, line {err.lineno})") from None
    except UnicodeDecodeError:
        raise ManifestError(f"{path}: not UTF-8 text") from None
    except csv.Error as err:
        raise ManifestError(f"{path}: invalid CSV ({err})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ManifestError(f"{path}: every JSON row must be an object")
    return {k for r in rows for k in r}, rows


def _check_row(row: dict[str, Any], base: Path) -> tuple[dict[str, str] | None, str]:
    """Return the cleaned row, or None and the reason it is unusable."""
    text, label, image = row.get("text"), row.get("label"), row.get("image")
    if not isinstance(text, str) or not text.strip():
        return None, "empty or non-string text"
    if isinstance(label, bool) or not isinstance(label, (str, int)) or not str(label).strip():
        return None, "empty label"
    if not isinstance(image, str) or not image.strip():
        return None, "empty image path"
    path = Path(image.strip()).expanduser()
    path = (path if path.is_absolute() else base / path).resolve()
    if not path.is_file():
        return None, "missing image file"
    try:
        with Image.open(path) as im:  # reads the header only
            im.size
    except (OSError, Image.DecompressionBombError):
        return None, "unreadable image"
    out = {"image": str(path), "text": text.strip(), "label": str(label).strip()}
    if "site" in row:
        out["site"] = "" if row["site"] is None else str(row["site"])
    return out, ""


def load_manifest(path: str | Path) -> tuple[datasets.Dataset, ManifestStats]:
    """Load a manifest, skipping and counting bad rows; raise ManifestError if none are usable."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    columns, raw = _read_rows(path)
    if not raw:
        raise ManifestError(f"{path}: manifest has no rows")
    for col in REQUIRED:
        if col not in columns:
            raise ManifestError(f"{path}: missing column '{col}' (required: {', '.join(REQUIRED)})")
    base = path.resolve().parent
    kept: list[dict[str, str]] = []
    reasons: Counter[str] = Counter()
    for row in raw:
        clean, reason = _check_row(row, base)
        if clean is None:
            reasons[reason] += 1
        else:
            if "site" in columns:
                clean.setdefault("site", "")
            kept.append(clean)
    stats = ManifestStats(path, len(kept), sum(reasons.values()), dict(reasons))
    if not kept:
        raise ManifestError(f"{path}: all {len(raw)} rows are unusable ({_fmt(reasons)})")
    if stats.skipped:
        log.warning("%s: skipped %d of %d rows (%s)", path, stats.skipped, len(raw), _fmt(reasons))
    return datasets.Dataset.from_list(kept), stats


def _fmt(reasons: Counter[str] | dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items()))


def label_names(ds: datasets.Dataset) -> list[str]:
    """Return the sorted unique labels of a (training) dataset."""
    return sorted(set(ds["label"]))


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; transparent pixels become white."""
    if im.mode in _HIGH_BIT_MODES:
        a = np.asarray(im, dtype=np.float32)
        if im.mode == "F" and a.max(initial=0) <= 1.0:
            a = a * 255.0  # float image in [0, 1]
        elif a.max(initial=0) > 255:
            a = a / 257.0  # 16-bit range -> 8-bit
        im = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
        im = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im)
    return im.convert("RGB")


def _load_image(path: str | Path, size: int) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im = _to_rgb(ImageOps.exif_transpose(im))
            im = im.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(im, dtype=np.uint8)  # (H, W, 3)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ManifestError(f"{path}: cannot decode image ({err})") from None


def encode_images(paths: Sequence[str | Path], image_size: int, mean: Sequence[float],
                  std: Sequence[float]) -> torch.Tensor:
    """Decode, convert to RGB, resize and normalise images into an (N, 3, S, S) float32 tensor."""
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"mean/std need 3 values and std > 0 (got {mean}, {std})")
    arr = np.empty((len(paths), image_size, image_size, 3), dtype=np.uint8)  # (N, H, W, 3)
    for i, p in enumerate(paths):
        arr[i] = _load_image(p, image_size)
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(255.0)  # (N, 3, H, W) in [0, 1]
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return ((x - m) / s).contiguous()  # (N, 3, H, W)


def encode_labels(labels: Iterable[str], names: Sequence[str],
                  source: str | Path | None = None) -> torch.Tensor:
    """Map label strings to indices into `names`; unknown labels raise ManifestError."""
    index = {n: i for i, n in enumerate(names)}
    out = []
    for lab in labels:
        if lab not in index:
            where = f"{source}: " if source else ""
            raise ManifestError(f"{where}label '{lab}' is not in the training label set "
                                f"{list(names)}")
        out.append(index[lab])
    return torch.tensor(out, dtype=torch.long)  # (N,)


def encode(ds: datasets.Dataset, names: Sequence[str], image_size: int, mean: Sequence[float],
           std: Sequence[float], source: str | Path | None = None) -> Encoded:
    """Encode a loaded manifest into pixel tensors, texts, label indices and presence masks.

    Every manifest row has both modalities (`load_manifest` skips rows without); missing ones
    are simulated later by `common.skews`, and `Encoded` refuses a row that lost both.
    """
    present = torch.ones(len(ds), dtype=torch.bool)  # (N,)
    return Encoded(encode_images(list(ds["image"]), image_size, mean, std), list(ds["text"]),
                   encode_labels(list(ds["label"]), names, source),
                   has_image=present, has_text=present.clone())
