"""Demo dataset generator: determinism, balance, wording variety, distractor independence."""

from __future__ import annotations

import csv
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.data import load_manifest
from common.demo_data import LABELS, SHAPE_WORDS, SHAPES, SITES, TEMPLATES, generate, main


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _template_regex(template: str) -> re.Pattern[str]:
    parts = re.split(r"\{[Ss]\}", template)
    return re.compile(r"(?i:the .+?)".join(re.escape(p) for p in parts))


PATTERNS = {status: [(t, _template_regex(t)) for t in ts] for status, ts in TEMPLATES.items()}


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, str]]:
    train, _ = generate(tmp_path_factory.mktemp("big"), 600, 12, seed=3)
    return _rows(train)


def test_same_seed_identical_bytes_different_seed_differs(tmp_path: Path) -> None:
    a_train, a_test = generate(tmp_path / "a", 60, 20, seed=7)
    b_train, b_test = generate(tmp_path / "b", 60, 20, seed=7)
    c_train, _ = generate(tmp_path / "c", 60, 20, seed=8)
    assert a_train.read_bytes() == b_train.read_bytes()
    assert a_test.read_bytes() == b_test.read_bytes()
    for name in ("images/train_00013.png", "images/test_00004.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert a_train.read_bytes() != c_train.read_bytes()
    assert (tmp_path / "a/images/train_00013.png").read_bytes() != \
        (tmp_path / "c/images/train_00013.png").read_bytes()


def test_manifest_loads_with_images_of_requested_size(tmp_path: Path) -> None:
    train, test = generate(tmp_path, 30, 10, seed=0, image_size=24)
    ds, stats = load_manifest(train)
    assert stats.rows == 30 and stats.skipped == 0
    assert set(ds.column_names) == {"image", "text", "label", "site"}
    assert set(ds["label"]) <= set(LABELS) and len(_rows(test)) == 10
    with Image.open(ds["image"][0]) as im:
        assert im.size == (24, 24) and im.mode == "RGB"


def test_classes_roughly_balanced(big: list[dict[str, str]]) -> None:
    counts = Counter(r["label"] for r in big)
    assert set(counts) == set(LABELS) and len(LABELS) == 6
    for label in LABELS:
        assert 0.10 <= counts[label] / len(big) <= 0.25, counts


def test_each_text_states_its_status_in_varied_wording(big: list[dict[str, str]]) -> None:
    used: dict[str, set[str]] = {"stable": set(), "growing": set()}
    for r in big:
        status = r["label"].split("-")[1]
        matches = [(s, t) for s, pats in PATTERNS.items() for t, rx in pats if rx.search(r["text"])]
        assert len(matches) == 1 and matches[0][0] == status, (r["text"], matches)
        used[status].add(matches[0][1])
        assert 5 <= len(r["text"].split()) <= 24
    assert all(len(ts) >= 12 for ts in used.values()), {s: len(t) for s, t in used.items()}


def test_no_single_word_separates_the_statuses() -> None:
    words = {s: [set(re.findall(r"[a-z]+", t.lower())) - {"s"} for t in ts]
             for s, ts in TEMPLATES.items()}
    for status in TEMPLATES:
        in_all = set.intersection(*words[status])
        assert not in_all, f"{status} templates all share {in_all}"


def test_text_shape_word_independent_of_image_shape(big: list[dict[str, str]]) -> None:
    pairs = Counter()
    for r in big:
        found = [w for w in SHAPE_WORDS if re.search(rf"\b{w}\b", r["text"])]
        assert len(found) == 1, r["text"]
        pairs[(found[0], r["label"].split("-")[0])] += 1
    # 600 samples over 6 words x 3 shapes: ~33 expected per cell.
    for word in SHAPE_WORDS:
        for shape in ("round", "square", "triangle"):
            assert pairs[(word, shape)] >= 12, pairs


def test_second_call_with_same_params_does_not_rewrite(tmp_path: Path) -> None:
    train, test = generate(tmp_path, 20, 10, seed=1)
    png = tmp_path / "images" / "train_00000.png"
    before = [p.stat().st_mtime_ns for p in (train, test, png)]
    assert generate(tmp_path, 20, 10, seed=1) == (train, test)
    assert [p.stat().st_mtime_ns for p in (train, test, png)] == before
    generate(tmp_path, 12, 10, seed=1)  # new params: regenerated, stale images removed
    assert len(_rows(train)) == 12 and not (tmp_path / "images" / "train_00012.png").exists()


def test_cli_prints_manifests_and_rejects_bad_sizes(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    main(["--out", str(tmp_path), "--train", "6", "--test", "6"])
    assert capsys.readouterr().out.split() == [str(tmp_path / "train.csv"),
                                               str(tmp_path / "test.csv")]
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path), "--train", "0"])
    assert exc.value.code == 2 and "sizes must be >= 1" in capsys.readouterr().err


def test_site_by_shape_makes_a_natural_split_and_keeps_the_rows(tmp_path):
    plain, _ = generate(tmp_path / "plain", 120, 10, seed=4)
    natural, _ = generate(tmp_path / "natural", 120, 10, seed=4, site_by_shape=0.9)
    a, b = (list(csv.DictReader(open(p))) for p in (plain, natural))
    assert [(r["text"], r["label"]) for r in a] == [(r["text"], r["label"]) for r in b]
    assert all((tmp_path / "plain" / r["image"]).read_bytes()
               == (tmp_path / "natural" / r["image"]).read_bytes() for r in a[:20])
    home = [r["site"] == SITES[SHAPES.index(r["label"].split("-")[0])] for r in b]
    assert np.mean(home) > 0.85  # 0.9 + 0.1 x 1/4 by chance
    assert np.mean([r["site"] == SITES[SHAPES.index(r["label"].split("-")[0])] for r in a]) < 0.5


def test_audio_demo_adds_a_sound_whose_pitch_is_the_labels_third_factor(tmp_path: Path) -> None:
    import soundfile as sf

    from common.demo_data import AUDIO_LABELS, AUDIO_RATE, TONES

    train, test = generate(tmp_path / "a", 96, 24, seed=5, audio=True)
    again, _ = generate(tmp_path / "b", 96, 24, seed=5, audio=True)
    rows = _rows(train)
    assert list(rows[0]) == ["image", "text", "audio", "label", "site"]
    assert Counter(r["label"] for r in rows) == {label: 8 for label in AUDIO_LABELS}
    assert train.read_bytes() == again.read_bytes()
    assert all((tmp_path / "a" / r["audio"]).read_bytes() == (tmp_path / "b" / r["audio"])
               .read_bytes() for r in rows[:10])
    in_low_band = {"low": [], "high": []}  # the largest spectral peak inside the low band
    for r in rows:
        wave, rate = sf.read(tmp_path / "a" / r["audio"])
        assert rate == AUDIO_RATE and wave.ndim == 1 and len(wave) == AUDIO_RATE
        spectrum, freqs = np.abs(np.fft.rfft(wave)), np.fft.rfftfreq(len(wave), 1 / rate)
        band = (freqs >= TONES["low"][0] - 5) & (freqs <= TONES["low"][1] + 5)
        in_low_band[r["label"].rsplit("-", 1)[1]].append(spectrum[band].max())
    # Only a low beep puts its fundamental there (a high one, its harmonics and the hum do not).
    assert min(in_low_band["low"]) > 3 * max(in_low_band["high"])
    ds, stats = load_manifest(train)
    assert stats.modalities == ("image", "text", "audio") and stats.skipped == 0
    plain, _ = generate(tmp_path / "c", 96, 24, seed=5)
    assert "audio" not in _rows(plain)[0] and len({r["label"] for r in _rows(plain)}) == 6
