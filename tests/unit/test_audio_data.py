"""Manifests of any modality subset: audio rows read, checked and encoded like images are."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image
from transformers import WhisperFeatureExtractor

from common import data as data_module
from common.config import ConfigError, load_config
from common.data import Encoding, ManifestError, encode, label_names, load_manifest
from common.encoded import Encoded
from common.task import resolve_data

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
EXTRACTOR = WhisperFeatureExtractor()  # 80 log-mel bins, 100 frames per second
ALL = Encoding(("image", "text", "audio"), 8, MEAN, STD, EXTRACTOR, clip_seconds=1.0)


def _tone(seconds: float, rate: int, channels: int = 1) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    wave = 0.3 * np.sin(2 * np.pi * 440 * t)
    return np.stack([wave] * channels, axis=1) if channels > 1 else wave


def _manifest(tmp_path: Path, n: int, columns=("image", "text", "audio", "label")) -> Path:
    """n rows; row i's clip is i * 0.15 + 0.3 s long, in wav / flac / ogg at several rates."""
    (tmp_path / "img").mkdir(exist_ok=True)
    (tmp_path / "snd").mkdir(exist_ok=True)
    rows = []
    for i in range(n):
        Image.new("RGB", (12, 10), (20 * i, 40, 90)).save(tmp_path / "img" / f"{i}.png")
        fmt, rate, channels = [("wav", 44_100, 2), ("flac", 16_000, 1), ("ogg", 22_050, 1)][i % 3]
        sound = tmp_path / "snd" / f"{i}.{fmt}"
        sf.write(sound, _tone(0.3 + 0.15 * i, rate, channels), rate)
        row = {"image": f"img/{i}.png", "text": f"note {i}", "audio": f"snd/{sound.name}",
               "label": "ab"[i % 2]}
        rows.append({k: row[k] for k in columns})
    path = tmp_path / "m.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_audio_rows_load_and_bad_audio_is_skipped_counted_and_named(tmp_path, caplog):
    path = _manifest(tmp_path, 8)
    (tmp_path / "snd" / "1.flac").write_bytes(b"fLaC garbage" * 10)
    sf.write(tmp_path / "snd" / "3.wav", np.zeros((0, 1), np.float32), 16_000)  # no samples
    (tmp_path / "snd" / "5.ogg").unlink()
    with caplog.at_level(logging.WARNING, logger="common.data"):
        ds, stats = load_manifest(path)
    assert stats.rows == 5 and stats.modalities == ("image", "text", "audio")
    assert stats.reasons == {"unreadable audio": 2, "missing audio file": 1}
    assert [w.split(":")[0] for w in stats.examples["unreadable audio"]] == ["line 3", "line 5"]
    assert "no audio samples" in caplog.text and "skipped 3 of 8" in caplog.text
    assert all(Path(p).is_absolute() for p in ds["audio"])


def test_clips_encode_mono_16k_log_mel_with_their_real_frames(tmp_path):
    ds, _ = load_manifest(_manifest(tmp_path, 6))
    enc = encode(ds, label_names(ds), ALL)
    clips = enc.inputs["audio"]
    assert clips.features.shape == (6, 80, 100) and clips.features.dtype == torch.float32
    real = [min(100, int(np.ceil((0.3 + 0.15 * i) * 100))) for i in range(6)]
    assert clips.mask.sum(1).tolist() == real  # 44.1 kHz stereo and 22.05 kHz resampled
    assert enc.has("audio").all() and enc.modalities == ("image", "text", "audio")
    reference, _ = data_module.load_clip(ds["audio"][0], EXTRACTOR, 1.0)
    torch.testing.assert_close(clips.features[0], torch.from_numpy(reference))
    sub = enc.subset([4, 1])
    assert sub.inputs["audio"].mask.sum(1).tolist() == [real[4], real[1]]
    both = Encoded.concat([sub, enc.subset([0])])
    assert len(both) == 3 and both.inputs["audio"].features.shape == (3, 80, 100)


def test_any_column_subset_is_a_manifest_and_other_columns_are_ignored(tmp_path):
    path = _manifest(tmp_path, 4, columns=("audio", "label"))
    ds, stats = load_manifest(path)
    assert stats.modalities == ("audio",) and set(ds.column_names) == {"audio", "label"}
    enc = encode(ds, ["a", "b"], ALL)
    assert enc.modalities == ("audio",) and not enc.has("image").any()
    (tmp_path / "snd" / "0.wav").write_bytes(b"broken")
    with pytest.raises(ManifestError, match="no modality column"):
        load_manifest(path, modalities=("image", "text"))
    full = _manifest(tmp_path, 4)
    (tmp_path / "snd" / "0.wav").write_bytes(b"broken")
    ds, stats = load_manifest(full, modalities=("image", "text"))  # the audio is never read
    assert stats.rows == 4 and "audio" not in ds.column_names
    with pytest.raises(ManifestError, match="none of the model's modalities"):
        encode(ds, ["a", "b"], Encoding(("audio",), audio_extractor=EXTRACTOR, clip_seconds=1))


def test_audio_verdicts_are_cached_per_file_version(tmp_path, monkeypatch):
    path = _manifest(tmp_path, 3)
    load_manifest(path)
    decoded: list[str] = []
    real = data_module._audio_problem
    monkeypatch.setattr(data_module, "_audio_problem", lambda p: decoded.append(p) or real(p))
    load_manifest(path)
    assert decoded == []
    sf.write(tmp_path / "snd" / "1.flac", _tone(0.2, 16_000), 16_000)
    assert load_manifest(path)[1].rows == 3 and decoded == [str(tmp_path / "snd" / "1.flac")]


def test_modalities_follow_the_training_manifest_unless_set(tmp_path):
    train = _manifest(tmp_path, 4, columns=("image", "text", "label"))
    base = ["data=manifest", f"data.train={train}", f"data.test={train}"]
    cfg = resolve_data(load_config(base))
    assert cfg.model.modalities == ("image", "text") and cfg.data.labels == ("a", "b")
    assert resolve_data(load_config(base + ["model.modalities=[text]"])).model.modalities == (
        "text",)
    with pytest.raises(ConfigError, match=r"model.modalities must be a subset .* no column "
                                          r"'audio'"):
        resolve_data(load_config(base + ["model.modalities=[image,audio]"]))
    with pytest.raises(ConfigError, match="skew must be free of missing-modality skews"):
        resolve_data(load_config(base + ["skew.missing_audio_rate=0.5"]))
