"""The partition report writes JSON that mirrors its inputs and a real PNG."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from simulations.partition_report import write_partition_report

LABELS = ["cat", "dog", "fish"]
COUNTS = [{"cat": 5, "dog": 0, "fish": 2}, {"cat": 1, "dog": 9, "fish": 0},
          {"cat": 0, "dog": 3, "fish": 4}]
SIZES = [7, 10, 7]
MODALITY = [{"images": 1.0, "texts": 0.5}, {"images": 0.0, "texts": 1.0},
            {"images": 0.75, "texts": 0.25}]
NAMES = ["north", "south", "east"]


def test_report_json_matches_inputs_and_png_is_valid(tmp_path):
    json_path, png_path = write_partition_report(tmp_path / "out", LABELS, COUNTS, SIZES,
                                                 modality=MODALITY, site_names=NAMES)
    assert json_path.is_file() and png_path.is_file()
    report = json.loads(json_path.read_text())
    assert report["num_sites"] == 3 and report["labels"] == LABELS
    assert [s["name"] for s in report["sites"]] == NAMES
    assert [s["size"] for s in report["sites"]] == SIZES
    assert [s["label_counts"] for s in report["sites"]] == COUNTS
    assert [s["modality"] for s in report["sites"]] == MODALITY
    data = png_path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000
    with Image.open(png_path) as im:
        im.verify()
    with Image.open(png_path) as im:
        assert im.width > 200 and im.height > 200


def test_report_defaults_site_names_and_omits_modality(tmp_path):
    json_path, _ = write_partition_report(tmp_path, LABELS, COUNTS, SIZES)
    sites = json.loads(json_path.read_text())["sites"]
    assert [s["name"] for s in sites] == ["site-0", "site-1", "site-2"]
    assert all("modality" not in s for s in sites)


def test_report_rejects_mismatched_inputs(tmp_path):
    with pytest.raises(ValueError, match="length"):
        write_partition_report(tmp_path, LABELS, COUNTS, SIZES[:2])
    with pytest.raises(ValueError, match="bird"):
        write_partition_report(tmp_path, LABELS, [{"bird": 1}, {}, {}], SIZES)
