r"""HF wav2vec2 / HuBERT as an audio tower: 16 kHz waveform (B, S) -> pooled features (B, D).

    waveform --CNN feature encoder--> feature projection | transformer encoder --> mean
             \__________________ stem (frozen) _________/  \______ head ________/

LoRA goes on the transformer's attention q/v projections; the stem stops at the CNN (the
transformer's convolutional positional embedding runs in `head`). SpecAugment-style masking,
which `Wav2Vec2Model.forward` applies in training, is left out: the stem stays deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import AutoFeatureExtractor, AutoModel, Wav2Vec2FeatureExtractor

from common.towers.pooling import first_layer, masked_mean, resolve_targets

SSL_MODEL_TYPES = ("wav2vec2", "hubert")


class SSLAudioTower(nn.Module):
    """A frozen wav2vec2/HuBERT model, split after its CNN front-end."""

    def __init__(self, model: nn.Module, feature_extractor: Wav2Vec2FeatureExtractor,
                 lora_targets: Sequence[str]):
        super().__init__()
        if getattr(model.config, "add_adapter", False):
            raise ValueError("wav2vec2 checkpoints with an output adapter are not supported")
        self.model = model.requires_grad_(False)  # PEFT's LoRA is the only trainable part
        self.feature_extractor = feature_extractor
        self.out_dim: int = model.config.hidden_size
        self.lora_targets = resolve_targets(self, lora_targets) if lora_targets else []  # frozen
        if self.lora_targets:
            first_layer(self.lora_targets, "model.encoder.layers")  # raises on one in the stem

    def frame_mask(self, feature_mask: torch.Tensor | None, frames: int) -> torch.Tensor | None:
        """Map a sample mask (B, S) to the frame mask (B, frames), as the model computes it."""
        if feature_mask is None:
            return None
        return self.model._get_feature_vector_attention_mask(frames, feature_mask.long()).bool()

    def stem(self, input_features: torch.Tensor,
             feature_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run the frozen CNN and projection: waveform (B, S) -> hidden states (B, T', D)."""
        feats = self.model.feature_extractor(input_features).transpose(1, 2)  # (B, T', C)
        out = self.model.feature_projection(feats)
        return out[0] if isinstance(out, tuple) else out  # wav2vec2 also returns normed feats

    def head(self, hidden: torch.Tensor, feature_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Map stem output (B, T', D) to pooled features (B, D), the mean over real frames."""
        mask = self.frame_mask(feature_mask, hidden.shape[1])  # (B, T') | None
        if mask is not None:
            hidden = hidden * mask.unsqueeze(-1).to(hidden.dtype)  # a copy: the encoder edits it
        out = self.model.encoder(hidden, attention_mask=mask).last_hidden_state  # (B, T', D)
        return masked_mean(out, mask)

    def forward(self, input_features: torch.Tensor,
                feature_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Map a waveform (B, S) and its real-sample mask (B, S) to pooled features (B, D)."""
        return self.head(self.stem(input_features, feature_mask), feature_mask)


def ssl_feature_extractor(path: str) -> Wav2Vec2FeatureExtractor:
    """The folder's feature extractor, else the default wav2vec2 one."""
    try:
        return AutoFeatureExtractor.from_pretrained(path)
    except (OSError, ValueError):  # no preprocessor_config.json
        return Wav2Vec2FeatureExtractor(return_attention_mask=True)


def build_ssl_tower(path: str, lora_targets: Sequence[str]) -> SSLAudioTower:
    """Load a wav2vec2/HuBERT id or folder (and its feature extractor, else the default)."""
    model = AutoModel.from_pretrained(path, dtype=torch.float32)
    return SSLAudioTower(model, ssl_feature_extractor(path), lora_targets)
