"""Every modality subset is one model: it builds, trains, saves and reloads with PEFT exactly.

Table-driven over the 7 non-empty subsets of image, text, audio and the three fusions, on tiny
pretrained-style towers that all take LoRA (a 2-layer BERT, a 2-layer ViT, a 2-layer Whisper
encoder), with some rows missing each modality.
"""

from __future__ import annotations

from itertools import combinations

import pytest
import torch
from peft import PeftModel

from common.adapter import adapter_state
from common.config import load_config
from common.model import build_backbone, build_model, save_adapter
from common.stems import cached_stems
from common.train import predict, train_local
from tests.conftest import (LABELS, assert_reloads_to_identical_logits, random_batch,
                            tiny_overrides, train_options)

MODALITIES = ("image", "text", "audio")
SUBSETS = [s for k in (1, 2, 3) for s in combinations(MODALITIES, k)]


def _cfg(dirs, subset: tuple[str, ...], fusion: str = "concat"):
    text, vision, audio = dirs
    return load_config(tiny_overrides(text, vision, audio, modalities=",".join(subset))
                       + [f"model.fusion={fusion}", "model.projection_dim=8"])


def _data(subset: tuple[str, ...], n: int = 12):
    data = random_batch(n, modalities=subset)
    if len(subset) > 1:  # rows without one modality (each row keeps another)
        for i, m in enumerate(subset):
            data.present[m][i::len(subset) + 1] = False
    return data


@pytest.fixture(scope="module")
def dirs(tiny_text_dir, tiny_vit_dir, tiny_whisper_dir):
    return tiny_text_dir, tiny_vit_dir, tiny_whisper_dir


@pytest.mark.parametrize("fusion", ["concat", "gated", "late"])
@pytest.mark.parametrize("subset", SUBSETS, ids="+".join)
def test_subset_builds_trains_and_reloads_to_identical_logits(dirs, subset, fusion, tmp_path):
    cfg = _cfg(dirs, subset, fusion)
    bundle = build_model(cfg.model, LABELS)
    assert tuple(bundle.towers) == tuple(m for m in ("text", "image", "audio") if m in subset)
    state = adapter_state(bundle.model)
    assert {k.split("towers.")[1].split(".")[0] for k in state if "towers." in k} == set(subset)
    data = _data(subset)
    before = {k: v.clone() for k, v in state.items()}
    train_local(bundle, data, train_options(epochs=1, batch_size=8, lr=1e-2))
    after = adapter_state(bundle.model)
    assert any(not torch.equal(after[k], before[k]) for k in after)  # a step was taken
    expected = predict(bundle, data)
    save_adapter(bundle, tmp_path / "adapter")
    backbone, _ = build_backbone(cfg.model, len(LABELS))
    reloaded = PeftModel.from_pretrained(backbone, str(tmp_path / "adapter"))
    got = predict(type(bundle)(reloaded, LABELS, cfg.model), data)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_the_audio_tower_takes_lora_on_its_top_half_and_caches_its_stem(dirs):
    bundle = build_model(_cfg(dirs, ("audio",)).model, LABELS)
    tower = bundle.towers["audio"]
    assert tower.split == 1  # 2 layers: LoRA on layer 1, layer 0 is stem
    assert {k.split(".lora_")[0].rsplit("layers.", 1)[1] for k in adapter_state(bundle.model)
            if ".lora_A." in k} == {"1.self_attn.q_proj", "1.self_attn.v_proj"}
    data = _data(("audio",), 8)
    stems = cached_stems(bundle, data, torch.device("cpu"))
    assert stems["audio"][0].shape == (8, 50, 16)  # (N, frames / 2, d_model)
    assert torch.equal(stems["audio"][1], data.inputs["audio"].mask)
    torch.testing.assert_close(predict(bundle, data), predict(bundle, data, cache=False))


def test_masked_audio_never_reaches_the_logits(dirs):
    bundle = build_model(_cfg(dirs, ("text", "audio")).model, LABELS)
    data = _data(("text", "audio"))
    base = predict(bundle, data)
    clips = data.inputs["audio"]
    absent = ~data.has("audio")
    features = clips.features.clone()
    features[absent] = torch.randn_like(features[absent]) * 10
    changed = type(data)(data.labels, {**data.inputs, "audio": type(clips)(features, clips.mask)},
                         data.present)
    torch.testing.assert_close(predict(bundle, changed), base, rtol=0, atol=0)
    # Padding past a clip's first padded frame (the convolutions' reach) does not move it.
    reach = clips.mask.clone()
    reach[:, 1:] |= clips.mask[:, :-1]  # (N, T)
    padded = clips.features.clone()
    padded[~reach.unsqueeze(1).expand_as(padded)] = 5.0
    changed = type(data)(data.labels, {**data.inputs, "audio": type(clips)(padded, clips.mask)},
                         data.present)
    torch.testing.assert_close(predict(bundle, changed, cache=False), predict(bundle, data,
                                                                            cache=False))


def test_a_model_modality_the_data_lacks_is_absent_from_every_row(dirs):
    bundle = build_model(_cfg(dirs, ("image", "text", "audio")).model, LABELS)
    data = random_batch(8, modalities=("image", "text"))  # e.g. a site without audio files
    assert not data.has("audio").any()
    logits = predict(bundle, data)
    assert logits.shape == (8, len(LABELS)) and logits.isfinite().all()
    train_local(bundle, data, train_options(epochs=1, batch_size=4))


@pytest.mark.parametrize("kind", ["wav2vec2", "hubert"])
def test_a_hub_style_waveform_tower_is_the_audio_tower_of_a_model(kind, tiny_text_dir,
                                                                   tmp_path):
    from transformers import HubertConfig, HubertModel, Wav2Vec2Config, Wav2Vec2Model

    from common.encoded import Clips, Encoded
    from common.task import input_encoding

    config_cls, model_cls = {"wav2vec2": (Wav2Vec2Config, Wav2Vec2Model),
                             "hubert": (HubertConfig, HubertModel)}[kind]
    torch.manual_seed(0)
    model_cls(config_cls(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=32, conv_dim=(8, 8), conv_kernel=(10, 3),
                         conv_stride=(5, 2), num_conv_pos_embeddings=16,
                         num_conv_pos_embedding_groups=2)).save_pretrained(tmp_path / kind)
    cfg = load_config(tiny_overrides(tiny_text_dir, audio_dir=tmp_path / kind,
                                     modalities="text,audio"))
    assert input_encoding(cfg.model).audio_extractor.feature_size == 1  # a waveform tower
    bundle = build_model(cfg.model, LABELS)
    text = random_batch(8, modalities=("text",))
    mask = torch.ones(8, 4000, dtype=torch.bool)
    mask[4:, 2500:] = False
    data = Encoded(text.labels, {**text.inputs, "audio": Clips(torch.randn(8, 4000), mask)})
    train_local(bundle, data, train_options(epochs=1, batch_size=4, lr=1e-2))
    assert_reloads_to_identical_logits(bundle, data, tmp_path / "adapter")
