"""Neither modality alone solves the demo task: fused beats image-only and text-only clearly.

All three are trained the same way (same data, optimizer, steps) from the same code path.
"""

from __future__ import annotations

import pytest

from common.config import load_config
from common.data import encode, label_names, load_manifest
from common.demo_data import generate
from common.model import build_model
from common.task import input_encoding
from common.train import evaluate, train_local
from tests.conftest import train_options


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    train, test = generate(tmp_path_factory.mktemp("demo"), 1000, 200, seed=3)
    train_ds, test_ds = load_manifest(train)[0], load_manifest(test)[0]
    return train_ds, test_ds, label_names(train_ds)


def _accuracy(modalities: str, demo) -> float:
    train_ds, test_ds, names = demo
    cfg = load_config([f"model.modalities=[{modalities}]"])
    bundle = build_model(cfg.model, names)
    args = (names, input_encoding(cfg.model))
    train_local(bundle, encode(train_ds, *args), train_options(epochs=3, batch_size=16,
                                                             lr=cfg.train.lr), seed=0)
    return evaluate(bundle, encode(test_ds, *args))["accuracy"]


def test_fused_model_beats_each_single_modality_by_a_wide_margin(demo):
    fused = _accuracy("image,text", demo)
    image_only = _accuracy("image", demo)
    text_only = _accuracy("text", demo)
    assert image_only < 0.62  # the image carries the shape only: 3 of 6 classes at best
    assert text_only < 0.45  # the text carries the status only: 2 of 6 classes at best
    print(f"fused {fused:.3f} image-only {image_only:.3f} text-only {text_only:.3f}")
    assert fused >= max(image_only, text_only) + 0.25, (fused, image_only, text_only)
