"""Site datasets as manifests: load, validate and encode image+text+label rows.

A manifest is a CSV (`.csv`) or JSON Lines (`.jsonl`, or `.json` holding lines or one list)
file with columns `image` (path relative to the manifest's folder, or absolute), `text`,
`label` (class name) and optionally `site`; a column name may appear once. `load_manifest`
checks every row and decodes every image in full (the verdict is cached per file version),
skips and counts bad rows, names the first few in its warning, and returns a
`datasets.Dataset` with absolute image paths; `encode` turns it into tensors for training
with the same decoder, so it never meets an image the check let through undecoded.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import struct
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import datasets
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)
REQUIRED = ("image", "text", "label")
_HIGH_BIT_MODES = ("I", "F", "I;16", "I;16L", "I;16B", "I;16N")
SHOWN_ROWS = 5  # rows named per skip reason in the warning
# What PIL raises on bad image data (its plugins are not consistent about it)
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error,
                  Image.DecompressionBombError)
_VERDICTS: dict[tuple[str, int, int, int, int], str] = {}  # file key -> "" or the problem
_MAX_VERDICTS = 1_000_000


class ManifestError(ValueError):
    """A manifest or its data is unusable; the message names the file."""


@dataclass
class ManifestStats:
    path: Path
    rows: int  # rows kept
    skipped: int
    reasons: dict[str, int] = field(default_factory=dict)  # reason -> rows skipped for it
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> first rows ("line 4")
    columns: tuple[str, ...] = ()  # the manifest's own columns


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


class _DuplicateKeys(ValueError):
    """A JSON object repeats a key (raised inside json.loads, reported with the file)."""


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Build a JSON object, refusing repeated keys (json.loads would keep the last silently)."""
    counts = Counter(k for k, _ in pairs)
    if len(counts) < len(pairs):
        raise _DuplicateKeys(", ".join(repr(k) for k in sorted(counts) if counts[k] > 1))
    return dict(pairs)


def _read_json_lines(path: Path, content: str) -> list[tuple[str, Any]]:
    rows = []
    for lineno, line in enumerate(content.split("\n"), 1):  # not splitlines: U+2028 is text
        if line.strip():
            try:
                rows.append((f"line {lineno}", json.loads(line, object_pairs_hook=_object)))
            except _DuplicateKeys as err:
                raise ManifestError(f"{path}:{lineno}: duplicate key {err} in one JSON "
                                    "object") from None
            except (ValueError, RecursionError) as err:
                msg = err.msg if isinstance(err, json.JSONDecodeError) else str(err)[:80]
                raise ManifestError(f"{path}:{lineno}: invalid JSON ({msg})") from None
    return rows


def _read_csv(path: Path) -> tuple[list[str], list[tuple[str, Any]]]:
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or ())
        counts = Counter(c for c in header if c.strip())
        if dups := sorted(c for c, n in counts.items() if n > 1):
            raise ManifestError(f"{path}: duplicate column {', '.join(map(repr, dups))} in the "
                                "header (each column name must appear once)")
        return header, [(f"line {reader.line_num}", row) for row in reader]


def _read_rows(path: Path) -> tuple[set[str], list[tuple[str, Any]]]:
    """Read the column names and (where, raw row) pairs of a CSV or JSON(L) manifest."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            header, rows = _read_csv(path)
            return set(header), rows
        if suffix not in (".jsonl", ".json"):
            raise ManifestError(f"{path}: unsupported manifest type '{suffix}' "
                                "(use .csv, .jsonl or .json)")
        content = path.read_text(encoding="utf-8-sig")
        if content.lstrip().startswith("["):
            items = json.loads(content, object_pairs_hook=_object)
            rows = [(f"item {i}", r) for i, r in enumerate(items, 1)]
        else:
            rows = _read_json_lines(path, content)
    except ManifestError:
        raise
    except _DuplicateKeys as err:
        raise ManifestError(f"{path}: duplicate key {err} in one JSON object") from None
    except json.JSONDecodeError as err:
        raise ManifestError(f"{path}: invalid JSON ({err.msg}, line {err.lineno})") from None
    except UnicodeDecodeError:
        raise ManifestError(f"{path}: not UTF-8 text") from None
    except (ValueError, RecursionError) as err:  # e.g. a number too long, nesting too deep
        raise ManifestError(f"{path}: invalid JSON ({str(err)[:80]})") from None
    except csv.Error as err:
        raise ManifestError(f"{path}: invalid CSV ({err})") from None
    if bad := next((where for where, r in rows if not isinstance(r, dict)), None):
        raise ManifestError(f"{path}: {bad}: every JSON row must be an object")
    return {k for _, r in rows for k in r}, rows


def _check_row(row: dict[Any, Any], base: Path) -> tuple[dict[str, str] | None, str]:
    """Return the cleaned row (image not yet decoded), or None and the reason it is unusable."""
    if any(v not in (None, "") for v in row.get(None) or ()):  # csv.DictReader's extra cells
        return None, "more cells than columns"
    text, label, image = row.get("text"), row.get("label"), row.get("image")
    if not isinstance(text, str) or not text.strip():
        return None, "empty or non-string text"
    if isinstance(label, bool) or not isinstance(label, (str, int)) or not str(label).strip():
        return None, "empty label"
    if not isinstance(image, str) or not image.strip():
        return None, "empty image path"
    try:
        path = Path(image.strip()).expanduser()
        path = (path if path.is_absolute() else base / path).resolve()
        if not path.is_file():
            return None, "missing image file"
    except (OSError, ValueError, RuntimeError):  # a NUL byte, a name too long, ~nosuchuser
        return None, "bad image path"
    out = {"image": str(path), "text": text.strip(), "label": str(label).strip()}
    if "site" in row:
        out["site"] = "" if row["site"] is None else str(row["site"])
    try:
        "".join(out.values()).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, e.g. JSON "\ud800"
        return None, "invalid Unicode"
    return out, ""


def _decode(path: str | Path) -> Image.Image:
    """Decode every pixel of an image file into 8-bit RGB; raise on any bad data."""
    with Image.open(path) as im:
        im.load()  # the whole file: a truncated or corrupt body fails here, not in training
        return _to_rgb(ImageOps.exif_transpose(im))


def _decode_problem(path: str) -> str:
    """Why `path` does not decode in full ("" if it does)."""
    try:
        _decode(path)
        return ""
    except UnidentifiedImageError:
        return "not an image"
    except _DECODE_ERRORS as err:
        return " ".join(str(err).split())[:80] or type(err).__name__


def _file_key(path: str) -> tuple[str, int, int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return path, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


def image_problems(paths: Sequence[str | Path]) -> list[str]:
    """Return why each image cannot be fully decoded ("" if it can), decoding in threads.

    Verdicts are cached per (path, size, mtime, ctime, inode), so loading a manifest again
    in the same process decodes only the files that changed.
    """
    keys = [_file_key(str(p)) for p in paths]
    todo = list(dict.fromkeys(k for k in keys if k is not None and k not in _VERDICTS))
    files = [k[0] for k in todo]
    if len(files) < 64:
        problems = [_decode_problem(f) for f in files]
    else:
        with ThreadPoolExecutor(_decode_workers()) as pool:  # PIL's decoders release the GIL
            problems = list(pool.map(_decode_problem, files, chunksize=32))
    _VERDICTS.update(zip(todo, problems))
    out = ["file vanished" if k is None else _VERDICTS[k] for k in keys]
    while len(_VERDICTS) > _MAX_VERDICTS:  # forget the oldest
        _VERDICTS.pop(next(iter(_VERDICTS)))
    return out


def _decode_workers() -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(8, cpus or 1))


def load_manifest(path: str | Path, default_label: str | None = None
                  ) -> tuple[datasets.Dataset, ManifestStats]:
    """Load a manifest, skipping and counting bad rows; raise ManifestError if none are usable.

    Every image is decoded in full, so what is kept will encode. `default_label` labels every
    row of a manifest that has no `label` column (predict); it is ignored when one exists.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    columns, raw = _read_rows(path)
    if not raw:
        raise ManifestError(f"{path}: manifest has no rows")
    fill = default_label is not None and "label" not in columns
    for col in REQUIRED:
        if col not in columns and not (col == "label" and fill):
            raise ManifestError(f"{path}: missing column '{col}' (required: {', '.join(REQUIRED)})")
    base = path.resolve().parent
    skips: dict[str, list[str]] = {}  # reason -> where (and why, for images), in file order
    checked: list[tuple[str, dict[str, str]]] = []
    for where, row in raw:
        clean, reason = _check_row({**row, "label": default_label} if fill else row, base)
        if clean is None:
            skips.setdefault(reason, []).append(where)
        else:
            if "site" in columns:
                clean.setdefault("site", "")
            checked.append((where, clean))
    kept = []
    problems = image_problems([c["image"] for _, c in checked])
    for (where, clean), problem in zip(checked, problems):
        if problem:
            skips.setdefault("unreadable image", []).append(f"{where}: {problem}")
        else:
            kept.append(clean)
    reasons = {k: len(v) for k, v in sorted(skips.items())}
    stats = ManifestStats(path, len(kept), sum(reasons.values()), reasons,
                          {k: v[:SHOWN_ROWS] for k, v in sorted(skips.items())},
                          tuple(sorted(columns)))
    if not kept:
        raise ManifestError(f"{path}: all {len(raw)} rows are unusable ({_fmt(stats)})")
    if stats.skipped:
        log.warning("%s: skipped %d of %d rows (%s)", path, stats.skipped, len(raw), _fmt(stats))
    return datasets.Dataset.from_list(kept), stats


def _fmt(stats: ManifestStats) -> str:
    """One line: each reason, its count and the first rows it hit."""
    parts = []
    for reason, n in stats.reasons.items():
        shown = stats.examples.get(reason, [])
        more = ", ..." if n > len(shown) else ""
        parts.append(f"{reason}: {n} [{', '.join(shown)}{more}]")
    return "; ".join(parts)


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
        im = _decode(path).resize((size, size), Image.Resampling.BILINEAR)
    except _DECODE_ERRORS as err:  # changed since load_manifest checked it
        raise ManifestError(f"{path}: cannot decode image ({err})") from None
    return np.asarray(im, dtype=np.uint8)  # (H, W, 3)


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
