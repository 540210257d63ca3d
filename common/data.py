"""Site datasets as manifests: load, validate and encode rows of any modality subset + label.

A manifest is a CSV (`.csv`) or JSON Lines (`.jsonl`, or `.json` holding lines or one list)
file with a `label` column (class name), one or more modality columns, `image` and `audio`
(paths relative to the manifest's folder, or absolute; audio: wav/flac/ogg, anything
libsndfile reads) and `text`, and any other columns (e.g. `site`), kept as text (names
starting with `_` are reserved and ignored); a column name may appear once.
`load_manifest` checks every row and decodes every image and audio file in full (the verdict is
cached per file version), skips and counts bad rows, names the first few in its warning, and
returns a `datasets.Dataset` with absolute paths; `encode` turns it into tensors for training
with the same decoders, so it never meets a file the check let through undecoded.
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

from common.audio import AudioError, load_clip, read_audio
from common.encoded import Clips, Encoded
from common.schema import MODALITIES

log = logging.getLogger(__name__)
_HIGH_BIT_MODES = ("I", "F", "I;16", "I;16L", "I;16B", "I;16N")
SHOWN_ROWS = 5  # rows named per skip reason in the warning
# What PIL raises on bad image data (its plugins are not consistent about it)
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error,
                  Image.DecompressionBombError)
_VERDICTS: dict[tuple[str, tuple], str] = {}  # (modality, file key) -> "" or the problem
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
    modalities: tuple[str, ...] = ()  # the modality columns used, in MODALITIES order


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


def _check_path(value: Any, base: Path, modality: str) -> tuple[str | None, str]:
    """Resolve a row's image/audio path; None and the reason if it is unusable."""
    if not isinstance(value, str) or not value.strip():
        return None, f"empty {modality} path"
    try:
        path = Path(value.strip()).expanduser()
        path = (path if path.is_absolute() else base / path).resolve()
        if not path.is_file():
            return None, f"missing {modality} file"
    except (OSError, ValueError, RuntimeError):  # a NUL byte, a name too long, ~nosuchuser
        return None, f"bad {modality} path"
    return str(path), ""


def _extra_column(name: Any) -> bool:
    """Whether a manifest column is kept as text: not a modality or the label, not reserved
    (a leading `_`: fedmm's own columns), and a name Arrow can store (valid UTF-8)."""
    if not isinstance(name, str) or name in (*MODALITIES, "label") or name.startswith("_"):
        return False
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_row(row: dict[Any, Any], base: Path, modalities: Sequence[str]
               ) -> tuple[dict[str, str] | None, str]:
    """Return the cleaned row (files not yet decoded), or None and the reason it is unusable."""
    if any(v not in (None, "") for v in row.get(None) or ()):  # csv.DictReader's extra cells
        return None, "more cells than columns"
    text, label = row.get("text"), row.get("label")
    if "text" in modalities and (not isinstance(text, str) or not text.strip()):
        return None, "empty or non-string text"
    if isinstance(label, bool) or not isinstance(label, (str, int)) or not str(label).strip():
        return None, "empty label"
    out = {}
    for m in modalities:
        if m == "text":
            out["text"] = text.strip()
            continue
        out[m], reason = _check_path(row.get(m), base, m)
        if reason:
            return None, reason
    out["label"] = str(label).strip()
    for key, value in row.items():  # every other column (a site column, metadata), as text
        if key not in out and _extra_column(key):
            out[key] = "" if value is None else str(value)
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


def _audio_problem(path: str) -> str:
    """Why `path` does not decode to audio samples ("" if it does)."""
    try:
        read_audio(path)
        return ""
    except AudioError as err:
        return str(err).removeprefix(f"{path}: ")[:80]


def _file_key(path: str) -> tuple[str, int, int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return path, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


def file_problems(paths: Sequence[str | Path], modality: str = "image") -> list[str]:
    """Return why each image (or audio) file cannot be fully decoded ("" if it can).

    Files are decoded in threads. Verdicts are cached per (modality, path, size, mtime, ctime,
    inode), so loading a manifest again in the same process decodes only the files that changed.
    """
    problem = {"image": _decode_problem, "audio": _audio_problem}[modality]
    keys = [(modality, k) if (k := _file_key(str(p))) else None for p in paths]
    todo = list(dict.fromkeys(k for k in keys if k is not None and k not in _VERDICTS))
    files = [k[1][0] for k in todo]
    if len(files) < 64:
        problems = [problem(f) for f in files]
    else:  # PIL's decoders and libsndfile release the GIL
        with ThreadPoolExecutor(_decode_workers()) as pool:
            problems = list(pool.map(problem, files, chunksize=32))
    _VERDICTS.update(zip(todo, problems))
    out = ["file vanished" if k is None else _VERDICTS[k] for k in keys]
    while len(_VERDICTS) > _MAX_VERDICTS:  # forget the oldest
        _VERDICTS.pop(next(iter(_VERDICTS)))
    return out


def _decode_workers() -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(8, cpus or 1))


def manifest_columns(path: str | Path) -> tuple[str, ...]:
    """The column names of a manifest, sorted (its rows are read, no file is decoded)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    return tuple(sorted(map(str, _read_rows(path)[0])))


def load_manifest(path: str | Path, default_label: str | None = None,
                  modalities: Sequence[str] | None = None
                  ) -> tuple[datasets.Dataset, ManifestStats]:
    """Load a manifest, skipping and counting bad rows; raise ManifestError if none are usable.

    The modality columns used are those of `modalities` (default: image, text, audio) that the
    manifest has; other modality columns are ignored, every other column (`site`, any
    metadata) is kept as text ("" where a JSON row lacks it). Every image and audio file is decoded in full, so
    what is kept will encode. `default_label` labels every row of a manifest that has no
    `label` column (predict); it is ignored when one exists.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    columns, raw = _read_rows(path)
    if not raw:
        raise ManifestError(f"{path}: manifest has no rows")
    fill = default_label is not None and "label" not in columns
    if "label" not in columns and not fill:
        raise ManifestError(f"{path}: missing column 'label' (required: label and one of "
                            f"{', '.join(MODALITIES)})")
    wanted = MODALITIES if modalities is None else tuple(modalities)
    used = tuple(m for m in MODALITIES if m in columns and m in wanted)
    if not used:
        raise ManifestError(f"{path}: no modality column (needs one of {', '.join(wanted)}; "
                            f"has {', '.join(sorted(map(str, columns)))})")
    base = path.resolve().parent
    extras = sorted(c for c in columns if _extra_column(c))
    skips: dict[str, list[str]] = {}  # reason -> where (and why, for files), in file order
    checked: list[tuple[str, dict[str, str]]] = []
    for where, row in raw:
        clean, reason = _check_row({**row, "label": default_label} if fill else row, base, used)
        if clean is None:
            skips.setdefault(reason, []).append(where)
        else:
            for column in extras:  # a JSON row without it
                clean.setdefault(column, "")
            checked.append((where, clean))
    files = [m for m in used if m != "text"]
    verdicts = {m: file_problems([c[m] for _, c in checked], m) for m in files}
    kept = []
    for i, (where, clean) in enumerate(checked):
        bad = next((m for m in files if verdicts[m][i]), None)
        if bad:
            skips.setdefault(f"unreadable {bad}", []).append(f"{where}: {verdicts[bad][i]}")
        else:
            kept.append(clean)
    reasons = {k: len(v) for k, v in sorted(skips.items())}
    stats = ManifestStats(path, len(kept), sum(reasons.values()), reasons,
                          {k: v[:SHOWN_ROWS] for k, v in sorted(skips.items())},
                          tuple(sorted(columns)), used)
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


def encode_clips(paths: Sequence[str | Path], extractor: Any, clip_seconds: float) -> Clips:
    """Read, mix to mono 16 kHz, crop/pad and featurize clips for an audio tower."""
    rows = [_load_clip(p, extractor, clip_seconds) for p in paths]
    if not rows:
        return Clips(torch.zeros(0), torch.zeros(0, dtype=torch.bool))
    features = torch.from_numpy(np.stack([f for f, _ in rows]))  # (N, M, T) | (N, S)
    length = features.shape[-1]
    real = torch.tensor([r for _, r in rows])  # (N,)
    return Clips(features, torch.arange(length) < real[:, None])  # (N, T) bool


def _load_clip(path: str | Path, extractor: Any, clip_seconds: float) -> tuple[np.ndarray, int]:
    try:
        return load_clip(path, extractor, clip_seconds)
    except AudioError as err:  # changed since load_manifest checked it
        raise ManifestError(str(err)) from None


@dataclass(frozen=True)
class Encoding:
    """How a model takes its modalities' raw inputs (`common.task.input_encoding` builds one)."""

    modalities: tuple[str, ...]  # the model's towers; others in a manifest are ignored
    image_size: int = 0
    image_mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    image_std: tuple[float, ...] = (1.0, 1.0, 1.0)
    audio_extractor: Any = None  # the audio tower's feature extractor (log-mel or waveform)
    clip_seconds: float = 0.0


def encode(ds: datasets.Dataset, names: Sequence[str], encoding: Encoding,
           source: str | Path | None = None) -> Encoded:
    """Encode a loaded manifest's modalities, label indices and presence masks.

    Every manifest row holds each of the manifest's modality columns (`load_manifest` skips
    rows without); a modality of the model that the manifest lacks is absent from every row.
    Missing ones are simulated later by `common.skews`.
    """
    have = [m for m in encoding.modalities if m in ds.column_names]
    if not have:
        raise ManifestError(f"{source or 'manifest'}: none of the model's modalities "
                            f"{list(encoding.modalities)} is a column")
    inputs: dict[str, Any] = {}
    for m in have:
        if m == "image":
            inputs[m] = encode_images(list(ds["image"]), encoding.image_size,
                                      encoding.image_mean, encoding.image_std)
        elif m == "text":
            inputs[m] = list(ds["text"])
        else:
            inputs[m] = encode_clips(list(ds["audio"]), encoding.audio_extractor,
                                     encoding.clip_seconds)
    return Encoded(encode_labels(list(ds["label"]), names, source), inputs)
