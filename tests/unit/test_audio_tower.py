"""The audio towers against independent references: ctranslate2's own Whisper encoder, the
transformers forward of the same checkpoints, and soundfile/NumPy for audio input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from peft import LoraConfig, get_peft_model

from common import audio
from common.towers import packaged
from common.towers.ct2 import CT2FormatError, read_ct2, whisper_encoder_state
from common.towers.whisper import WhisperAudioTower, audio_feature_extractor, build_audio_tower

TINY, BASE = "embedded:whisper-tiny.en", "embedded:whisper-base"


@pytest.fixture(scope="module", autouse=True)
def fedmm_cache(tmp_path_factory) -> Path:
    """Every conversion in this file goes to one fresh cache, shared by the tests."""
    root = tmp_path_factory.mktemp("fedmm-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(packaged.CACHE_ENV, str(root))
        yield root


@pytest.fixture(scope="module")
def towers(fedmm_cache) -> dict[str, WhisperAudioTower]:
    return {name: build_audio_tower(name).eval() for name in (TINY, BASE)}


def _speechlike(seconds: float, seed: int = 0) -> np.ndarray:
    """A 16 kHz test signal with speech-like spectral movement: a chirp, harmonics and noise."""
    t = np.arange(round(seconds * audio.SAMPLE_RATE)) / audio.SAMPLE_RATE
    f0 = 120 + 80 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / audio.SAMPLE_RATE
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 2 * t)
    wave = sum(np.sin(k * phase) / k for k in range(1, 6)) * envelope
    noise = np.random.default_rng(seed).standard_normal(t.size)
    return (0.2 * wave + 0.01 * noise).astype(np.float32)


def _log_mel(tower, seconds: float, clip_seconds: float) -> np.ndarray:
    mel, _ = audio.clip_features(_speechlike(seconds), tower.feature_extractor, clip_seconds)
    return mel[None]  # (1, n_mels, frames)


# --- the converted encoder is the packaged model -------------------------------------------

@pytest.mark.parametrize("name", [TINY, BASE])
def test_converted_encoder_matches_ctranslate2(name, towers, tmp_path):
    ct2 = pytest.importorskip("ctranslate2")  # the reference (test extra)
    tower = towers[name]
    folder = packaged.assemble_ct2_folder(name, tmp_path / "ct2")
    reference = ct2.models.Whisper(str(folder), device="cpu", compute_type="float32",
                                   intra_threads=2)
    lengths = ((2.0, 200), (30.0, 3000)) if name == TINY else ((2.0, 200),)  # base: cheap only
    for seconds, frames in lengths:  # ct2 also encodes inputs shorter than 3000 frames
        mel = _log_mel(tower, seconds - 0.5, seconds)  # (1, M, frames), padded like Whisper
        assert mel.shape[-1] == frames
        expected = np.asarray(reference.encode(ct2.StorageView.from_array(mel)))  # (1, T', D)
        with torch.no_grad():
            got = tower.encode(torch.from_numpy(mel)).numpy()
        assert got.shape == expected.shape == (1, frames // 2, tower.out_dim)
        diff = np.abs(got - expected)
        if frames == 200:
            assert diff.max() <= 1e-3
        else:  # 1500 frames: a few elements are ill-conditioned in float32 (ct2 itself is up
            # to 2.6e-3 from a float64 run of these weights there), so bound the bulk and the tail
            assert np.quantile(diff, 0.9999) <= 1e-3 and diff.max() <= 5e-3
        with torch.no_grad():  # pooled features: the mean of ct2's frames
            np.testing.assert_allclose(tower(torch.from_numpy(mel)).numpy(),
                                       expected.mean(axis=1), atol=1e-4)


def test_base_needs_both_parts_and_every_encoder_variable_is_mapped():
    with pytest.raises(CT2FormatError, match="truncated"):
        read_ct2(packaged.ct2_parts(BASE)[:1])
    _, variables = read_ct2(packaged.ct2_parts(TINY))
    whisper_encoder_state(variables)  # complete
    with pytest.raises(CT2FormatError, match="without a transformers home"):
        whisper_encoder_state(variables | {"encoder/extra/weight": np.zeros(3, np.float16)})
    qkv = variables["encoder/layer_1/self_attention/linear_0/bias"].copy()
    qkv[len(qkv) // 2] = 1.0  # inside the k third
    with pytest.raises(CT2FormatError, match="k_proj bias"):
        whisper_encoder_state(variables | {"encoder/layer_1/self_attention/linear_0/bias": qkv})


# --- convert once, rebuild what is incomplete ----------------------------------------------

def test_second_load_does_not_convert_and_an_incomplete_folder_is_rebuilt(
        towers, monkeypatch, tmp_path):
    folder = packaged.converted_folder(TINY)  # converted by the towers fixture
    monkeypatch.setattr(packaged, "convert_ct2_whisper", lambda *a: pytest.fail("converted"))
    assert packaged.converted_folder(TINY) == folder
    assert build_audio_tower(TINY).out_dim == 384

    monkeypatch.setenv(packaged.CACHE_ENV, str(tmp_path))  # a copy we may damage
    copy = tmp_path / folder.relative_to(folder.parents[1])
    shutil.copytree(folder, copy)
    assert packaged.converted_folder(TINY) == copy  # a complete copy is used as it is
    calls = []
    monkeypatch.setattr(packaged, "convert_ct2_whisper",
                        lambda parts, out: calls.append(out) or shutil.copytree(
                            folder, out, dirs_exist_ok=True, ignore=lambda *_: [packaged.MARKER]))
    (copy / packaged.MARKER).unlink()  # no completion marker
    assert packaged.converted_folder(TINY) == copy and len(calls) == 1
    assert packaged.is_complete(copy)
    with open(copy / "model.safetensors", "r+b") as f:  # truncated after completion
        f.truncate(1000)
    assert not packaged.is_complete(copy)
    assert packaged.converted_folder(TINY) == copy and len(calls) == 2
    assert json.loads((copy / packaged.MARKER).read_text())["files"]["model.safetensors"] == (
        folder / "model.safetensors").stat().st_size
    assert not [p for p in tmp_path.rglob(".whisper*")]  # no temp folder left behind


# --- short clips, stem/head split, masks ---------------------------------------------------

def test_two_second_clip_encodes_unpadded_and_every_split_agrees(towers):
    base = towers[TINY]
    mel = torch.from_numpy(_log_mel(base, 2.0, 2.0))  # (1, 80, 200)
    with torch.no_grad():
        assert base.encode(mel).shape == (1, 100, 384)
        expected = base(mel)  # (1, 384), split 0: checked against ct2 above
        for k in range(4):
            targets = [f"layers.{k}.self_attn.q_proj", f"layers.{k}.self_attn.v_proj"]
            tower = WhisperAudioTower(base.encoder, base.feature_extractor, targets)
            assert tower.split == k
            stem = tower.stem(mel)
            assert stem.shape == (1, 100, 384)
            torch.testing.assert_close(tower.head(stem), expected, atol=1e-5, rtol=1e-5)


def test_padding_beyond_the_mask_does_not_change_features(towers):
    tower = towers[TINY]
    mel = torch.from_numpy(_log_mel(tower, 2.0, 2.0))  # (1, 80, 200)
    mask = torch.ones(1, 200, dtype=torch.bool)
    mask[:, 120:] = False  # 1.2 s real; the convolutions of real frames reach mel frame 120
    other = mel.clone()
    other[:, :, 121:] = torch.randn(1, 80, 79)
    with torch.no_grad():
        torch.testing.assert_close(tower(mel, mask), tower(other, mask), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(tower(mel), tower(other), atol=1e-3)  # the mask matters


def test_clip_longer_than_thirty_seconds_is_refused(towers):
    with pytest.raises(ValueError, match="30 s"):
        towers[TINY].stem(torch.zeros(1, 80, 3002))


# --- PEFT -----------------------------------------------------------------------------------

def test_lora_on_q_and_v_has_the_count_of_its_layer_shapes(towers):
    tower = build_audio_tower(TINY)  # default: the top half of the layers, the rest is stem
    cfg = tower.encoder.config  # tiny.en: 4 layers, d_model 384
    assert tower.split == 2 and len(tower.lora_targets) == cfg.encoder_layers
    assert all(".layers.2." in t or ".layers.3." in t for t in tower.lora_targets)
    every = build_audio_tower(TINY, ["q_proj", "v_proj"])
    assert len(every.lora_targets) == 2 * cfg.encoder_layers and every.split == 0
    model = get_peft_model(every, LoraConfig(r=8, lora_alpha=16,
                                             target_modules=every.lora_targets))
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in n for n in trainable)
    assert sum(trainable.values()) == cfg.encoder_layers * 2 * 8 * (cfg.d_model + cfg.d_model)
    mel = torch.from_numpy(_log_mel(every, 1.0, 1.0))
    model(mel).square().mean().backward()
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


# --- HF checkpoints in the same interface ---------------------------------------------------

def test_hf_whisper_folder_matches_transformers_forward(tmp_path):
    from transformers import WhisperConfig, WhisperModel

    config = WhisperConfig(d_model=16, encoder_layers=3, encoder_attention_heads=2,
                           decoder_layers=1, decoder_attention_heads=2, encoder_ffn_dim=32,
                           decoder_ffn_dim=32, num_mel_bins=80)
    torch.manual_seed(0)
    WhisperModel(config).save_pretrained(tmp_path)
    tower = build_audio_tower(tmp_path).eval()
    assert tower.out_dim == 16 and tower.feature_extractor.feature_size == 80
    mel = torch.randn(2, 80, 3000)  # transformers' forward takes 3000 frames only
    reference = WhisperModel.from_pretrained(tmp_path).encoder.eval()
    split = build_audio_tower(tmp_path, ["layers.2.self_attn.q_proj"]).eval()
    with torch.no_grad():
        out = reference(mel, output_hidden_states=True)
        torch.testing.assert_close(tower.encode(mel), out.last_hidden_state)
        assert split.split == 2  # its stem ends where transformers' layer 2 begins
        torch.testing.assert_close(split.stem(mel), out.hidden_states[2])
        assert tower(mel[..., :200]).shape == (2, 16)


@pytest.mark.parametrize("kind", ["wav2vec2", "hubert"])
def test_hf_waveform_tower_matches_transformers_forward(kind, tmp_path):
    from transformers import HubertConfig, HubertModel, Wav2Vec2Config, Wav2Vec2Model

    config_cls, model_cls = {"wav2vec2": (Wav2Vec2Config, Wav2Vec2Model),
                             "hubert": (HubertConfig, HubertModel)}[kind]
    config = config_cls(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, conv_dim=(8, 8), conv_kernel=(10, 3),
                        conv_stride=(5, 2), num_conv_pos_embeddings=16,
                        num_conv_pos_embedding_groups=2)
    torch.manual_seed(0)
    model_cls(config).save_pretrained(tmp_path)
    tower = build_audio_tower(tmp_path).eval()
    assert tower.out_dim == 16
    assert {n.rsplit(".", 1)[-1] for n in tower.lora_targets} == {"q_proj", "v_proj"}
    wave = torch.randn(2, 4000)
    mask = torch.ones(2, 4000, dtype=torch.long)
    mask[1, 2500:] = 0
    reference = model_cls.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        hidden = reference(wave, attention_mask=mask).last_hidden_state  # (2, T', 16)
        frames = reference._get_feature_vector_attention_mask(hidden.shape[1], mask)
        w = frames.unsqueeze(-1).float()
        expected = (hidden * w).sum(1) / w.sum(1)
        torch.testing.assert_close(tower(wave, mask), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(tower.head(tower.stem(wave), mask), expected,
                                   atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="not inside"):
        build_audio_tower(tmp_path, ["feature_projection.projection"])


def test_a_frozen_tower_is_all_stem_and_its_extractor_loads_without_weights(towers):
    frozen = build_audio_tower(TINY, [])
    assert frozen.lora_targets == [] and frozen.split == frozen.encoder.config.encoder_layers
    mel = torch.from_numpy(_log_mel(frozen, 1.0, 1.0))
    with torch.no_grad():
        torch.testing.assert_close(frozen.head(frozen.stem(mel)), towers[TINY](mel))
    extractor = audio_feature_extractor(TINY)
    assert extractor.to_dict() == towers[TINY].feature_extractor.to_dict()


def test_unknown_targets_and_model_types_are_refused(tmp_path):
    from transformers import BertConfig, BertModel

    with pytest.raises(ValueError, match="no Linear layer"):
        build_audio_tower(TINY, ["no_such_proj"])
    BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not an audio tower"):
        build_audio_tower(tmp_path)


# --- audio input ----------------------------------------------------------------------------

def test_stereo_44k_wav_becomes_mono_16k_of_the_right_length(tmp_path):
    t = np.arange(int(1.5 * 44_100)) / 44_100
    tone = 0.5 * np.sin(2 * np.pi * 440 * t)
    sf.write(tmp_path / "stereo.wav", np.stack([tone, 0.5 * tone], axis=1), 44_100)
    wave = audio.read_audio(tmp_path / "stereo.wav")
    assert wave.dtype == np.float32 and wave.shape == (24_000,)
    t16 = np.arange(24_000) / 16_000
    expected = 0.75 * 0.5 * np.sin(2 * np.pi * 440 * t16)  # mean of the channels, resampled
    assert np.abs(wave[500:-500] - expected[500:-500]).max() < 1e-2


def test_flac_and_ogg_read_and_clips_are_cropped_or_padded(tmp_path, towers):
    source = _speechlike(1.0)
    for fmt in ("flac", "ogg"):
        sf.write(tmp_path / f"clip.{fmt}", source, 16_000)
        wave = audio.read_audio(tmp_path / f"clip.{fmt}")
        assert abs(len(wave) - 16_000) <= 16 and np.corrcoef(wave[:15_000],
                                                             source[:15_000])[0, 1] > 0.9
    extractor = towers[TINY].feature_extractor
    mel, real = audio.load_clip(tmp_path / "clip.flac", extractor, clip_seconds=2.5)
    assert mel.dtype == np.float32 and mel.shape == (80, 250) and real == 100
    mel, real = audio.load_clip(tmp_path / "clip.flac", extractor, clip_seconds=0.5)
    assert mel.shape == (80, 50) and real == 50


@pytest.mark.parametrize("content", [b"", b"RIFF\x00\x00\x00\x00WAVEgarbage" * 20, "empty-wav"])
def test_empty_or_garbage_audio_raises_audio_error_naming_the_file(content, tmp_path):
    path = tmp_path / "bad.wav"
    if content == "empty-wav":
        sf.write(path, np.zeros((0, 1), np.float32), 16_000)
    else:
        path.write_bytes(content)
    for read in (audio.read_audio, audio.check_audio):
        with pytest.raises(audio.AudioError, match="bad.wav"):
            read(path)
