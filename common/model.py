"""The multimodal classifier and its LoRA adapter (PEFT).

    text  --tokenizer--> text tower  (stem | head, LoRA) --> (B, Dt) --\
    image --------------> image tower (stem | head, LoRA) --> (B, Di) ---> fusion head -> (B, C)
    audio --log-mel-----> audio tower (stem | head, LoRA) --> (B, Da) --/   concat | gated | late

Every tower (common/towers/) is `forward = head(stem(.))`: the stem holds the frozen layers
below the tower's first LoRA layer, so its output can be computed once per row and cached
(common/train.py passes it as `<modality>_stem`). PEFT injects LoRA into the towers' target
layers; the fusion head (per-tower projections, missing-modality placeholders, gates or
per-modality classifiers) and a non-pretrained tower (the small CNN) are `modules_to_save`:
trained in full, saved/sent with the adapter. All else is frozen and stays.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers.utils import logging as hf_logging

from common.adapter import apply_base_residuals
from common.schema import ModelConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded at run time by default
hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()  # one bar per worker process per load is noise in run logs

LABELS_FILE = "labels.json"
RESIDUALS_FILE = "base_residuals.safetensors"  # exact LoRA aggregation only
BACKBONE_SEED = 1234  # the from-scratch CNN and the head start identical on every site
TOWER_ORDER = ("text", "image", "audio")  # the fusion head's order of tower features
RAW_INPUTS = {"text": ("input_ids", "attention_mask"), "image": ("pixel_values",),
              "audio": ("input_features", "feature_mask")}  # tower inputs: main, then masks
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class SmallCNN(nn.Module):
    """A small convolutional image tower built from config, trained in full (no stem).

    GroupNorm keeps no batch statistics (nothing site-specific to average); global max pooling
    keeps local evidence such as corners, which mean pooling washes out (it learned the demo's
    shapes several times slower).
    """

    lora_targets: list[str] = []
    image_mean, image_std = IMAGENET_STATS

    def __init__(self, channels: tuple[int, ...]):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for c_out in channels:
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(4, c_out), nn.ReLU(),
                       nn.MaxPool2d(2)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.out_dim = c_in

    def stem(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return pixel_values  # every layer trains: nothing to cache

    def head(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.features(pixel_values).amax(dim=(2, 3))  # (B, C, H, W) -> (B, C)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(pixel_values)


def build_tower(modality: str, cfg: ModelConfig) -> nn.Module:
    """The configured tower of one modality (pretrained ones frozen; PEFT adds LoRA later)."""
    if modality == "text":
        from common.towers.text import TextTower

        return TextTower(cfg.text.name_or_path, cfg.text.target_modules, cfg.text.max_length,
                         cfg.text.lora_layers)
    if modality == "image":
        if cfg.vision.name_or_path is None:
            return SmallCNN(cfg.vision.channels)
        from common.towers.image import build_image_tower

        return build_image_tower(cfg.vision.name_or_path, _targets(cfg.vision.target_modules))
    from common.towers.whisper import build_audio_tower

    return build_audio_tower(cfg.audio.name_or_path, _targets(cfg.audio.target_modules))


def _targets(configured: tuple[str, ...] | None) -> list[str] | None:
    return None if configured is None else list(configured)


def _mlp(in_dim: int, hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden), nn.GELU(),
                         nn.Dropout(0.1), nn.Linear(hidden, out))


class UnitNorm(nn.Module):
    """LayerNorm without parameters, scaled by 1/sqrt(D): every row's features get norm 1."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.scale = dim ** -0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x) * self.scale


class FusionHead(nn.Module):
    """Fuse tower features (B, D_m) into logits (B, C); rows may miss some modalities.

    concat  a learned placeholder stands in for a missing modality's features, the features
            are concatenated, and a presence flag per tower joins at the first Linear
    gated   per-row softmax gates over the modalities a row has weigh their projections
            (a Gated Multimodal Unit, Arevalo et al. 2017, for any number of modalities)
    late    one classifier per modality; logits averaged over the modalities a row has
    `projection_dim > 0` first maps every tower's features to that width (smaller uploads).
    `feature_norm` first scales every tower's features to unit norm (a parameterless LayerNorm
    / sqrt(D)): under DP's per-sample clipping each tower's gradients then weigh alike, where
    raw Lite0 features (norm ~35) would crowd out MiniLM's (~5) in the clipped budget.
    """

    def __init__(self, dims: dict[str, int], fusion: str, projection_dim: int,
                 fusion_dim: int, num_labels: int, feature_norm: bool = False):
        super().__init__()
        self.order = [m for m in TOWER_ORDER if m in dims]
        self.fusion = fusion
        self.feature_norms = nn.ModuleDict({m: UnitNorm(dims[m]) for m in self.order}
                                           if feature_norm else {})
        self.projections = nn.ModuleDict({m: nn.Linear(dims[m], projection_dim)
                                          for m in self.order} if projection_dim else {})
        width = {m: projection_dim or dims[m] for m in self.order}
        if fusion == "concat":
            self.placeholders = nn.ParameterDict({m: nn.Parameter(torch.zeros(width[m]))
                                                  for m in self.order})
            in_dim = sum(width.values())
            self.mlp = _mlp(in_dim, fusion_dim, num_labels)
            self.presence = nn.Linear(len(self.order), fusion_dim, bias=False)
            nn.init.zeros_(self.presence.weight)  # all present: starts as a flagless head
        elif fusion == "gated":
            self.gates = nn.Linear(sum(width.values()), len(self.order))
            self.mlp = _mlp(projection_dim, fusion_dim, num_labels)
        else:  # late
            self.classifiers = nn.ModuleDict({m: _mlp(width[m], fusion_dim, num_labels)
                                              for m in self.order})

    def forward(self, features: dict[str, torch.Tensor | None],
                masks: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits (B, C) from features (B, D_m; None: no row has m) and presence masks (B,)."""
        feats, present = {}, {}
        for m in self.order:
            present[m] = masks[m].unsqueeze(-1)  # (B, 1)
            f = features[m]
            if f is not None and m in self.feature_norms:
                f = self.feature_norms[m](f)  # (B, D), unit norm
            if f is not None and m in self.projections:
                f = self.projections[m](f)  # (B, P)
            feats[m] = f
        if self.fusion == "late":
            logits = [self.classifiers[m](f) * present[m].to(f.dtype)
                      for m, f in feats.items() if f is not None]
            count = torch.cat([present[m] for m in self.order], -1).sum(-1, keepdim=True)
            return torch.stack(logits).sum(0) / count.clamp(min=1).to(logits[0].dtype)
        if self.fusion == "gated":
            ref = next(f for f in feats.values() if f is not None)
            filled = {m: ref.new_zeros(ref.shape) if f is None else f for m, f in feats.items()}
            scores = self.gates(torch.cat([filled[m] for m in self.order], -1))  # (B, M)
            mask = torch.cat([present[m] for m in self.order], -1)  # (B, M)
            weights = scores.masked_fill(~mask, float("-inf")).softmax(-1)  # (B, M)
            fused = sum(weights[:, i:i + 1] * filled[m] for i, m in enumerate(self.order))
            return self.mlp(fused)  # (B, C)
        parts = []
        for m in self.order:
            fill = self.placeholders[m].expand(masks[m].shape[0], -1)  # (B, D)
            f = feats[m]
            parts.append(fill if f is None else torch.where(present[m], f, fill.to(f.dtype)))
        hidden = self.mlp[1](self.mlp[0](torch.cat(parts, dim=-1)))  # (B, F)
        flags = torch.cat([present[m] for m in self.order], dim=-1).to(hidden.dtype)
        return self.mlp[2:](hidden + self.presence(flags))  # (B, C)


def _present_rows(fn, mask: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor | None:
    """Run `fn` on the rows where `mask` holds only (zeros elsewhere; None if no row does)."""
    if bool(mask.all()):
        return fn(*inputs)  # (B, D)
    idx = mask.nonzero().squeeze(-1)  # (P,)
    if idx.numel() == 0:
        return None
    present = fn(*(x[idx] for x in inputs))  # (P, D)
    return present.new_zeros((mask.shape[0], present.shape[-1])).index_copy(0, idx, present)


class MultimodalClassifier(nn.Module):
    """Towers (any non-empty subset of text, image, audio) + fusion head.

    Missing modalities are explicit: `<modality>_mask` (B,) booleans (absent: all present). A
    tower runs only on the rows that have its modality, so absent content never reaches a
    tower nor the logits. A tower's input is its raw input or, when given, its cached stem
    output `<modality>_stem` (its masks still come as raw inputs); a modality that no row of
    the batch holds may come as its mask alone.
    """

    def __init__(self, towers: dict[str, nn.Module], head: FusionHead):
        super().__init__()
        self.towers = nn.ModuleDict(towers)
        self.fusion_head = head

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        given = [inputs.get(f"{m}_stem", inputs.get(RAW_INPUTS[m][0])) for m in self.towers]
        ref = next(x for x in given if x is not None)
        rows, device = ref.shape[0], ref.device
        features, masks = {}, {}
        for m, tower in self.towers.items():
            mask = inputs.get(f"{m}_mask")
            masks[m] = (torch.ones(rows, dtype=torch.bool, device=device) if mask is None
                        else mask.to(device, torch.bool))
            main, *extra = RAW_INPUTS[m]
            cached = f"{m}_stem" in inputs
            if not cached and main not in inputs:  # the data holds no such modality
                if mask is None or bool(masks[m].any()):
                    raise ValueError(f"rows marked with {m} but no {m} input given")
                features[m] = None
                continue
            first = inputs[f"{m}_stem"] if cached else inputs[main]

            def run(x, *rest, tower=tower, cached=cached):
                return tower.head(x if cached else tower.stem(x, *rest), *rest)
            features[m] = _present_rows(run, masks[m], first, *(inputs[k] for k in extra))
        return self.fusion_head(features, masks)


@dataclass
class Bundle:
    """What a site or the server holds: the PEFT-wrapped model, its config and label names."""

    model: PeftModel | MultimodalClassifier  # plain module only for the CNN-only ablation
    label_names: list[str]
    cfg: ModelConfig

    @property
    def classifier(self) -> MultimodalClassifier:
        """The multimodal classifier inside the PEFT wrapper."""
        model = self.model
        return model.base_model.model if isinstance(model, PeftModel) else model  # type: ignore

    @property
    def towers(self) -> nn.ModuleDict:
        return self.classifier.towers

    @property
    def image_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The normalisation the image tower expects (mean, std)."""
        tower = self.towers["image"] if "image" in self.towers else None
        return (tuple(tower.image_mean), tuple(tower.image_std)) if tower else IMAGENET_STATS


def build_backbone(cfg: ModelConfig, num_labels: int) -> tuple[MultimodalClassifier, LoraConfig]:
    """Build the frozen towers and the fusion head (no adapters yet) and their LoRA settings."""
    if cfg.modalities is None:
        raise ValueError("model.modalities is unresolved; common.task.resolve_data fills it "
                         "from the training manifest's columns")
    torch.manual_seed(BACKBONE_SEED)
    towers = {m: build_tower(m, cfg) for m in TOWER_ORDER if m in cfg.modalities}
    for tower in towers.values():
        tower.requires_grad_(False)
    head = FusionHead({m: t.out_dim for m, t in towers.items()}, cfg.fusion, cfg.projection_dim,
                      cfg.fusion_dim, num_labels, cfg.feature_norm)
    targets = [f"towers.{m}.{name}" for m, t in towers.items() for name in t.lora_targets]
    modules_to_save = ["fusion_head"] + [f"towers.{m}" for m, t in towers.items()
                                  if isinstance(t, SmallCNN)]
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=targets or None, modules_to_save=modules_to_save,
                      bias="none")
    return MultimodalClassifier(towers, head), lora


def assemble(cfg: ModelConfig, label_names: list[str], adapter_dir: str | Path | None = None
             ) -> Bundle:
    """Build the backbone and put LoRA on it with PEFT: a fresh adapter, or the one saved in
    `adapter_dir` (`PeftModel.from_pretrained`, plus its exact-aggregation residuals)."""
    backbone, lora = build_backbone(cfg, len(label_names))
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(backbone, str(adapter_dir))
        residuals = Path(adapter_dir) / RESIDUALS_FILE
        if residuals.is_file():
            from safetensors.numpy import load_file

            apply_base_residuals(model, load_file(residuals))
    elif lora.target_modules:
        model = get_peft_model(backbone, lora)
    else:  # no tower takes LoRA (a CNN-only or frozen-tower ablation): head (+ CNN) train
        model = backbone
        for tower in backbone.towers.values():
            tower.requires_grad_(isinstance(tower, SmallCNN))
        backbone.fusion_head.requires_grad_(True)
    return Bundle(model.eval(), list(label_names), cfg)  # type: ignore[arg-type]


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
