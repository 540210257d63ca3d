r"""A pretrained Whisper encoder as an audio tower: log-mel (B, M, T) -> pooled features (B, D).

    log-mel --conv1, conv2 (stride 2)--> + positions[:T/2] --> layers[:k] | layers[k:] -> LN -> mean
            \_______________________ stem (frozen) _________________/  \_______ head _______/

`k` is the first layer with a LoRA target, so `stem` output can be computed once per row and
cached while LoRA trains `head`. Clips shorter than 30 s are encoded as they are: the positional
embedding is sliced to the clip's frame count (transformers' `WhisperEncoder.forward` only takes
3000 frames, so the tower calls its submodules). `build_audio_tower` also wraps HF wav2vec2 and
HuBERT checkpoints (`common/towers/wav2vec2.py`) in the same interface.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, WhisperFeatureExtractor, WhisperModel
from transformers.feature_extraction_sequence_utils import SequenceFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from common.towers.packaged import EMBEDDED_WHISPER, converted_folder
from common.towers.pooling import additive_mask, first_layer, masked_mean, resolve_targets
from common.towers.wav2vec2 import (SSL_MODEL_TYPES, SSLAudioTower, build_ssl_tower,
                                     ssl_feature_extractor)

DEFAULT_TARGETS = ("q_proj", "v_proj")  # the self-attention projections LoRA goes on


class WhisperAudioTower(nn.Module):
    """A frozen Whisper encoder, split at its first LoRA layer into a cacheable stem and a head."""

    def __init__(self, encoder: WhisperEncoder, feature_extractor: WhisperFeatureExtractor,
                 lora_targets: Sequence[str] = DEFAULT_TARGETS):
        super().__init__()
        self.encoder = encoder.requires_grad_(False)  # PEFT's LoRA is the only trainable part
        self.feature_extractor = feature_extractor
        self.out_dim: int = encoder.config.d_model
        if lora_targets:  # names relative to the tower
            self.lora_targets = resolve_targets(self, lora_targets)
            self.split = first_layer(self.lora_targets, "encoder.layers")
        else:  # a frozen tower: every layer is stem (cached), the head only norms and pools
            self.lora_targets, self.split = [], len(encoder.layers)
        self.stride = encoder.conv1.stride[0] * encoder.conv2.stride[0]  # mel frames per frame

    def frame_mask(self, feature_mask: torch.Tensor | None, frames: int) -> torch.Tensor | None:
        """Map a mel-frame mask (B, T) to the encoder-frame mask (B, frames)."""
        return None if feature_mask is None else feature_mask[:, ::self.stride][:, :frames].bool()

    def _layers(self, hidden: torch.Tensor, feature_mask: torch.Tensor | None,
                layers: Sequence[nn.Module]) -> torch.Tensor:
        mask = additive_mask(self.frame_mask(feature_mask, hidden.shape[1]), hidden.dtype)
        for layer in layers:
            hidden = layer(hidden, mask)  # (B, T', D)
        return hidden

    def stem(self, input_features: torch.Tensor,
             feature_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run the frozen front-end: log-mel (B, M, T) -> the input of layer k (B, ceil(T/2), D)."""
        enc = self.encoder
        hidden = nn.functional.gelu(enc.conv1(input_features))  # (B, D, T)
        hidden = nn.functional.gelu(enc.conv2(hidden)).transpose(1, 2)  # (B, T', D)
        frames, max_frames = hidden.shape[1], enc.embed_positions.num_embeddings
        if frames > max_frames:
            raise ValueError(f"{input_features.shape[-1]} mel frames is longer than Whisper's "
                             f"{max_frames * self.stride} (30 s); crop the clip")
        hidden = hidden + enc.embed_positions.weight[:frames]  # (B, T', D)
        return self._layers(hidden, feature_mask, enc.layers[:self.split])

    def top(self, hidden: torch.Tensor, feature_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run layers k.. and the final layer norm: (B, T', D) -> last hidden state (B, T', D)."""
        return self.encoder.layer_norm(
            self._layers(hidden, feature_mask, self.encoder.layers[self.split:]))

    def head(self, hidden: torch.Tensor, feature_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Map stem output (B, T', D) to pooled features (B, D), the mean over real frames."""
        return masked_mean(self.top(hidden, feature_mask),
                           self.frame_mask(feature_mask, hidden.shape[1]))

    def encode(self, input_features: torch.Tensor,
               feature_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Return the encoder's last hidden state (B, ceil(T/2), D) of log-mel (B, M, T)."""
        return self.top(self.stem(input_features, feature_mask), feature_mask)

    def forward(self, input_features: torch.Tensor,
                feature_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Map log-mel (B, M, T) and its real-frame mask (B, T) to pooled features (B, D)."""
        return self.head(self.stem(input_features, feature_mask), feature_mask)


def _whisper_encoder(path: str) -> WhisperEncoder:
    """Load the encoder of a Whisper folder/id: encoder-only (our conversions) or a full model."""
    config = AutoConfig.from_pretrained(path)
    if "WhisperEncoder" in (config.architectures or ()):
        model, info = WhisperEncoder.from_pretrained(path, dtype=torch.float32,
                                                     output_loading_info=True)
    else:
        model, info = WhisperModel.from_pretrained(path, dtype=torch.float32,
                                                   output_loading_info=True)
        info = {"missing_keys": [k for k in info["missing_keys"] if k.startswith("encoder.")]}
        model = model.encoder
    if info["missing_keys"]:
        raise ValueError(f"{path}: checkpoint lacks encoder weights {info['missing_keys'][:5]}")
    return model


def _feature_extractor(path: str, n_mels: int) -> WhisperFeatureExtractor:
    """Load the folder's WhisperFeatureExtractor, else make the default one with these n_mels."""
    try:
        extractor = WhisperFeatureExtractor.from_pretrained(path)
    except OSError:  # no preprocessor_config.json
        extractor = WhisperFeatureExtractor(feature_size=n_mels)
    if extractor.feature_size != n_mels:
        raise ValueError(f"{path}: feature extractor has {extractor.feature_size} mel bins, "
                         f"the encoder {n_mels}")
    return extractor


@lru_cache(maxsize=8)
def audio_feature_extractor(name_or_path: str | Path) -> SequenceFeatureExtractor:
    """The feature extractor the named audio tower takes its input from, without its weights."""
    path = str(converted_folder(name_or_path) if name_or_path in EMBEDDED_WHISPER
               else name_or_path)
    config = AutoConfig.from_pretrained(path)
    if config.model_type == "whisper":
        return _feature_extractor(path, config.num_mel_bins)
    if config.model_type in SSL_MODEL_TYPES:
        return ssl_feature_extractor(path)
    raise ValueError(f"{name_or_path}: model_type {config.model_type!r} is not an audio tower "
                     f"(whisper, {', '.join(SSL_MODEL_TYPES)})")


def top_half_targets(num_layers: int) -> list[str]:
    """Whisper's default LoRA targets: q/v of the top half of the layers (the rest is stem,
    computed once per row and cached)."""
    return [f"layers.{i}.self_attn.{p}" for i in range(num_layers // 2, num_layers)
            for p in DEFAULT_TARGETS]


def build_audio_tower(name_or_path: str | Path, lora_targets: Sequence[str] | None = None
                      ) -> WhisperAudioTower | SSLAudioTower:
    """Build an audio tower: `embedded:whisper-*`, or an HF Whisper/wav2vec2/HuBERT id/folder.

    `lora_targets` None: the tower's defaults (Whisper: `top_half_targets`; wav2vec2/HuBERT:
    q/v of every layer); []: a frozen tower.
    """
    path = str(converted_folder(name_or_path) if name_or_path in EMBEDDED_WHISPER
               else name_or_path)
    model_type = AutoConfig.from_pretrained(path).model_type
    if model_type == "whisper":
        encoder = _whisper_encoder(path)
        targets = top_half_targets(len(encoder.layers)) if lora_targets is None else lora_targets
        return WhisperAudioTower(encoder, _feature_extractor(path, encoder.config.num_mel_bins),
                                 tuple(targets))
    if model_type in SSL_MODEL_TYPES:
        return build_ssl_tower(path, DEFAULT_TARGETS if lora_targets is None
                               else tuple(lora_targets))
    raise ValueError(f"{name_or_path}: model_type {model_type!r} is not an audio tower "
                     f"(whisper, {', '.join(SSL_MODEL_TYPES)})")
