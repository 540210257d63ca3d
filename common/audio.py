"""Audio input: read a file, mix to mono 16 kHz, fit to a clip length, featurize for a tower.

`load_clip(path, tower.feature_extractor, clip_seconds)` returns the tower's input for one row:
a Whisper log-mel (n_mels, frames) at 100 frames/s (not padded to 30 s), or for wav2vec2/HuBERT
the normalised waveform (samples,), plus how many of those frames hold real audio (the rest is
padding, for `feature_mask`). Unusable audio raises `AudioError` naming the file, which a
manifest loader counts as a bad row; `check_audio` is the cheap header-only check.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
from transformers import WhisperFeatureExtractor
from transformers.feature_extraction_sequence_utils import SequenceFeatureExtractor

SAMPLE_RATE = 16_000


class AudioError(ValueError):
    """An audio file is unreadable or empty; the message names the file."""


def check_audio(path: str | Path) -> None:
    """Raise AudioError unless `path` has a readable audio header with at least one frame."""
    try:
        info = sf.info(str(path))
    except (sf.SoundFileError, OSError) as err:
        raise AudioError(f"{path}: cannot read audio ({err})") from None
    if info.frames <= 0 or info.samplerate <= 0:
        raise AudioError(f"{path}: no audio samples")


def read_audio(path: str | Path) -> np.ndarray:
    """Decode wav/flac/ogg (anything libsndfile reads) to mono float32 at 16 kHz: (S,)."""
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)  # (S, C)
    except (sf.SoundFileError, OSError) as err:
        raise AudioError(f"{path}: cannot read audio ({err})") from None
    if data.size == 0:
        raise AudioError(f"{path}: no audio samples")
    mono = data.mean(axis=1)  # (S,)
    if not np.isfinite(mono).all():
        raise AudioError(f"{path}: audio holds NaN or infinite samples")
    if rate != SAMPLE_RATE:
        mono = soxr.resample(mono, rate, SAMPLE_RATE)  # (S * 16000 / rate,)
    return np.ascontiguousarray(mono, dtype=np.float32)


def fit_clip(wave: np.ndarray, clip_seconds: float) -> tuple[np.ndarray, int]:
    """Crop (keeping the start) or zero-pad a 16 kHz waveform; return it and its real length."""
    n = round(clip_seconds * SAMPLE_RATE)
    if n <= 0:
        raise ValueError(f"clip_seconds must be > 0, got {clip_seconds}")
    real = min(len(wave), n)
    clip = np.zeros(n, dtype=np.float32)
    clip[:real] = wave[:real]
    return clip, real


def clip_features(wave: np.ndarray, extractor: SequenceFeatureExtractor,
                  clip_seconds: float) -> tuple[np.ndarray, int]:
    """Featurize one 16 kHz waveform for a tower; also return how many frames are real audio."""
    clip, real = fit_clip(wave, clip_seconds)
    if isinstance(extractor, WhisperFeatureExtractor):
        mel = extractor(clip, sampling_rate=SAMPLE_RATE, padding="longest", truncation=False,
                        return_tensors="np").input_features[0]  # (n_mels, S / hop)
        return mel.astype(np.float32), min(mel.shape[-1], -(-real // extractor.hop_length))
    # Waveform towers: normalise over the real samples only, then pad with zeros.
    values = extractor(clip[:real], sampling_rate=SAMPLE_RATE,
                       return_tensors="np").input_values[0]  # (real,)
    clip[:real] = values
    return clip, real


def load_clip(path: str | Path, extractor: SequenceFeatureExtractor,
              clip_seconds: float) -> tuple[np.ndarray, int]:
    """Read `path` and return the tower's input (float32) and its count of real frames."""
    return clip_features(read_audio(path), extractor, clip_seconds)
