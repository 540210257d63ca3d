"""Cached frozen activations: training on cached stems is training on the towers themselves."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from common.adapter import adapter_state, to_numpy
from common.config import load_config
from common.model import build_model
from common.stems import cached_stems
from common.train import predict, train_local
from tests.conftest import LABELS, random_batch, tiny_overrides, train_options

CPU = torch.device("cpu")
# A pretrained image tower with LoRA from stage 5 on (stem: stages 0-4) and a tiny BERT with
# LoRA on its second layer only (stem: embeddings + layer 0): both towers have a stem to cache.
SPLIT = ["model.vision.name_or_path=embedded:efficientnet-lite0", "model.vision.image_size=32",
         "model.projection_dim=16", "model.text.lora_layers=1"]


@pytest.fixture(scope="module")
def cfg(tiny_text_dir):
    return load_config(tiny_overrides(tiny_text_dir) + SPLIT)


def _masked_batch(n: int):
    data = random_batch(n, seed=3)
    data.has_image[::4] = False  # some rows miss a modality: their stems are never used
    data.has_text[1::4] = False
    return data


def test_both_towers_cache_a_stem_of_the_expected_shape(cfg):
    bundle = build_model(cfg.model, LABELS)
    assert bundle.towers["image"].split == 5 and bundle.towers["text"].split == 1
    data = random_batch(5)
    stems = cached_stems(bundle, data, CPU)
    assert stems["image"][0].shape == (5, 112, 2, 2)  # stage 4 output: 112 channels, stride 16
    tokens = stems["text"][1]
    assert stems["text"][0].shape == (*tokens.shape, 32)  # (N, T, hidden of the tiny BERT)
    again = cached_stems(bundle, data, CPU)  # computed once per rows and tower
    assert all(again[m][0] is stems[m][0] for m in ("image", "text"))
    other = build_model(replace(cfg.model, lora=replace(cfg.model.lora, r=2),
                                modalities=("image",)), LABELS)
    assert cached_stems(other, data, CPU)["image"][0] is stems["image"][0]  # same tower


def test_training_on_cached_stems_matches_training_through_the_towers(cfg):
    data = _masked_batch(24)
    results = {}
    for cache in (True, False):
        bundle = build_model(cfg.model, LABELS)
        metrics = train_local(bundle, data, train_options(epochs=2, batch_size=8, lr=1e-2,
                                                           modality_dropout_text=0.2),
                              seed=7, device=CPU, cache=cache)
        results[cache] = (metrics["train_loss"], to_numpy(adapter_state(bundle.model)),
                          predict(bundle, data, cache=cache))
    (loss_c, state_c, logits_c), (loss_u, state_u, logits_u) = results[True], results[False]
    assert loss_c == pytest.approx(loss_u, rel=1e-6)
    for key in state_u:
        np.testing.assert_allclose(state_c[key], state_u[key], rtol=1e-4, atol=1e-6, err_msg=key)
    torch.testing.assert_close(logits_c, logits_u, rtol=1e-4, atol=1e-5)
    assert any("towers.image" in k and "lora_A" in k for k in state_u)  # the tower trained


def test_a_frozen_tower_caches_everything_and_sends_nothing(tiny_text_dir):
    cfg = load_config(tiny_overrides(tiny_text_dir) + SPLIT + ["model.vision.target_modules=[]"])
    bundle = build_model(cfg.model, LABELS)
    assert bundle.towers["image"].lora_targets == []
    state = adapter_state(bundle.model)
    assert not any("towers.image" in k for k in state)  # only its projection (in the head)
    stems = cached_stems(bundle, random_batch(3), CPU)
    assert stems["image"][0].shape == (3, 320, 1, 1)  # every block is stem
