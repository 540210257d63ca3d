"""Manifest fuzzing: any file a user can hand `load_manifest` loads or fails in one line.

Random CSV / JSON Lines / JSON files (repeated and missing columns, odd cells, bad lines, BOMs,
other encodings) point at a pool of images whose verdict is known by construction (valid in
several modes and formats; truncated, corrupt, empty, not images, folders, missing) plus one
freshly damaged image per example. The oracles are independent of `common.data`: the stdlib
`csv` / `json` parsers count the rows, PIL's own `load()` says which images decode.

    FEDMM_FUZZ_EXAMPLES=2000 python -m pytest tests/faults -q   # a deeper run
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from common.data import Encoding, ManifestError, encode, label_names, load_manifest

pytestmark = pytest.mark.faults
EXAMPLES = int(os.environ.get("FEDMM_FUZZ_EXAMPLES", "100"))  # per property
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
ENCODING = Encoding(("image", "text"), 8, MEAN, STD)  # 8x8 images, texts
GOOD = ["rgb.png", "l.png", "rgba.png", "p.png", "i16.png", "photo.jpg", "palette.gif",
        "ünï cødé.png", "sub/deep.png"]
BAD = ["trunc.png", "trunc.jpg", "corrupt.png", "empty.png", "text.png", "header.png",
       "dir.png", "notes.txt"]
BAD_DATA = [n for n in BAD if n != "dir.png"]  # files that are not decodable images
MISSING = ["missing.png", "../outside.png", "sub/"]  # with dir.png: no such file
FRESH = "fresh.png"  # a new file per example, damaged at random
_written = 0  # manifests written so far (the `make faults` table counts them)


def _encoded(fmt: str, mode: str = "RGB", size: int = 16) -> bytes:
    rgb = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).convert(mode).save(buf, fmt)
    return buf.getvalue()


def _decodes(path: str | Path) -> bool:
    """Reference verdict: PIL reads every byte of the image without error."""
    try:
        with Image.open(path) as im:
            im.load()
        return True
    except Exception:  # noqa: BLE001 - any failure means "does not decode"
        return False


@pytest.fixture(scope="module")
def pool() -> Iterator[Path]:
    """A folder of images whose verdict is known by construction."""
    root = Path(tempfile.mkdtemp(prefix="fedmm-fuzz-"))
    png, jpg = _encoded("PNG"), _encoded("JPEG")
    files = {"rgb.png": png, "l.png": _encoded("PNG", "L"), "rgba.png": _encoded("PNG", "RGBA"),
             "p.png": _encoded("PNG", "P"), "i16.png": _encoded("PNG", "I;16"),
             "photo.jpg": jpg, "palette.gif": _encoded("GIF", "P"), "ünï cødé.png": png,
             "sub/deep.png": png, "trunc.png": png[:len(png) // 2], "trunc.jpg": jpg[:-2],
             "corrupt.png": png[:80] + bytes(b ^ 0xFF for b in png[80:200]) + png[200:],
             "empty.png": b"", "text.png": b"hello, not an image\n", "header.png": png[:33],
             "notes.txt": b"image,text,label\n"}
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    (root / "dir.png").mkdir()
    assert all(_decodes(root / n) for n in GOOD) and not any(_decodes(root / n) for n in BAD)
    yield root
    shutil.rmtree(root)


# ---- strategies -------------------------------------------------------------------------

SCALAR = st.one_of(st.none(), st.just(""), st.just("  \t"), st.booleans(),
                   st.integers(-10**6, 10**6), st.floats(), st.text(max_size=12),
                   st.sampled_from(["a", "b", "c", "ä b", "🦒"]))
NASTY = st.sampled_from(["lone \ud800 surrogate", "\ufeffbom", "nul\x00byte", "cr\ronly",
                         "\u200b", "\u3000", "nan", "None", "-0", "1e999", "x" * 10_000])
CELL = st.one_of(SCALAR, st.sampled_from([1_000, 140_000]).map(lambda n: "x" * n),
                 st.lists(st.integers(), max_size=2),
                 st.dictionaries(st.sampled_from(["k", "label"]), st.integers(), max_size=2))
GOOD_IMAGE = st.sampled_from(GOOD + [FRESH])
BAD_IMAGE = st.one_of(st.sampled_from(BAD + MISSING),
                      st.sampled_from(GOOD + BAD).map(lambda n: "@/" + n),  # absolute
                      st.sampled_from(["a\x00b.png", "y" * 300 + ".png", "~nouser/x.png", " ",
                                       "@/", "rgb.png/", "", "."]))
WORDS = st.sampled_from(["note", "a round, big thing", "ünï 🦒", "  padded  ", 'say "hi"',
                         "two\nlines", "line\u2028separator", "next\x85line", "tab\there"])
LABELS = st.sampled_from(["a", "b", "c"])
USABLE = {"image": GOOD_IMAGE, "text": WORDS, "label": LABELS}  # what a user meant to write
MUTATION = st.one_of(st.tuples(st.just("image"), BAD_IMAGE),  # a value that may break a row
                     st.tuples(st.sampled_from(["text", "label"]), NASTY),
                     st.tuples(st.sampled_from(["image", "text", "label"]), CELL),
                     st.tuples(st.sampled_from(["text", "label"]), st.text(max_size=20)))
NAMES = st.one_of(st.sampled_from(["image", "text", "label", "site", "extra", "", "Image",
                                   "label "]), st.text(max_size=6))
REQUIRED = st.permutations(["image", "text", "label"])
COLUMNS = st.one_of(st.lists(NAMES, min_size=1, max_size=7),  # mostly: the required + others
                    *[st.tuples(REQUIRED, st.lists(NAMES, max_size=2)).map(lambda t: t[0] + t[1])
                      for _ in range(2)],
                    *[REQUIRED] * 3)
TIDY_COLUMNS = st.one_of(REQUIRED, REQUIRED.map(lambda c: c + ["site"]))
ANY = st.one_of(BAD_IMAGE, NASTY, CELL, st.text(max_size=20))  # any value, in any column
ROW_COUNT = st.sampled_from([0, 1, 2, 3, 4, 5, 6, 2, 3, 4])


@st.composite
def _damage(draw: st.DrawFn) -> bytes:
    """A valid PNG or JPEG, cut short or with a run of flipped bytes (or left intact)."""
    data = _encoded(draw(st.sampled_from(["PNG", "JPEG"])), size=draw(st.sampled_from([8, 24])))
    cut = draw(st.integers(0, len(data)))
    if draw(st.booleans()):
        return data[:cut]
    n = draw(st.integers(0, 64))
    return data[:cut] + bytes(b ^ 0xFF for b in data[cut:cut + n]) + data[cut + n:]


@st.composite
def _cells(draw: st.DrawFn, columns: list[str], tidy: bool) -> list[Any]:
    row = {c: draw(USABLE.get(c, CELL)) for c in columns}
    if tidy:  # one cell per column; at most one of them holds anything at all
        if draw(st.booleans()):
            row[draw(st.sampled_from(columns))] = draw(ANY)
        return [row[c] for c in columns]
    row.update(draw(st.lists(MUTATION, max_size=3)))  # ignored when its column is absent
    cells = [row[c] for c in columns]
    extra = draw(st.sampled_from([0] * 8 + [-2, -1, 1, 2]))  # rows shorter or longer
    return cells[:len(cells) + extra] if extra < 0 else cells + [draw(CELL) for _ in range(extra)]


@st.composite
def _csv(draw: st.DrawFn, tidy: bool) -> str:
    columns = draw(TIDY_COLUMNS if tidy else COLUMNS)
    buf = io.StringIO(newline="")
    writer = csv.writer(buf)
    writer.writerow(columns)
    for _ in range(draw(ROW_COUNT)):
        if not tidy and draw(st.integers(0, 19)) == 0:
            buf.write(draw(st.sampled_from(['"unclosed,quote\r\n', "\r\n", "a,b\x00,c\r\n"])))
        else:
            writer.writerow(draw(_cells(columns, tidy)))
    return buf.getvalue()


@st.composite
def _json_line(draw: st.DrawFn, columns: list[str], tidy: bool) -> str:
    kinds = ["object"] * 30 + ([] if tidy else ["repeated key", "bad", "scalar", "blank"])
    kind = draw(st.sampled_from(kinds))
    pairs = list(zip(columns, draw(_cells(columns, tidy))))
    if kind == "repeated key" and pairs:
        pairs.append(pairs[0])
    if kind in ("object", "repeated key"):  # ensure_ascii=True writes lone surrogates as \ud800
        ascii_ = draw(st.booleans())
        return "{" + ", ".join(f"{json.dumps(k, ensure_ascii=ascii_)}: "
                               f"{json.dumps(v, ensure_ascii=ascii_)}" for k, v in pairs) + "}"
    return {"bad": draw(st.text(max_size=20)), "scalar": json.dumps(draw(SCALAR)),
            "blank": "   "}[kind]


@st.composite
def _jsonl(draw: st.DrawFn, tidy: bool) -> str:
    columns = draw(TIDY_COLUMNS if tidy else COLUMNS)
    lines = [draw(_json_line(columns, tidy)) for _ in range(draw(ROW_COUNT))]
    if draw(st.booleans()) and lines:  # one JSON list instead of lines
        return "[" + ", ".join(lines) + "]"
    return "\n".join(lines) + draw(st.sampled_from(["", "\n", "\r\n"]))


@st.composite
def manifests(draw: st.DrawFn, tidy: bool = False) -> tuple[str, bytes]:
    """A manifest's suffix and bytes: a messy file, or a tidy one holding any values."""
    kind = draw(st.sampled_from(["csv", "jsonl"]))
    text = draw(_csv(tidy) if kind == "csv" else _jsonl(tidy))
    usual = [".csv", ".CSV"] if kind == "csv" else [".jsonl", ".json"]
    odd = [] if tidy else [".csv", ".jsonl", ".txt"]  # mismatched or unsupported
    suffix = draw(st.sampled_from(usual * 4 + odd))
    bom = "\ufeff" if draw(st.booleans()) else ""
    encoding = draw(st.sampled_from(["utf-8"] * 10 + ([] if tidy else ["utf-16", "latin-1"])))
    return suffix, (bom + text).encode(encoding, errors="surrogatepass" if encoding == "utf-8"
                                       else "replace")


# ---- oracles ----------------------------------------------------------------------------

def _repeated(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    if len({k for k, _ in pairs}) < len(pairs):
        raise KeyError("repeated key")
    return dict(pairs)


def _reference_rows(path: Path) -> int | None:
    """Rows the stdlib parsers read from a manifest; None: no table (it must be refused)."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
        if path.suffix.lower() == ".csv":
            rows = list(csv.reader(io.StringIO(text, newline="")))
            header = [c for c in (rows[0] if rows else []) if c.strip()]
            if len(set(header)) < len(header):
                return None  # a repeated column
            return sum(1 for r in rows[1:] if r)
        if path.suffix.lower() not in (".jsonl", ".json"):
            return None
        if text.lstrip().startswith("["):
            items = json.loads(text, object_pairs_hook=_repeated)
        else:  # JSON Lines: records end at "\n" only
            items = [json.loads(line, object_pairs_hook=_repeated)
                     for line in text.split("\n") if line.strip()]
        return len(items) if all(isinstance(i, dict) for i in items) else None
    except (UnicodeDecodeError, csv.Error, ValueError, KeyError, RecursionError):
        return None


def _write(pool: Path, suffix: str, data: bytes, fresh: bytes) -> Path:
    """Write the manifest and its fresh image in their own folder inside the pool."""
    global _written
    _written += 1
    folder = pool / f"ex{_written}"
    (folder / "sub").mkdir(parents=True)
    for name in GOOD + BAD:  # the pool, by relative path from the manifest's folder
        (folder / name).symlink_to(pool / name)
    (folder / FRESH).write_bytes(fresh)
    path = folder / f"m{suffix}"
    path.write_bytes(data.replace(b"@/", str(folder).encode() + b"/"))
    return path


def _check(path: Path, pool: Path) -> str:
    """Load `path`; assert the contract; say whether it was refused or loaded."""
    expected = _reference_rows(path)
    try:
        ds, stats = load_manifest(path)
    except ManifestError as err:
        msg = str(err)
        assert "\n" not in msg and str(path) in msg, msg
        if re.search(r"invalid JSON|invalid CSV|not UTF-8|duplicate|must be an object", msg):
            assert expected is None, f"the stdlib parsers read {expected} rows, but: {msg}"
        if m := re.search(r"all (\d+) rows are unusable", msg):
            assert int(m[1]) == expected, msg
        return "refused: " + re.sub(r"\(.*", "", msg.replace(str(path), ""))[:40]
    assert expected is not None, f"{path} loaded, but the stdlib parsers read no table"
    assert stats.rows + stats.skipped == expected and len(ds) == stats.rows
    assert sum(stats.reasons.values()) == stats.skipped
    for image in ds["image"]:
        assert Path(image).relative_to(pool).as_posix() not in BAD and _decodes(image), image
    for text, label in zip(ds["text"], ds["label"]):
        assert text.strip() and label.strip()
    enc = encode(ds, label_names(ds), ENCODING)
    assert len(enc) == len(ds) and enc.pixel_values.isfinite().all()
    return f"loaded {stats.rows} of {expected}"


@FUZZ
@given(manifest=manifests(), fresh=_damage())
def test_any_manifest_loads_or_fails_in_one_line(pool: Path, manifest: tuple[str, bytes],
                                                 fresh: bytes) -> None:
    path = _write(pool, *manifest, fresh)
    try:
        event(_check(path, pool))
    finally:
        shutil.rmtree(path.parent)


@FUZZ
@given(manifest=manifests(tidy=True), fresh=_damage())
def test_any_row_is_kept_and_encoded_or_counted(pool: Path, manifest: tuple[str, bytes],
                                                fresh: bytes) -> None:
    path = _write(pool, *manifest, fresh)
    try:
        event(_check(path, pool))
    finally:
        shutil.rmtree(path.parent)


ROW = st.tuples(st.sampled_from(GOOD + BAD + MISSING + [FRESH]),
                st.sampled_from(["note", "", "  ", "ünï 🦒", "a, b \"c\""]),
                st.sampled_from(["a", "b", "", " ", "c c"]))


def _table(records: list[dict[str, str]], fmt: str) -> bytes:
    if fmt != "csv":
        lines = [json.dumps(r) for r in records]
        return ("[" + ",".join(lines) + "]" if fmt == "json" else "\n".join(lines)).encode()
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=["image", "text", "label"])
    writer.writeheader()
    writer.writerows(records)
    return buf.getvalue().encode()


@FUZZ
@given(rows=st.lists(ROW, min_size=1, max_size=8), fmt=st.sampled_from(["csv", "jsonl", "json"]),
       fresh=_damage())
def test_rows_are_kept_exactly_when_usable(pool: Path, rows: list[tuple[str, str, str]],
                                           fmt: str, fresh: bytes) -> None:
    records = [{"image": i, "text": t, "label": lab} for i, t, lab in rows]
    path = _write(pool, f".{fmt}", _table(records, fmt), fresh)
    fresh_ok = _decodes(path.parent / FRESH)
    usable = [r for r in records if r["text"].strip() and r["label"].strip()]
    good = [r for r in usable if r["image"] in GOOD or (r["image"] == FRESH and fresh_ok)]
    unreadable = [r for r in usable if r["image"] in BAD_DATA or (r["image"] == FRESH
                                                                  and not fresh_ok)]
    try:
        if not good:
            with pytest.raises(ManifestError, match=rf"all {len(rows)} rows are unusable"):
                load_manifest(path)
            return
        ds, stats = load_manifest(path)
        assert list(ds["text"]) == [r["text"].strip() for r in good]
        assert list(ds["label"]) == [r["label"].strip() for r in good]
        assert stats.skipped == len(rows) - len(good) == sum(stats.reasons.values())
        assert stats.reasons.get("unreadable image", 0) == len(unreadable)
        assert stats.reasons.get("missing image file", 0) == len(usable) - len(good) - len(
            unreadable)
        assert len(encode(ds, label_names(ds), ENCODING)) == len(good)
    finally:
        shutil.rmtree(path.parent)
