"""Generate the default demo dataset: shapes on images, growth status in clinical-style notes,
and optionally a tone's pitch in a short sound.

The task needs every modality it has. There are 6 classes, f"{shape}-{status}":
  - shape (round, square, triangle) is visible ONLY in the image: one filled shape of random
    colour, size, aspect and position on a dark, noisy background. The image says nothing
    about status.
  - status (stable, growing) is stated ONLY in the text: a short note built from 15 wordings
    per status (negations and shared vocabulary, e.g. "has not grown" vs "has grown", "no
    change" vs "has changed", so no single keyword separates them), wrapped in uninformative
    fillers: an opener, a body site, a finding noun, a "follow-up recommended" that appears in
    both classes, and a random shape word (round, square, triangular, ...) that is a
    DISTRACTOR, drawn independently of the image's shape.
So image-only tops out near 50% accuracy, text-only near 33%, and a fused model can reach ~100%.

With `--audio` (`audio=True`) every row also gets a 1 s sound, and the label a third factor,
12 classes f"{shape}-{status}-{tone}": tone (low, high) is heard ONLY in the sound, a beep of
random pitch (low: 200-450 Hz, high: 900-2000 Hz), length, onset and loudness, with a few
harmonics, over background noise and a quiet hum at a random pitch between the bands. Each
single modality then tops out at 1/4 (image) or 1/6 (text, audio), each pair at 1/2 (image +
text, image + audio) or 1/3 (text + audio), and only all three reach ~100%.

Writes DIR/images/{split}_NNNNN.png (+ DIR/audio/{split}_NNNNN.wav, 8 kHz mono: sites resample
it), DIR/train.csv, DIR/test.csv (image,text[,audio],label,site) and DIR/meta.json; the same
seed gives byte-identical files, and a folder already holding a dataset made with the same
parameters is left as it is.

Run: python -m common.demo_data --out data/demo [--train 2000 --test 500 --seed 0 --image-size 32]
     [--site-by-shape 0.9]   (a natural split: each site mostly holds one shape)
     [--audio]               (a sound per row: the label's third factor)
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

VERSION = 1  # bump when the generator's output changes, so old folders are regenerated
SHAPES = ("round", "square", "triangle")
STATUSES = ("stable", "growing")
LABELS = tuple(f"{shape}-{status}" for shape in SHAPES for status in STATUSES)
TONES = {"low": (200.0, 450.0), "high": (900.0, 2000.0)}  # beep pitch bands (Hz)
AUDIO_LABELS = tuple(f"{label}-{tone}" for label in LABELS for tone in TONES)
AUDIO_RATE = 8_000  # Hz of the written files (below Whisper's 16 kHz: sites resample)
AUDIO_SECONDS = 1.0
SITES = ("st-marys-hospital", "northgate-clinic", "riverside-imaging", "lakeview-camera")
# Distractor shape words in the text; independent of the image's shape.
SHAPE_WORDS = ("round", "oval", "square", "rectangular", "triangular", "irregular")
FINDINGS = ("lesion", "nodule", "mass", "opacity", "spot", "cyst")
BODY_SITES = ("left lung", "right lung", "liver", "right kidney", "thyroid", "upper lobe",
              "left breast", "forearm skin")
OPENERS = ("Patient seen today.", "Routine review.", "Outpatient visit.", "Scan reviewed.",
           "Second reading.", "Images compared.")
TRAILERS = ("Follow-up recommended.", "Follow-up in three months.", "Discussed with patient.",
            "Report sent to GP.")
# {S}: subject at the start of a sentence, {s}: inside one.
TEMPLATES = {
    "stable": (
        "{S} shows no change since the previous scan.",
        "{S} is unchanged in size compared with the last visit.",
        "{S} remains the same as before.",
        "{S} looks identical to prior imaging.",
        "No interval change in {s}.",
        "{S} is stable on this examination.",
        "{S} has not grown since the last study.",
        "{S} measures the same as on the earlier scan.",
        "Compared with last month, {s} is no bigger.",
        "{S} persists without enlargement.",
        "{S} has kept its previous dimensions.",
        "No growth of {s} since the prior visit.",
        "{S} is essentially unchanged from before.",
        "{S} appears static over the past months.",
        "{S} has not increased in size.",
    ),
    "growing": (
        "{S} has increased in size since the last scan.",
        "{S} is noticeably larger than at the previous visit.",
        "{S} is expanding.",
        "{S} is enlarged compared with prior imaging.",
        "Interval growth of {s}.",
        "{S} has grown since the last study.",
        "{S} measures bigger than on the earlier scan.",
        "Compared with last month, {s} has doubled.",
        "{S} shows progression in size.",
        "{S} is no longer the same size as before.",
        "{S} has clearly gained in diameter.",
        "New enlargement of {s} since the prior visit.",
        "{S} has changed and is now wider than before.",
        "{S} continues to enlarge on this examination.",
        "{S} is bigger than previously recorded.",
    ),
}


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def make_text(rng: np.random.Generator, status: str) -> str:
    """Write one note stating `status` in a random wording with random fillers."""
    subject = f"the {_pick(rng, SHAPE_WORDS)} {_pick(rng, FINDINGS)}"
    if rng.random() < 0.6:
        subject += f" in the {_pick(rng, BODY_SITES)}"
    template = _pick(rng, TEMPLATES[status])
    parts = [template.format(S=subject[0].upper() + subject[1:], s=subject)]
    if rng.random() < 0.4:
        parts.insert(0, _pick(rng, OPENERS))
    if rng.random() < 0.4:
        parts.append(_pick(rng, TRAILERS))
    return " ".join(parts)


def make_image(rng: np.random.Generator, shape: str, size: int) -> Image.Image:
    """Draw one filled `shape` of random colour, size and place on a noisy background."""
    ss = 4 * size  # draw supersampled, then downsample for smooth edges
    bg = rng.integers(0, 80, 3)
    fill = rng.integers(0, 256, 3)
    fill[rng.integers(3)] = rng.integers(int(bg.max()) + 100, 256)  # contrast with background
    img = Image.new("RGB", (ss, ss), tuple(int(c) for c in bg))
    w = rng.uniform(0.4, 0.7) * ss
    h = min(w * rng.uniform(0.8, 1.25), 0.8 * ss)
    x0 = rng.uniform(0.05 * ss, 0.95 * ss - w)
    y0 = rng.uniform(0.05 * ss, 0.95 * ss - h)
    box = (x0, y0, x0 + w, y0 + h)
    draw, colour = ImageDraw.Draw(img), tuple(int(c) for c in fill)
    if shape == "round":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        apex_up = rng.random() < 0.5
        top, bottom = (y0, y0 + h) if apex_up else (y0 + h, y0)
        draw.polygon([(x0 + w / 2, top), (x0, bottom), (x0 + w, bottom)], fill=colour)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    small = np.asarray(img.resize((size, size), Image.Resampling.BOX), dtype=np.float32)
    noisy = small + rng.normal(0.0, 6.0, small.shape)  # (H, W, 3) mild sensor noise
    return Image.fromarray(np.clip(noisy, 0, 255).round().astype(np.uint8), "RGB")


def make_sound(rng: np.random.Generator, tone: str, seconds: float = AUDIO_SECONDS,
               rate: int = AUDIO_RATE) -> np.ndarray:
    """Synthesise one beep of a random pitch in `tone`'s band over noise and a hum: (S,) float32."""
    t = np.arange(round(seconds * rate)) / rate
    low, high = TONES[tone]
    pitch = np.exp(rng.uniform(np.log(low), np.log(high)))  # uniform on a log scale
    length = rng.uniform(0.25, 0.6) * seconds
    onset = rng.uniform(0.05, 0.95 * seconds - length)
    inside = (t >= onset) & (t < onset + length)
    envelope = np.where(inside, np.sin(np.pi * np.clip((t - onset) / length, 0, 1)) ** 0.5, 0.0)
    beep = sum(rng.uniform(0.2, 1.0) / k * np.sin(2 * np.pi * k * pitch * t) for k in (1, 2, 3))
    hum = rng.uniform(0.02, 0.1) * np.sin(2 * np.pi * rng.uniform(500, 800) * t)
    noise = rng.normal(0.0, rng.uniform(0.005, 0.03), t.size)
    wave = rng.uniform(0.2, 0.6) * envelope * beep / 1.8 + hum + noise  # (S,)
    return np.clip(wave, -1.0, 1.0).astype(np.float32)


def _write_split(out_dir: Path, split: str, n: int, rng: np.random.Generator,
                 image_size: int, site_by_shape: float = 0.0,
                 site_rng: np.random.Generator | None = None,
                 audio_rng: np.random.Generator | None = None) -> Path:
    """Write one split's PNGs (and WAVs, with `audio_rng`) and manifest; return the manifest.

    `site_by_shape` > 0: with that probability a row's site is its shape's home site (a natural
    split where each site mostly sees one kind of image), drawn from `site_rng` so that images
    and texts stay those of the default dataset. The sounds are drawn from `audio_rng` alone.
    """
    classes = AUDIO_LABELS if audio_rng is not None else LABELS
    labels = np.array(classes)[rng.permutation(np.arange(n) % len(classes))]  # balanced
    rows = []
    for i, label in enumerate(labels):
        shape, status, *tone = str(label).split("-")
        name = f"images/{split}_{i:05d}.png"
        make_image(rng, shape, image_size).save(out_dir / name, format="PNG")
        site = _pick(rng, SITES)
        if site_by_shape and site_rng.random() < site_by_shape:
            site = SITES[SHAPES.index(shape)]
        row = [name, make_text(rng, status)]
        if audio_rng is not None:
            import soundfile as sf

            sound = f"audio/{split}_{i:05d}.wav"
            sf.write(out_dir / sound, make_sound(audio_rng, tone[0]), AUDIO_RATE,
                     subtype="PCM_16")
            row.append(sound)
        rows.append((*row, str(label), site))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(("image", "text", *(("audio",) if audio_rng is not None else ()), "label",
                     "site"))
    writer.writerows(rows)
    path = out_dir / f"{split}.csv"
    tmp = path.with_suffix(".csv.tmp")
    tmp.write_text(buf.getvalue(), encoding="utf-8")
    tmp.replace(path)
    return path


def generate(out_dir: Path, num_train: int, num_test: int, seed: int,
             image_size: int = 32, site_by_shape: float = 0.0, audio: bool = False
             ) -> tuple[Path, Path]:
    """Write the demo dataset to `out_dir` unless it already holds it; return both manifests.

    `audio`: add a sound per row and its tone to the label (12 classes instead of 6).
    """
    if num_train < 1 or num_test < 1:
        raise ValueError(f"demo dataset sizes must be >= 1 (got train={num_train}, "
                         f"test={num_test})")
    if image_size < 16:
        raise ValueError(f"demo image size must be >= 16 (got {image_size})")
    out_dir = Path(out_dir)
    train, test, meta_path = out_dir / "train.csv", out_dir / "test.csv", out_dir / "meta.json"
    meta = {"version": VERSION, "num_train": num_train, "num_test": num_test, "seed": seed,
            "image_size": image_size}
    if site_by_shape:
        meta["site_by_shape"] = site_by_shape
    if audio:
        meta["audio"] = True
    try:
        if json.loads(meta_path.read_text()) == meta and train.is_file() and test.is_file():
            return train, test
    except (OSError, ValueError):
        pass  # no or unreadable meta: (re)generate
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    meta_path.unlink(missing_ok=True)  # written last, so an interrupted run is redone
    for folder, suffix in (("images", "png"), ("audio", "wav")):
        for old in (out_dir / folder).glob(f"*_[0-9][0-9][0-9][0-9][0-9].{suffix}"):
            if old.name.startswith(("train_", "test_")):
                old.unlink()
    if audio:
        (out_dir / "audio").mkdir(exist_ok=True)
    # One generator per split, so the test set does not change with num_train; the sites and
    # the sounds have their own, so they never change the images and texts.
    for i, (split, n) in enumerate((("train", num_train), ("test", num_test))):
        sounds = np.random.default_rng([seed, i, 1]) if audio else None
        _write_split(out_dir, split, n, np.random.default_rng([seed, i]), image_size,
                     site_by_shape, np.random.default_rng([seed, i, 7]), sounds)
    meta_path.write_text(json.dumps(meta, sort_keys=True) + "\n")
    return train, test


def split_sites(train: Path, num_sites: int) -> list[Path]:
    """Deal the training rows round-robin into `site-1.csv` .. `site-N.csv` beside `train`.

    The demo stand-in for what each real site holds: its own manifest (deployment).
    """
    with open(train, newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = list(reader.fieldnames or []), list(reader)
    if not 1 <= num_sites <= len(rows):
        raise ValueError(f"--sites must be in [1, {len(rows)}] (got {num_sites})")
    paths = []
    for i in range(num_sites):
        path = Path(train).with_name(f"site-{i + 1}.csv")
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows[i::num_sites])
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, generate the dataset and print the two manifest paths."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--train", type=int, default=2000, help="training samples")
    p.add_argument("--test", type=int, default=500, help="test samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--site-by-shape", type=float, default=0.0,
                   help="chance a row's site is its shape's home site (a natural split)")
    p.add_argument("--audio", action="store_true",
                   help="add a 1 s sound per row; its tone is a third factor of the label")
    p.add_argument("--sites", type=int, default=0,
                   help="also deal the training rows into site-1.csv .. site-N.csv")
    args = p.parse_args(argv)
    try:
        train, test = generate(args.out, args.train, args.test, args.seed, args.image_size,
                               args.site_by_shape, args.audio)
        sites = split_sites(train, args.sites) if args.sites else []
    except (ValueError, OSError) as err:
        p.exit(2, f"error: {err}\n")
    for path in (train, test, *sites):
        print(path)


if __name__ == "__main__":
    main(sys.argv[1:])
