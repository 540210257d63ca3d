"""Local training and metrics against independent references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score

from common.config import load_config
from common.model import build_model
from common.train import evaluate, macro_f1, restricted_softmax_scale, train_local
from tests.conftest import LABELS, random_batch, tiny_overrides


@pytest.mark.parametrize("seed", range(5))
def test_macro_f1_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    y_true, y_pred = rng.integers(0, 5, 200), rng.integers(0, 5, 200)
    y_pred[:50] = y_true[:50]
    expected = f1_score(y_true, y_pred, average="macro", labels=np.unique(
        np.concatenate([y_true, y_pred])))
    assert macro_f1(y_true, y_pred, 5) == pytest.approx(expected)


def test_training_lowers_the_loss_on_its_data(tiny_text_dir):
    cfg = load_config(tiny_overrides(tiny_text_dir))
    bundle = build_model(cfg.model, LABELS)
    data = random_batch(32)
    before = evaluate(bundle, data)["loss"]
    train_local(bundle, data, epochs=20, batch_size=8, lr=1e-2)
    assert evaluate(bundle, data)["loss"] < 0.5 * before


def test_frozen_backbone_weights_do_not_move(tiny_text_dir):
    cfg = load_config(tiny_overrides(tiny_text_dir))
    bundle = build_model(cfg.model, LABELS)
    frozen = {n: p.detach().clone() for n, p in bundle.model.named_parameters()
              if not p.requires_grad}
    train_local(bundle, random_batch(16), epochs=2, batch_size=8, lr=1e-2)
    for name, p in bundle.model.named_parameters():
        if name in frozen:
            assert np.array_equal(p.detach().numpy(), frozen[name].numpy()), name


def _output_layer(bundle):
    """The trainable (weight, bias) of the head's last Linear: one row per class."""
    named = {n: p for n, p in bundle.model.named_parameters() if p.requires_grad}
    weight = next(p for n, p in named.items() if n.endswith("mlp.4.weight"))
    bias = next(p for n, p in named.items() if n.endswith("mlp.4.bias"))
    return weight, bias


@pytest.mark.parametrize("scale, absent_row_moves", [(0.0, False), (1.0, True)])
def test_restricted_softmax_leaves_absent_classes_alone(tiny_text_dir, scale, absent_row_moves):
    cfg = load_config(tiny_overrides(tiny_text_dir))
    bundle = build_model(cfg.model, LABELS)
    data = random_batch(24, num_labels=2)  # the site holds classes 0 and 1, never class 2
    weight, bias = _output_layer(bundle)
    before = weight[2].detach().clone(), bias[2].detach().clone()
    train_local(bundle, data, epochs=2, batch_size=8, lr=1e-2, absent_class_scale=scale)
    moved = not (torch.equal(weight[2], before[0]) and torch.equal(bias[2], before[1]))
    assert moved == absent_row_moves


def test_restricted_softmax_scale():
    scale = restricted_softmax_scale(torch.tensor([0, 3, 3]), 5, 0.25)
    assert scale.tolist() == [1.0, 0.25, 0.25, 1.0, 0.25]
