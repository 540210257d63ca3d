"""Contracts of the model and its adapter: what travels, what loads, what PEFT sees."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from peft import PeftModel

from common.adapter import AdapterMismatch, adapter_state, set_adapter_state, state_bytes, to_numpy
from common.config import load_config
from common.model import backbone_bytes, build_backbone, build_model, load_adapter, save_adapter
from common.train import predict, train_local
from tests.conftest import LABELS, random_batch, tiny_overrides, train_options


def _trainable_and_frozen(model):
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    return trainable, frozen


def test_default_payload_holds_only_trainable_tensors_and_is_under_one_percent(default_cfg):
    bundle = build_model(default_cfg.model, LABELS)
    state = adapter_state(bundle.model)
    trainable, frozen = _trainable_and_frozen(bundle.model)
    # PEFT strips the adapter name from keys; map each key back to the live parameter name.
    live = {n.replace(".default", "").replace("modules_to_save.", "") for n in trainable}
    assert set(state) == live
    frozen_plain = {n for n in frozen if "original_module" not in n}
    assert not set(state) & frozen_plain
    assert all("towers." not in k or "lora_" in k for k in state)  # no frozen tower weight
    assert any("towers.text" in k for k in state) and any("towers.image" in k for k in state)
    sent = ArrayRecord({k: Array(v) for k, v in to_numpy(state).items()}).count_bytes()
    assert sent <= 1_500_000  # per site-round, what Flower sends
    assert 0 < state_bytes(to_numpy(state)) / backbone_bytes(bundle.model) < 0.02


def test_lora_sits_on_attention_projections_of_pretrained_towers(tiny_text_dir, tiny_vit_dir):
    cfg = load_config(tiny_overrides(tiny_text_dir, tiny_vit_dir))
    bundle = build_model(cfg.model, LABELS)
    lora_modules = {n.rsplit(".lora_A", 1)[0] for n, _ in bundle.model.named_parameters()
                    if "lora_A" in n}
    def leaves(tower: str) -> set[str]:
        return {n.rsplit(".", 1)[-1] for n in lora_modules if tower in n}

    assert leaves("towers.text") == {"query", "value"}  # BERT naming
    assert leaves("towers.image") == {"q_proj", "v_proj"}  # transformers-5 ViT naming
    # A pretrained vision tower is frozen under LoRA, not sent in full.
    assert not any("towers.image" in k and "lora_" not in k
                   for k in adapter_state(bundle.model))


def test_saved_adapter_loads_with_peft_and_reproduces_logits(tmp_path, tiny_text_dir):
    cfg = load_config(tiny_overrides(tiny_text_dir))
    bundle = build_model(cfg.model, LABELS)
    data = random_batch(24)
    train_local(bundle, data, train_options(epochs=2, batch_size=8, lr=1e-2))
    expected = predict(bundle, data)
    save_adapter(bundle, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    loaded = load_adapter(cfg.model, tmp_path / "adapter")  # fedmm's loader ...
    assert loaded.label_names == LABELS
    torch.testing.assert_close(predict(loaded, data), expected, rtol=0, atol=0)
    # ... and, independently, PEFT's own loader onto a freshly built backbone.
    backbone, _ = build_backbone(cfg.model, len(LABELS))
    independent = replace(loaded, model=PeftModel.from_pretrained(backbone,
                                                                  str(tmp_path / "adapter")))
    torch.testing.assert_close(predict(independent, data), expected, rtol=0, atol=0)
    fresh = predict(build_model(cfg.model, LABELS), data)
    assert not torch.allclose(fresh, expected)  # the adapter, not the backbone, made the logits


def test_set_adapter_state_round_trips_and_refuses_mismatches(tiny_text_dir):
    cfg = load_config(tiny_overrides(tiny_text_dir))
    a, b = build_model(cfg.model, LABELS), build_model(cfg.model, LABELS)
    train_local(a, random_batch(16), train_options(epochs=1, batch_size=8, lr=1e-2))
    sent = to_numpy(adapter_state(a.model))
    set_adapter_state(b.model, sent)
    for key, value in adapter_state(b.model).items():
        np.testing.assert_array_equal(value.numpy(), sent[key])
    before = to_numpy(adapter_state(b.model))
    bad_shape = dict(sent)
    key = next(iter(bad_shape))
    bad_shape[key] = np.zeros((3, 3), dtype=np.float32)
    with pytest.raises(AdapterMismatch, match="shape"):
        set_adapter_state(b.model, bad_shape)
    with pytest.raises(AdapterMismatch, match="keys"):
        set_adapter_state(b.model, {k: v for k, v in sent.items() if k != key})
    for k, v in adapter_state(b.model).items():  # a refused state changes nothing
        np.testing.assert_array_equal(v.numpy(), before[k])


def test_fedprox_term_keeps_weights_near_the_global_ones(tiny_text_dir):
    cfg = load_config(tiny_overrides(tiny_text_dir))
    data = random_batch(32)

    def drift(mu: float) -> float:
        bundle = build_model(cfg.model, LABELS)
        start = to_numpy(adapter_state(bundle.model))
        train_local(bundle, data, train_options(epochs=3, batch_size=8, lr=1e-2, proximal_mu=mu))
        end = to_numpy(adapter_state(bundle.model))
        return float(np.sqrt(sum(((end[k] - start[k]) ** 2).sum() for k in start)))

    assert drift(100.0) < 0.5 * drift(0.0)


def test_text_only_and_image_only_ablations_build(default_cfg):
    image_only = load_config(["model.modalities=[image]"])
    bundle = build_model(image_only.model, LABELS)
    assert "text" not in bundle.towers and list(bundle.towers) == ["image"]
    text_only = load_config(["model.modalities=[text]"])
    bundle = build_model(text_only.model, LABELS)
    assert list(bundle.towers) == ["text"]
    logits = predict(bundle, random_batch(4))
    assert logits.shape == (4, len(LABELS))
