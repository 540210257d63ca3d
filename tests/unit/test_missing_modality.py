"""Missing modalities are masked, never fed: learned placeholders stand in and travel."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open

from common.adapter import adapter_state
from common.config import load_config
from common.encoded import Encoded
from common.model import build_backbone, build_model, save_adapter
from common.train import predict, train_local
from tests.conftest import LABELS, random_batch, tiny_overrides, train_options

HAS_IMAGE = [True, False, True, True, False, True, True, True]
HAS_TEXT = [True, True, False, True, True, True, False, True]


@pytest.fixture(scope="module")
def cfg(tiny_text_dir):
    return load_config(tiny_overrides(tiny_text_dir))


def _masked(n: int = 8, seed: int = 0) -> Encoded:
    d = random_batch(n, seed=seed)
    return Encoded(d.labels, d.inputs, {"image": torch.tensor(HAS_IMAGE[:n]),
                                        "text": torch.tensor(HAS_TEXT[:n])})


def _heads(model) -> list[torch.nn.Module]:
    return [m for n, m in model.named_modules()
            if n.endswith("fusion_head.modules_to_save.default")]


def _randomise_placeholders(model) -> None:
    (head,) = _heads(model)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in head.placeholders.values():
            p.copy_(torch.randn(p.shape, generator=g))


def test_encoded_masks_default_to_present_and_follow_subset():
    d = random_batch(4)
    assert d.has_image.dtype == torch.bool and bool(d.has_image.all() & d.has_text.all())
    m = _masked(4)
    sub = m.subset([2, 1])
    assert sub.has_image.tolist() == [True, False] and sub.has_text.tolist() == [False, True]


def test_masked_modality_content_never_reaches_the_logits(cfg):
    bundle = build_model(cfg.model, LABELS)
    _randomise_placeholders(bundle.model)
    data = _masked()
    base = predict(bundle, data, batch_size=4)
    no_image, no_text = ~data.has_image, ~data.has_text
    pixels = data.pixel_values.clone()
    pixels[no_image] = torch.randn_like(pixels[no_image]) * 10
    texts = [("totally different words " * 3) if not k else t
             for t, k in zip(data.texts, data.has_text.tolist())]
    changed = Encoded(data.labels, {"image": pixels, "text": texts}, data.present)
    torch.testing.assert_close(predict(bundle, changed, batch_size=4), base, rtol=0, atol=0)
    # The placeholder is used: the same rows fed as zeros / empty text give other logits.
    zeros = data.pixel_values.clone()
    zeros[no_image] = 0
    blank = ["" if not k else t for t, k in zip(data.texts, data.has_text.tolist())]
    fed = predict(bundle, Encoded(data.labels, {"image": zeros, "text": blank}), batch_size=4)
    for rows in (no_image, no_text):
        assert not torch.allclose(fed[rows], base[rows])
        torch.testing.assert_close(fed[~(no_image | no_text)], base[~(no_image | no_text)])
    # ... and it matters: another placeholder value moves exactly the masked rows.
    (head,) = _heads(bundle.model)
    with torch.no_grad():
        head.placeholders["image"].add_(1.0)
    moved = predict(bundle, data, batch_size=4)
    assert not torch.allclose(moved[no_image], base[no_image])
    torch.testing.assert_close(moved[~no_image], base[~no_image], rtol=0, atol=0)


def test_batches_without_a_modality_run_and_skip_that_tower(cfg):
    bundle = build_model(cfg.model, LABELS)
    d = random_batch(8)
    data = Encoded(d.labels, d.inputs, {"image": torch.zeros(8, dtype=torch.bool)})
    cnn = {n: p.detach().clone() for n, p in bundle.model.named_parameters()
           if "towers.image" in n and p.requires_grad}
    assert cnn
    train_local(bundle, data, train_options(epochs=1, batch_size=4, lr=1e-2))
    for name, p in bundle.model.named_parameters():
        if name in cnn:  # no row had an image: the image tower never trained
            torch.testing.assert_close(p.detach(), cnn[name], rtol=0, atol=0)
    assert predict(bundle, data).isfinite().all()


def test_placeholders_train_travel_and_reload_exactly(cfg, tmp_path):
    bundle = build_model(cfg.model, LABELS)
    data = _masked(8)
    (head,) = _heads(bundle.model)
    placeholders = head.placeholders
    assert all(p.requires_grad and not p.any() for p in placeholders.values())  # zeros at init
    train_local(bundle, data, train_options(epochs=3, batch_size=4, lr=1e-2))
    assert all(p.any() for p in placeholders.values())  # they learned
    state = adapter_state(bundle.model)
    keys = [k for k in state if "placeholders." in k]
    assert sorted(k.rsplit(".", 1)[-1] for k in keys) == ["image", "text"]
    torch.testing.assert_close(state[next(k for k in keys if k.endswith("text"))],
                               placeholders["text"].detach())
    expected = predict(bundle, data)
    save_adapter(bundle, tmp_path / "adapter")
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as f:
        assert sum("placeholders." in k for k in f.keys()) == 2
    backbone, _ = build_backbone(cfg.model, len(LABELS))
    bundle.model = PeftModel.from_pretrained(backbone, str(tmp_path / "adapter"))
    torch.testing.assert_close(predict(bundle, data), expected, rtol=0, atol=0)
