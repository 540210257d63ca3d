"""The fusion choices: each trains, travels and reloads exactly, and ignores what is missing."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from common.config import ConfigError, load_config
from common.encoded import Encoded
from common.model import build_backbone, build_model, save_adapter
from common.train import predict, train_local
from tests.conftest import LABELS, random_batch, tiny_overrides, train_options

FUSIONS = ["concat", "gated", "late"]


def _cfg(tiny_text_dir, fusion: str):
    return load_config(tiny_overrides(tiny_text_dir) + [f"model.fusion={fusion}",
                                                        "model.projection_dim=16"])


def _masked(data: Encoded, image: bool, text: bool) -> Encoded:
    n = len(data)
    return Encoded(data.labels, data.inputs, {"image": torch.full((n,), image),
                                              "text": torch.full((n,), text)})


@pytest.mark.parametrize("fusion", FUSIONS)
def test_each_fusion_trains_reloads_exactly_and_ignores_masked_content(tiny_text_dir, fusion,
                                                                       tmp_path):
    cfg = _cfg(tiny_text_dir, fusion)
    bundle = build_model(cfg.model, LABELS)
    data = random_batch(16)
    data.has_image[::3] = False
    train_local(bundle, data, train_options(epochs=2, batch_size=8, lr=1e-2))
    expected = predict(bundle, data)
    save_adapter(bundle, tmp_path / "adapter")
    backbone, _ = build_backbone(cfg.model, len(LABELS))
    reloaded = PeftModel.from_pretrained(backbone, str(tmp_path / "adapter"))
    torch.testing.assert_close(predict(type(bundle)(reloaded, LABELS, cfg.model), data), expected,
                               rtol=0, atol=0)
    noisy = data.pixel_values.clone()
    noisy[~data.has_image] = torch.randn_like(noisy[~data.has_image]) * 10
    changed = Encoded(data.labels, {**data.inputs, "image": noisy}, data.present)
    torch.testing.assert_close(predict(bundle, changed), expected, rtol=0, atol=0)


def test_late_fusion_averages_the_per_modality_logits(tiny_text_dir):
    bundle = build_model(_cfg(tiny_text_dir, "late").model, LABELS)
    data = random_batch(6)
    both = predict(bundle, data)
    text_only = predict(bundle, _masked(data, image=False, text=True))
    image_only = predict(bundle, _masked(data, image=True, text=False))
    torch.testing.assert_close(both, (text_only + image_only) / 2, rtol=1e-5, atol=1e-6)


def test_gated_fusion_needs_projections(tiny_text_dir):
    with pytest.raises(ConfigError, match="^model.projection_dim"):
        load_config(tiny_overrides(tiny_text_dir) + ["model.fusion=gated",
                                                    "model.projection_dim=0"])


def test_feature_norm_makes_the_head_blind_to_a_towers_feature_scale():
    """`model.feature_norm`: a tower's features x100 leave the logits as they were (each tower
    weighs alike in a per-sample clipped gradient); without it they change. No tensor is added,
    so adapters saved either way keep the same keys."""
    from common.model import FusionHead
    dims = {"text": 12, "image": 40}
    feats = {"text": torch.randn(5, 12), "image": torch.randn(5, 40) * 30 + 2}
    masks = {m: torch.ones(5, dtype=torch.bool) for m in dims}
    louder = {**feats, "image": feats["image"] * 100}
    for norm in (True, False):
        torch.manual_seed(0)
        head = FusionHead(dims, "concat", 8, 16, 6, feature_norm=norm).eval()
        same = torch.allclose(head(feats, masks), head(louder, masks), atol=1e-5)
        assert same is norm
        keys = set(head.state_dict())
    torch.manual_seed(0)
    assert set(FusionHead(dims, "concat", 8, 16, 6, feature_norm=True).state_dict()) == keys
