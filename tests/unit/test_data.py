"""Manifest loading and encoding on real files written to tmp_path."""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from common.config import load_config
from common.data import (Encoding, ManifestError, encode, encode_images, encode_labels,
                         label_names, load_manifest)
from common.encoded import Encoded

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
ENCODING = Encoding(("image", "text"), 8, MEAN, STD)  # 8x8 images, texts


def _encoding(size: int) -> Encoding:
    return Encoding(("image", "text"), size, MEAN, STD)



def _png(path: Path, mode: str = "RGB", size: tuple[int, int] = (20, 12)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 40, 90)).convert(mode).save(path)
    return str(path)


def _csv(path: Path, rows: list[dict], fields: tuple[str, ...] = ("image", "text", "label")
         ) -> Path:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return path


def _rows(tmp_path: Path, n: int) -> list[dict]:
    labels = ["b", "a", "c"]
    return [{"image": Path(_png(tmp_path / "img" / f"{i}.png")).relative_to(tmp_path).as_posix(),
             "text": f"note {i}", "label": labels[i % 3]} for i in range(n)]


def test_csv_manifest_loads_and_resolves_relative_paths(tmp_path: Path) -> None:
    path = _csv(tmp_path / "train.csv", _rows(tmp_path, 4))
    ds, stats = load_manifest(path)
    assert len(ds) == 4 and stats.rows == 4 and stats.skipped == 0
    for p in ds["image"]:
        assert Path(p).is_absolute() and Path(p).is_file()
    assert Path(ds["image"][0]) == (tmp_path / "img" / "0.png").resolve()
    assert list(ds["text"])[:2] == ["note 0", "note 1"]


def test_jsonl_manifest_loads_with_absolute_paths_and_site(tmp_path: Path) -> None:
    rows = [{"image": _png(tmp_path / f"{i}.png"), "text": "t", "label": "x", "site": "s1"}
            for i in range(3)]
    path = tmp_path / "sub" / "m.jsonl"
    path.parent.mkdir()
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ds, stats = load_manifest(path)
    assert stats.rows == 3 and set(ds.column_names) == {"image", "text", "label", "site"}
    assert list(ds["site"]) == ["s1"] * 3


def test_images_of_any_mode_and_size_encode_to_rgb(tmp_path: Path) -> None:
    paths = [_png(tmp_path / "l.png", "L", (10, 30)), _png(tmp_path / "rgba.png", "RGBA", (64, 64)),
             _png(tmp_path / "p.png", "P", (7, 5)), _png(tmp_path / "rgb.png", "RGB", (33, 33)),
             _png(tmp_path / "i16.png", "I;16", (16, 16))]
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (40, 20), (0, 128, 0, 0)).save(cmyk)
    x = encode_images(paths + [str(cmyk)], 24, MEAN, STD)
    assert x.shape == (6, 3, 24, 24) and x.dtype == torch.float32
    assert torch.isfinite(x).all()
    rgb = x[3] * 0.25 + 0.5  # undo normalisation: channels differ for a coloured RGB image
    assert torch.allclose(rgb[:, 12, 12], torch.tensor([200, 40, 90]) / 255, atol=0.01)


def test_transparent_pixels_become_white(tmp_path: Path) -> None:
    path = tmp_path / "t.png"
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(path)
    x = encode_images([str(path)], 8, (0, 0, 0), (1, 1, 1))
    assert torch.allclose(x, torch.ones_like(x))


def test_missing_label_column_names_file_and_column(tmp_path: Path) -> None:
    rows = [{"image": r["image"], "text": r["text"]} for r in _rows(tmp_path, 2)]
    path = _csv(tmp_path / "bad.csv", rows, fields=("image", "text"))
    with pytest.raises(ManifestError, match=r"bad\.csv.*missing column 'label'"):
        load_manifest(path)


def test_missing_manifest_names_file(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="nope.csv"):
        load_manifest(tmp_path / "nope.csv")


def test_bad_rows_are_skipped_counted_and_logged(tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    rows = _rows(tmp_path, 5)
    rows[1]["image"] = "img/does_not_exist.png"
    rows[3]["label"] = ""
    path = _csv(tmp_path / "five.csv", rows)
    with caplog.at_level(logging.WARNING, logger="common.data"):
        ds, stats = load_manifest(path)
    assert len(ds) == 3 and stats.rows == 3 and stats.skipped == 2
    assert stats.reasons == {"missing image file": 1, "empty label": 1}
    assert "five.csv" in caplog.text and "skipped 2 of 5" in caplog.text


def test_unreadable_image_and_empty_text_are_skipped(tmp_path: Path) -> None:
    rows = _rows(tmp_path, 3)
    (tmp_path / "img" / "0.png").write_bytes(b"not a png")
    rows[1]["text"] = "   "
    _, stats = load_manifest(_csv(tmp_path / "m.csv", rows))
    assert stats.rows == 1 and stats.reasons == {"unreadable image": 1,
                                                 "empty or non-string text": 1}


def test_all_rows_bad_raises(tmp_path: Path) -> None:
    rows = [{"image": "missing.png", "text": "t", "label": "a"}]
    with pytest.raises(ManifestError, match="all 1 rows are unusable"):
        load_manifest(_csv(tmp_path / "m.csv", rows))


def test_unknown_test_label_names_label_and_file(tmp_path: Path) -> None:
    train, _ = load_manifest(_csv(tmp_path / "train.csv", _rows(tmp_path, 3)))
    rows = _rows(tmp_path, 2)
    rows[1]["label"] = "zebra"
    test, _ = load_manifest(_csv(tmp_path / "test.csv", rows))
    with pytest.raises(ManifestError, match=r"test\.csv.*'zebra'"):
        encode(test, label_names(train), ENCODING, source=tmp_path / "test.csv")
    with pytest.raises(ManifestError, match="'zebra'"):
        encode_labels(["a", "zebra"], ["a"])


def test_label_names_sorted_unique_and_encode(tmp_path: Path) -> None:
    ds, _ = load_manifest(_csv(tmp_path / "m.csv", _rows(tmp_path, 6)))
    names = label_names(ds)
    assert names == ["a", "b", "c"]
    enc = encode(ds, names, _encoding(16))
    assert isinstance(enc, Encoded) and len(enc) == 6
    assert enc.pixel_values.shape == (6, 3, 16, 16)
    assert enc.labels.tolist() == [1, 0, 2, 1, 0, 2]
    sub = enc.subset(np.array([4, 0]))
    assert len(sub) == 2 and sub.texts == ["note 4", "note 0"] and sub.labels.tolist() == [0, 1]


def _image_bytes(fmt: str, size: int = 24) -> bytes:
    """A noisy image in `fmt` (noise keeps the compressed data long enough to cut)."""
    buf = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize("damage", ["truncated png", "corrupt png data", "truncated jpeg"])
def test_image_with_valid_header_but_bad_data_is_skipped_and_named(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str) -> None:
    rows = _rows(tmp_path, 4)
    png, jpeg = _image_bytes("PNG"), _image_bytes("JPEG")
    bad = {"truncated png": png[:len(png) // 2],
           "corrupt png data": png[:80] + bytes(b ^ 0xFF for b in png[80:160]) + png[160:],
           "truncated jpeg": jpeg[:-2]}[damage]
    (tmp_path / "img" / "2.png").write_bytes(bad)
    with Image.open(tmp_path / "img" / "2.png") as im:  # reference: the header alone passes
        assert im.size == (24, 24)
    with caplog.at_level(logging.WARNING, logger="common.data"):
        ds, stats = load_manifest(_csv(tmp_path / "train.csv", rows))
    assert stats.rows == 3 and stats.reasons == {"unreadable image": 1}
    assert str(tmp_path / "img" / "2.png") not in ds["image"]
    assert "train.csv" in caplog.text and "line 4" in caplog.text  # header is line 1
    assert "unreadable image" in caplog.text
    assert encode(ds, label_names(ds), ENCODING).pixel_values.shape == (3, 3, 8, 8)


def test_truncated_images_are_not_silently_padded() -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_an_image_rewritten_after_a_load_is_checked_again(tmp_path: Path) -> None:
    rows = _rows(tmp_path, 3)
    path = _csv(tmp_path / "m.csv", rows)
    assert load_manifest(path)[1].rows == 3
    png = _image_bytes("PNG")
    (tmp_path / "img" / "1.png").write_bytes(png[:len(png) // 2])
    assert load_manifest(path)[1].reasons == {"unreadable image": 1}


def test_warning_names_the_first_few_lines_of_each_reason(tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    rows = _rows(tmp_path, 12)
    for i in range(1, 12):
        rows[i]["label"] = ""
    with caplog.at_level(logging.WARNING, logger="common.data"):
        _, stats = load_manifest(_csv(tmp_path / "m.csv", rows))
    assert stats.reasons == {"empty label": 11}
    assert "line 3, line 4" in caplog.text and "line 13" not in caplog.text  # 5 are named
    assert len(caplog.records) == 1 and "\n" not in caplog.records[0].getMessage()


def test_bad_image_path_strings_are_skipped_not_raised(tmp_path: Path) -> None:
    rows = _rows(tmp_path, 3)
    rows[0]["image"] = "a\x00b.png"
    rows[1]["image"] = "x" * 5000 + ".png"
    _, stats = load_manifest(_csv(tmp_path / "m.csv", rows))
    assert stats.rows == 1 and stats.skipped == 2


@pytest.mark.parametrize("header,dups", [("image,text,label,label", "'label'"),
                                         ("image,text,text,label,image", "'image', 'text'")])
def test_csv_with_a_repeated_column_is_refused(tmp_path: Path, header: str, dups: str) -> None:
    path = tmp_path / "dup.csv"
    n = header.count(",") + 1
    path.write_text(header + "\n" + ",".join(["x"] * n) + "\n")
    with pytest.raises(ManifestError, match=rf"dup\.csv: duplicate column {dups}"):
        load_manifest(path)


def test_jsonl_object_with_a_repeated_key_is_refused(tmp_path: Path) -> None:
    image = _png(tmp_path / "a.png")
    good = json.dumps({"image": image, "text": "t", "label": "a"})
    path = tmp_path / "dup.jsonl"
    path.write_text(good + "\n" + f'{{"image": "{image}", "text": "t", "label": "a", '
                                  '"label": "b"}\n')
    with pytest.raises(ManifestError, match=r"dup\.jsonl:2: duplicate key 'label'"):
        load_manifest(path)
    listed = tmp_path / "dup.json"
    listed.write_text(f'[{{"image": "{image}", "text": "t", "text": "u", "label": "a"}}]')
    with pytest.raises(ManifestError, match=r"dup\.json: duplicate key 'text'"):
        load_manifest(listed)


def test_csv_row_with_more_cells_than_columns_is_skipped(tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    rows = _rows(tmp_path, 3)
    path = _csv(tmp_path / "m.csv", rows)
    lines = path.read_text().splitlines()
    lines[2] = f"{rows[1]['image']},a big, round thing,b"  # unquoted comma in the text
    path.write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger="common.data"):
        ds, stats = load_manifest(path)
    assert stats.reasons == {"more cells than columns": 1} and "line 3" in caplog.text
    assert " round thing" not in ds["label"]


def test_json_array_rows_are_named_by_item(tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    rows = [{"image": _png(tmp_path / f"{i}.png"), "text": "t", "label": "a"} for i in range(3)]
    rows[2]["text"] = 7
    path = tmp_path / "m.json"
    path.write_text(json.dumps(rows))
    with caplog.at_level(logging.WARNING, logger="common.data"):
        assert load_manifest(path)[1].rows == 2
    assert "item 3" in caplog.text


def test_default_label_fills_a_manifest_without_labels(tmp_path: Path) -> None:
    rows = [{"image": r["image"], "text": r["text"]} for r in _rows(tmp_path, 2)]
    path = _csv(tmp_path / "new.csv", rows, fields=("image", "text"))
    ds, stats = load_manifest(path, default_label="b")
    assert list(ds["label"]) == ["b", "b"] and "label" not in stats.columns
    labelled = _csv(tmp_path / "old.csv", _rows(tmp_path, 2))
    ds, stats = load_manifest(labelled, default_label="zzz")
    assert list(ds["label"]) == ["b", "a"] and "label" in stats.columns


def test_predict_warning_names_the_users_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    from common import inference

    rows = [{"image": r["image"], "text": r["text"]} for r in _rows(tmp_path, 3)]
    rows[1]["image"] = "img/gone.png"
    path = _csv(tmp_path / "new.csv", rows, fields=("image", "text"))
    model = load_config(["model=minilm_cnn", "model.vision.image_size=8",
                         "model.modalities=[image,text]"]).model
    bundle = SimpleNamespace(label_names=["a", "b"], cfg=model)
    monkeypatch.setattr(inference, "predict", lambda b, data, device: torch.zeros(len(data), 2))
    with caplog.at_level(logging.WARNING, logger="common.data"):
        n = inference.predict_manifest(bundle, path, tmp_path / "preds.csv", "cpu")
    assert n == 2
    assert f"{path}: skipped 1 of 3 rows" in caplog.text and "line 3" in caplog.text
    assert "label" not in next(csv.reader((tmp_path / "preds.csv").open()))


def test_row_with_a_lone_surrogate_is_skipped_not_raised(tmp_path: Path) -> None:
    image = _png(tmp_path / "a.png")
    path = tmp_path / "m.jsonl"  # json.dumps writes the lone surrogate as the escape \ud800
    path.write_text("\n".join(json.dumps({"image": image, "text": t, "label": "a"})
                              for t in ("x\ud800", "fine")))
    ds, stats = load_manifest(path)
    assert list(ds["text"]) == ["fine"] and stats.reasons == {"invalid Unicode": 1}


def test_image_path_of_an_unknown_user_is_skipped_not_raised(tmp_path: Path) -> None:
    rows = _rows(tmp_path, 2)
    rows[0]["image"] = "~no-such-user-fedmm/x.png"
    _, stats = load_manifest(_csv(tmp_path / "m.csv", rows))
    assert stats.reasons == {"bad image path": 1}


@pytest.mark.parametrize("sep", ["\u2028", "\u2029", "\x85"])
def test_jsonl_text_may_hold_unicode_line_separators(tmp_path: Path, sep: str) -> None:
    text = f"before{sep}after"
    line = json.dumps({"image": _png(tmp_path / "a.png"), "text": text, "label": "a"},
                      ensure_ascii=False)
    assert sep in line and len(text.splitlines()) == 2  # str.splitlines would cut the record
    path = tmp_path / "m.jsonl"
    path.write_text(line + "\n", encoding="utf-8")
    assert list(load_manifest(path)[0]["text"]) == [text]


def test_many_rows_decode_in_order_once_per_file_version(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from common import data

    rows = _rows(tmp_path, 80)  # enough to decode in the thread pool
    png = _image_bytes("PNG")
    for i in (10, 70):
        (tmp_path / "img" / f"{i}.png").write_bytes(png[:len(png) // 2])
    path = _csv(tmp_path / "m.csv", rows)
    ds, stats = load_manifest(path)
    assert stats.rows == 78 and [w.split(":")[0] for w in stats.examples["unreadable image"]] \
        == ["line 12", "line 72"]
    assert list(ds["text"]) == [r["text"] for i, r in enumerate(rows) if i not in (10, 70)]
    decoded: list[str] = []
    real = data._decode_problem
    monkeypatch.setattr(data, "_decode_problem", lambda p: decoded.append(p) or real(p))
    load_manifest(path)
    assert decoded == []  # every verdict came from the cache
    (tmp_path / "img" / "10.png").write_bytes(png)
    assert load_manifest(path)[1].rows == 79 and decoded == [str((tmp_path / "img" / "10.png").resolve())]
