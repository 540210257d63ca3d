"""Frame masks and pooling shared by the audio towers."""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn


def masked_mean(hidden: torch.Tensor, frame_mask: torch.Tensor | None) -> torch.Tensor:
    """Average `hidden` (B, T, D) over the frames where `frame_mask` (B, T) holds -> (B, D)."""
    if frame_mask is None:
        return hidden.mean(dim=1)
    weights = frame_mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def additive_mask(frame_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Turn a key-padding mask (B, T) into an additive attention mask (B, 1, 1, T)."""
    if frame_mask is None:
        return None
    blocked = ~frame_mask.to(torch.bool)[:, None, None, :]  # (B, 1, 1, T)
    return torch.zeros(blocked.shape, dtype=dtype, device=frame_mask.device).masked_fill(
        blocked, torch.finfo(dtype).min)


def resolve_targets(module: nn.Module, wanted: Sequence[str]) -> list[str]:
    """List (in module order) the Linear layers whose name is, or ends with, one of `wanted`."""
    names = [name for name, m in module.named_modules() if isinstance(m, nn.Linear)
             and any(name == w or name.endswith("." + w) for w in wanted)]
    if not names:
        raise ValueError(f"no Linear layer named any of {list(wanted)}; "
                         f"set the audio tower's target_modules")
    return names


def first_layer(targets: Sequence[str], layers_prefix: str) -> int:
    """Return the lowest `layers_prefix.<i>` index among `targets`; raise if one is outside."""
    indices = []
    for name in targets:
        found = re.match(rf"{re.escape(layers_prefix)}\.(\d+)\.", name)
        if found is None:
            raise ValueError(f"LoRA target {name} is not inside {layers_prefix}.*; "
                             "only transformer layers take LoRA in an audio tower")
        indices.append(int(found.group(1)))
    return min(indices)
