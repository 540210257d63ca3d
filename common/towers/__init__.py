"""Pretrained towers with one interface: `forward = head(stem(.))`, `out_dim`, `lora_targets`."""

from common.towers.image import (EfficientNetTower, HFVisionTower, TimmTower, Tower,
                                 build_image_tower)

__all__ = ["EfficientNetTower", "HFVisionTower", "TimmTower", "Tower", "build_image_tower"]
