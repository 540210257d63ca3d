"""Image towers: the packaged weights' name map, ImageNet predictions, stem/head split, LoRA."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from PIL import Image
from sklearn.datasets import load_sample_images
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, ImageNetInfo, create_transform
from torch import nn

from common.towers.image import EfficientNetTower, TimmTower, build_image_tower
from common.towers.efficientnet_lite import VARIANTS, load_packaged, rename_to_timm, timm_names

BUILDINGS = {"monastery", "palace", "bell cote", "church", "mosque", "stupa", "pagoda", "dome",
             "castle", "boathouse", "vault", "triumphal arch", "library", "planetarium"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small convs gain little from a second thread and stall badly when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Classifier(nn.Module):
    """A tower and a linear head, the shape of what the federated model wraps."""

    def __init__(self, tower: nn.Module, num_labels: int = 3):
        super().__init__()
        self.tower = tower
        self.fc = nn.Linear(tower.out_dim, num_labels)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.fc(self.tower(pixel_values))


def with_lora(tower: nn.Module, r: int = 8) -> nn.Module:
    config = LoraConfig(r=r, lora_alpha=2 * r, modules_to_save=["fc"],
                        target_modules=[f"tower.{n}" for n in tower.lora_targets])
    return get_peft_model(Classifier(tower), config)


@pytest.fixture(scope="module")
def lite0() -> EfficientNetTower:
    return EfficientNetTower("efficientnet-lite0")


@pytest.fixture(scope="module")
def photos(lite0) -> dict[str, torch.Tensor]:
    """scikit-learn's sample photos, preprocessed at 224 px with the tower's normalisation."""
    data = load_sample_images()
    images = {Path(f).stem: v for f, v in zip(data.filenames, data.images, strict=True)}
    transform = create_transform(input_size=224, interpolation="bicubic", crop_pct=0.875,
                                 mean=lite0.image_mean, std=lite0.image_std)
    return {k: transform(Image.fromarray(v)) for k, v in images.items()}  # (3, 224, 224) each


def imagenet_probs(tower: EfficientNetTower, variant: str, x: torch.Tensor) -> torch.Tensor:
    """Class probabilities (B, 1000): the tower's features through its packaged classifier."""
    weights = rename_to_timm(load_packaged(variant), timm.create_model(VARIANTS[variant][1]))
    with torch.no_grad():
        logits = F.linear(tower(x), weights["classifier.weight"], weights["classifier.bias"])
    return logits.softmax(-1)


def top5(probs: torch.Tensor) -> list[str]:
    """ImageNet class names (first synonym) of the five likeliest classes in `probs` (1000,)."""
    info = ImageNetInfo()
    return [info.index_to_description(int(i)).split(",")[0] for i in probs.topk(5).indices]


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


def test_embedded_weights_classify_sample_photos(lite0, photos):
    x = torch.stack([photos["china"], photos["flower"]])  # (2, 3, 224, 224)
    china, flower = (top5(p) for p in imagenet_probs(lite0, "efficientnet-lite0", x))
    assert BUILDINGS & set(china), china  # a temple among buildings
    assert flower[0] == "daisy", flower


@pytest.mark.parametrize("variant", ["efficientnet-lite1", "efficientnet-lite2"])
def test_larger_embedded_variants_see_the_building(photos, variant):
    # (both read flower.jpg's close-up as "honeycomb"; on other photos they match lite0)
    tower = build_image_tower(f"embedded:{variant}")
    assert isinstance(tower, EfficientNetTower) and tower.image_mean == (0.5, 0.5, 0.5)
    china = top5(imagenet_probs(tower, variant, photos["china"][None])[0])
    assert china[0] in BUILDINGS, china


def test_mean_std_half_beats_imagenet_statistics_on_the_flower(lite0, photos):
    info = ImageNetInfo()
    daisy = next(i for i in range(1000) if info.index_to_description(i) == "daisy")
    raw = photos["flower"] * torch.tensor(lite0.image_std)[:, None, None] + 0.5  # back to [0, 1]
    imagenet = (raw - torch.tensor(IMAGENET_DEFAULT_MEAN)[:, None, None]) / torch.tensor(
        IMAGENET_DEFAULT_STD)[:, None, None]
    assert lite0.image_mean == lite0.image_std == (0.5, 0.5, 0.5)
    x = torch.stack([photos["flower"], imagenet])  # (2, 3, 224, 224)
    probs = imagenet_probs(lite0, "efficientnet-lite0", x)[:, daisy]
    assert probs[0] > 2 * probs[1]


# --- the stem/head split -----------------------------------------------------------------------

def test_default_split_and_targets(lite0):
    expected = [f"encoder.blocks.{s}.{i}.{c}" for s in (5, 6)
                for i in range(len(lite0.encoder.blocks[s])) for c in ("conv_pw", "conv_pwl")]
    expected.append("encoder.conv_head")
    assert lite0.lora_targets == expected
    assert lite0.split == 5 and lite0.out_dim == 1280
    assert lite0.stem(torch.zeros(1, 3, 96, 96)).shape == (1, 112, 6, 6)  # stage 4 out, stride 16


@pytest.mark.parametrize("targets, split", [(None, 5), (["blocks.3.1.conv_pwl", "conv_head"], 3),
                                            (["conv_head"], 7), (["conv_stem"], None)])
def test_head_of_stem_is_forward_and_timms_own_features(lite0, targets, split):
    tower = EfficientNetTower("efficientnet-lite0", targets) if targets else lite0
    assert tower.split == split
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        reference = tower.encoder.forward_head(tower.encoder.forward_features(x), pre_logits=True)
        torch.testing.assert_close(tower.head(tower.stem(x)), tower(x), rtol=0, atol=1e-6)
        torch.testing.assert_close(tower(x), reference, rtol=0, atol=1e-6)


def test_batchnorm_statistics_survive_a_training_step():
    model = with_lora(EfficientNetTower("efficientnet-lite0"))
    model.train()
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}
    lora = {k: v.clone() for k, v in model.state_dict().items() if "lora_B" in k}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = F.cross_entropy(model(torch.randn(4, 3, 64, 64)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    optimizer.step()
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in stats.items()) and len(stats) > 90
    assert any(not torch.equal(v, after[k]) for k, v in lora.items())  # the step did train
    assert any(m.training for m in model.modules()) and not any(
        m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))


# --- PEFT LoRA ---------------------------------------------------------------------------------

def test_peft_lora_lands_on_the_default_targets_with_the_expected_count():
    tower = EfficientNetTower("efficientnet-lite0")
    r = 8
    convs = [dict(tower.named_modules())[n] for n in tower.lora_targets]
    # lora_A: (r, in, kh, kw), lora_B: (out, r, 1, 1)
    expected = sum(r * (c.in_channels * c.kernel_size[0] * c.kernel_size[1] + c.out_channels)
                   for c in convs)
    model = get_peft_model(Classifier(tower), LoraConfig(r=r, target_modules=[
        f"tower.{n}" for n in tower.lora_targets]))
    wrapped = {n.removeprefix("base_model.model.tower.") for n, m in model.named_modules()
               if isinstance(m, LoraLayer)}
    assert wrapped == set(tower.lora_targets)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected


# --- other timm models and HF models -----------------------------------------------------------

@pytest.fixture(scope="module")
def timm_checkpoint(tmp_path_factory):
    """A tiny timm EfficientNet with random weights, saved as a local checkpoint file."""
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet").eval()
    path = tmp_path_factory.mktemp("timm") / "test_efficientnet.pth"
    torch.save(model.state_dict(), path)
    return model, path


def test_timm_name_with_a_local_checkpoint(timm_checkpoint):
    model, path = timm_checkpoint
    tower = build_image_tower("timm/test_efficientnet", weights_file=str(path))
    assert isinstance(tower, TimmTower) and tower.split == len(model.blocks) - 2
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        reference = model.forward_head(model.forward_features(x), pre_logits=True)
        torch.testing.assert_close(tower(x), reference)
        torch.testing.assert_close(tower.head(tower.stem(x)), tower(x), rtol=0, atol=1e-6)
    assert tower.out_dim == reference.shape[1]


def test_timm_local_dir_vit_splits_before_its_first_lora_block(tmp_path):
    from timm.models import save_for_hf

    torch.manual_seed(0)
    model = timm.create_model("test_vit").eval()
    save_for_hf(model, str(tmp_path))
    tower = build_image_tower(f"local-dir:{tmp_path}", ["blocks.1.attn.qkv"])
    assert tower.lora_targets == ["encoder.blocks.1.attn.qkv"] and tower.split == 1
    x = torch.randn(2, 3, *model.pretrained_cfg["input_size"][1:])
    with torch.no_grad():
        reference = model.forward_head(model.forward_features(x), pre_logits=True)
        torch.testing.assert_close(tower(x), reference)
        torch.testing.assert_close(tower.head(tower.stem(x)), tower(x), rtol=0, atol=1e-6)


def test_mobilenetv3_splits_before_its_last_two_stages():
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_small_050").eval()  # its conv_head runs after pooling
    tower = TimmTower(copy.deepcopy(model))
    assert tower.split == len(model.blocks) - 2 and "encoder.conv_head" in tower.lora_targets
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        reference = model.forward_head(model.forward_features(x), pre_logits=True)  # (2, 1024)
        torch.testing.assert_close(tower.head(tower.stem(x)), reference)
    assert tower.out_dim == reference.shape[1]


def test_unknown_embedded_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="efficientnet-lite0"):
        build_image_tower("embedded:efficientnet-lite9")


def test_timm_family_without_a_known_layout_has_no_split_and_needs_targets():
    with pytest.raises(ValueError, match="lora_targets"):
        TimmTower(timm.create_model("test_resnet"))
    tower = TimmTower(timm.create_model("test_resnet"), ["layer4.0.conv2"])
    x = torch.randn(1, 3, 32, 32)
    assert tower.split is None and torch.equal(tower.stem(x), x)
    with pytest.raises(ValueError, match="no_such_layer"):
        TimmTower(timm.create_model("test_resnet"), ["no_such_layer"])


def test_hf_vision_model_folder(tiny_vit_dir):
    from transformers import ViTModel

    tower = build_image_tower(str(tiny_vit_dir))
    projections = [n.rsplit(".", 1)[-1] for n in tower.lora_targets]
    assert len(projections) == 4 and set(projections) in ({"query", "value"}, {"q_proj", "v_proj"})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = ViTModel.from_pretrained(tiny_vit_dir)(pixel_values=x).pooler_output
        torch.testing.assert_close(tower(x), reference)
    model = with_lora(tower, r=4)
    wrapped = {n.removeprefix("base_model.model.tower.") for n, m in model.named_modules()
               if isinstance(m, LoraLayer)}
    assert wrapped == set(tower.lora_targets) and tower.out_dim == 32
