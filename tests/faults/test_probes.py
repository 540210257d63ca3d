"""Probes: each bad input a new user tried, and the one line fedmm answers it with.

A probe builds its files, runs what the launcher or a site would run, and the line the user
sees (the error, else the warnings) must hold the expected fragment and nothing after a newline.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from common.config import load_config
from common.config import ConfigError
from common.data import Encoding, ManifestError, encode, label_names, load_manifest
from common.preflight import check_device, check_test_labels, check_train_labels, check_writable

pytestmark = pytest.mark.faults
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
ENCODING = Encoding(("image", "text"), 8, MEAN, STD)  # 8x8 images, texts
Probe = Callable[[Path, pytest.MonkeyPatch], Callable[[], object]]


def _image(fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    rgb = np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(buf, fmt)
    return buf.getvalue()


def _manifest(tmp: Path, name: str, labels: str, images: dict[int, bytes] | None = None,
              text: str = "note") -> Path:
    """A CSV with one row per label character; `images` replaces some rows' image bytes."""
    rows = []
    for i, label in enumerate(labels):
        (tmp / f"{name}{i}.png").write_bytes((images or {}).get(i, _image()))
        rows.append({"image": f"{name}{i}.png", "text": text, "label": label})
    path = tmp / f"{name}.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def _train_site(tmp: Path, images: dict[int, bytes]) -> Callable[[], object]:
    """What a site does with its manifest: load it, then encode what was kept."""
    path = _manifest(tmp, "train", "abc", images)

    def site() -> object:
        ds, _ = load_manifest(path)
        return encode(ds, label_names(ds), ENCODING)
    return site


def _truncated_png(tmp: Path, _: pytest.MonkeyPatch) -> Callable[[], object]:
    png = _image()
    return _train_site(tmp, {1: png[:len(png) // 2]})


def _corrupt_png(tmp: Path, _: pytest.MonkeyPatch) -> Callable[[], object]:
    png = _image()
    return _train_site(tmp, {2: png[:80] + bytes(b ^ 0xFF for b in png[80:160]) + png[160:]})


def _truncated_jpeg(tmp: Path, _: pytest.MonkeyPatch) -> Callable[[], object]:
    return _train_site(tmp, {0: _image("JPEG")[:-2]})


def _zero_byte_image(tmp: Path, _: pytest.MonkeyPatch) -> Callable[[], object]:
    return _train_site(tmp, {0: b""})


def _only_row_truncated(tmp: Path, _: pytest.MonkeyPatch) -> Callable[[], object]:
    path = _manifest(tmp, "one", "a", {0: _image()[:200]})
    return lambda: load_manifest(path)


def _test_label_absent(tmp: Path, _: pytest.MonkeyPatch) -> Callable[[], object]:
    train, test = _manifest(tmp, "train", "abab"), _manifest(tmp, "test", "az")

    def launch() -> None:
        check_test_labels(label_names(load_manifest(train)[0]), load_manifest(test)[0], test)
    return launch


def _one_label(tmp: Path, _: pytest.MonkeyPatch) -> Callable[[], object]:
    train = _manifest(tmp, "train", "aa")
    return lambda: check_train_labels(load_manifest(train)[0], train)


def _text_file(tmp: Path, name: str, content: str) -> Callable[[], object]:
    (tmp / "a.png").write_bytes(_image())
    (tmp / name).write_text(content)
    return lambda: load_manifest(tmp / name)


def _dup_csv(tmp: Path, _: pytest.MonkeyPatch) -> Callable[[], object]:
    return _text_file(tmp, "dup.csv", "image,text,label,label\na.png,note,a,b\n")


def _dup_jsonl(tmp: Path, _: pytest.MonkeyPatch) -> Callable[[], object]:
    return _text_file(tmp, "dup.jsonl", '{"image": "a.png", "text": "t", "label": "a", '
                                        '"label": "b"}\n')


def _dup_json(tmp: Path, _: pytest.MonkeyPatch) -> Callable[[], object]:
    return _text_file(tmp, "dup.json", '[{"image": "a.png", "text": "t", "text": "u", '
                                       '"label": "a"}]')


def _unquoted_comma(tmp: Path, _: pytest.MonkeyPatch) -> Callable[[], object]:
    return _text_file(tmp, "m.csv", "image,text,label\na.png,a big, round thing,b\na.png,t,a\n")


def _lone_surrogate(tmp: Path, _: pytest.MonkeyPatch) -> Callable[[], object]:
    rows = [{"image": "a.png", "text": "x\ud800", "label": "a"},
            {"image": "a.png", "text": "fine", "label": "a"}]
    return _text_file(tmp, "m.jsonl", "\n".join(json.dumps(r) for r in rows))


def _predict_without_labels(tmp: Path, mp: pytest.MonkeyPatch) -> Callable[[], object]:
    from common import inference

    mp.setattr(inference, "predict", lambda b, data, device: torch.zeros(len(data), 2))
    model = load_config(["model=minilm_cnn", "model.vision.image_size=8"]).model
    bundle = SimpleNamespace(label_names=["a", "b"], cfg=model)
    _text_file(tmp, "new.csv", "image,text\na.png,t\ngone.png,t\n")
    return lambda: inference.predict_manifest(bundle, tmp / "new.csv", tmp / "p.csv", "cpu")


def _cuda_without_gpu(tmp: Path, mp: pytest.MonkeyPatch) -> Callable[[], object]:
    mp.setattr(torch.cuda, "is_available", lambda: False)
    return lambda: check_device("cuda")


def _output_under_a_file(tmp: Path, _: pytest.MonkeyPatch) -> Callable[[], object]:
    (tmp / "runs").write_text("a file, not a folder")
    return lambda: check_writable(tmp / "runs" / "exp1")


PROBES: list[tuple[str, Probe, str]] = [
    ("truncated png", _truncated_png,
     "train.csv: skipped 1 of 3 rows (unreadable image: 1 [line 3: image file is truncated"),
    ("corrupt png data", _corrupt_png, "skipped 1 of 3 rows (unreadable image: 1 [line 4: "),
    ("truncated jpeg", _truncated_jpeg, "unreadable image: 1 [line 2: image file is truncated"),
    ("zero-byte image", _zero_byte_image, "unreadable image: 1 [line 2: not an image]"),
    ("only row truncated", _only_row_truncated,
     "one.csv: all 1 rows are unusable (unreadable image: 1 [line 2: "),
    ("test label absent from training", _test_label_absent,
     "test.csv: 1 of 2 rows have labels absent from training: 'z' (1 row) (training has 'a', "
     "'b')"),
    ("training rows share one label", _one_label,
     "train.csv: all 2 rows have the label 'a'; a classifier needs at least 2 labels"),
    ("csv column twice", _dup_csv, "dup.csv: duplicate column 'label' in the header"),
    ("jsonl key twice", _dup_jsonl, "dup.jsonl:1: duplicate key 'label' in one JSON object"),
    ("json list key twice", _dup_json, "dup.json: duplicate key 'text' in one JSON object"),
    ("unquoted comma in csv text", _unquoted_comma, "more cells than columns: 1 [line 2]"),
    ("lone surrogate in json", _lone_surrogate, "m.jsonl: skipped 1 of 2 rows (invalid Unicode"),
    ("predict on a manifest without labels", _predict_without_labels,
     "new.csv: skipped 1 of 2 rows (missing image file: 1 [line 3])"),
    ("cuda without a gpu", _cuda_without_gpu, "device=cuda: no usable GPU"),
    ("output folder under a file", _output_under_a_file, "/runs/exp1: not a writable folder"),
]


@pytest.mark.parametrize("build,expected", [p[1:] for p in PROBES], ids=[p[0] for p in PROBES])
def test_probe_answers_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   caplog: pytest.LogCaptureFixture, build: Probe,
                                   expected: str) -> None:
    run = build(tmp_path, monkeypatch)
    with caplog.at_level(logging.WARNING):
        try:
            run()
            line = " | ".join(r.getMessage() for r in caplog.records)
        except (ManifestError, ConfigError) as err:
            line = str(err)
    assert expected in line, line
    assert "\n" not in line and "Traceback" not in line
