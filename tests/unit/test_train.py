"""Local training and metrics against independent references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score

from common.config import load_config
from common.model import build_model
from common.train import (evaluate, loss_fn, macro_f1, modality_dropout, model_inputs,
                          restricted_softmax_scale, train_local)
from tests.conftest import LABELS, random_batch, tiny_overrides, train_options


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
    train_local(bundle, data, train_options(epochs=20, batch_size=8, lr=1e-2))
    assert evaluate(bundle, data)["loss"] < 0.5 * before


def test_frozen_backbone_weights_do_not_move(tiny_text_dir):
    cfg = load_config(tiny_overrides(tiny_text_dir))
    bundle = build_model(cfg.model, LABELS)
    frozen = {n: p.detach().clone() for n, p in bundle.model.named_parameters()
              if not p.requires_grad}
    train_local(bundle, random_batch(16), train_options(epochs=2, batch_size=8, lr=1e-2))
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
    train_local(bundle, data, train_options(epochs=2, batch_size=8, lr=1e-2,
                                            absent_class_scale=scale))
    moved = not (torch.equal(weight[2], before[0]) and torch.equal(bias[2], before[1]))
    assert moved == absent_row_moves


def test_restricted_softmax_scale():
    scale = restricted_softmax_scale(torch.tensor([0, 3, 3]), 5, 0.25)
    assert scale.tolist() == [1.0, 0.25, 0.25, 1.0, 0.25]


def test_modality_dropout_hides_at_the_configured_rates_and_never_a_rows_last_modality():
    n, rates = 60_000, {"text": 0.3, "image": 0.2, "audio": 0.25}
    present = {m: torch.ones(n, dtype=torch.bool) for m in rates}
    present["image"][:1000] = False  # rows already missing a modality may lose another ...
    present["text"][1000:2000] = False
    present["text"][2000:3000] = present["audio"][2000:3000] = False  # ... but not their last
    hide = modality_dropout(present, rates, torch.Generator().manual_seed(0))
    full = slice(3000, None)
    for m, rate in rates.items():
        sigma = (rate * (1 - rate) / (n - 3000)) ** 0.5
        assert abs(hide[m][full].float().mean().item() - rate) < 4 * sigma
    assert int(torch.stack(list(hide.values())).sum(0).max()) == 1  # one modality at most
    assert not hide["image"][:1000].any() and not hide["text"][1000:2000].any()
    assert not hide["image"][2000:3000].any()  # image is all rows 2000..2999 still hold
    two = modality_dropout({m: present[m] for m in ("text", "image")}, rates,
                           torch.Generator().manual_seed(0))
    for m in ("text", "image"):  # the audio band comes last: without it the draws stay
        assert torch.equal(two[m][full], hide[m][full])


def test_hidden_text_never_reaches_the_text_tower(tiny_text_dir):
    cfg = load_config(tiny_overrides(tiny_text_dir))
    bundle = build_model(cfg.model, LABELS)
    data = random_batch(64)
    hidden = {"text": torch.arange(8) % 2 == 0, "image": torch.zeros(8, dtype=torch.bool)}
    inputs = model_inputs(bundle, data, torch.arange(8), torch.device("cpu"), hidden)
    assert inputs["text_mask"].tolist() == [False, True] * 4 and inputs["image_mask"].all()
    rows = []
    text_tower = bundle.towers["text"].encoder
    handle = text_tower.register_forward_hook(lambda m, args, kw, out: rows.append(
        kw["input_ids"].shape[0]), with_kwargs=True)
    train_local(bundle, data, train_options(epochs=1, batch_size=8, lr=1e-2,
                                            modality_dropout_text=0.5))
    handle.remove()
    assert 16 < sum(rows) < 48  # about half of the 64 rows; the image tower saw all of them


def _trainable_shift(tiny_text_dir, **kwargs) -> float:
    cfg = load_config(tiny_overrides(tiny_text_dir))
    bundle = build_model(cfg.model, LABELS)
    params = [p for p in bundle.model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    train_local(bundle, random_batch(16), train_options(epochs=1, batch_size=8, lr=1e-2,
                                                        **kwargs))
    return sum((p.detach() - b).norm().item() for p, b in zip(params, before))


def test_max_grad_norm_clips_every_step(tiny_text_dir):
    # AdamW divides by sqrt(v) + 1e-8: a gradient clipped to norm 1e-12 moves almost nothing.
    free = _trainable_shift(tiny_text_dir)
    clipped = _trainable_shift(tiny_text_dir, max_grad_norm=1e-12)
    assert clipped < 0.01 * free


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_label_smoothing_loss_matches_a_numpy_reference(smoothing):
    rng = np.random.default_rng(0)
    logits, labels = rng.normal(size=(7, 4)), rng.integers(0, 4, 7)
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))  # (N, C)
    target = np.full((7, 4), smoothing / 4) + (1 - smoothing) * np.eye(4)[labels]
    expected = -(target * log_p).sum(-1).mean()
    got = loss_fn(torch.tensor(logits), torch.tensor(labels), train_options(
        label_smoothing=smoothing))
    assert got.item() == pytest.approx(expected, rel=1e-6)
