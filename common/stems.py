"""Cached frozen activations: each tower's stem output, computed once per site and row.

A tower's stem (its frozen layers below the first LoRA layer) gives the same output every epoch
and every round. `cached_stems(bundle, data)` computes it once, in eval mode and without
gradients, and keeps it on the `Encoded` rows (in memory; memory-mapped on disk above
`FEDMM_STEM_CACHE_MB`), so training and evaluation then run only the towers' heads. The cache
belongs to the rows it was computed from (a new split, image size or skew is a new `Encoded`)
and to the tower that computed it (`stem_key`: its own config; another backbone or split point
recomputes, another LoRA rank, head or set of other towers does not).
A tower whose stem holds no frozen block (LoRA from the first layer on, or the CNN) is not
cached: its stem is cheap or larger than its input.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from common.encoded import Encoded

MEMORY_LIMIT_MB = float(os.environ.get("FEDMM_STEM_CACHE_MB", "1024"))
BATCH = 64


def cacheable(tower: torch.nn.Module) -> bool:
    """Whether the tower's stem holds frozen blocks worth caching."""
    return bool(getattr(tower, "split", None))


def stem_key(bundle, modality: str) -> tuple:
    """What one tower's cached stem depends on: that tower's config."""
    c = bundle.cfg
    return modality, {"text": c.text, "image": c.vision, "audio": c.audio}[modality]


def _stem_inputs(bundle, data: Encoded, modality: str) -> list[torch.Tensor]:
    """The raw stem inputs of every row: the main one, then the mask the head also takes."""
    rows = data.inputs[modality]
    if modality == "image":
        return [rows]  # (N, 3, H, W)
    if modality == "audio":
        return [rows.features, rows.mask]  # (N, M, T), (N, T)
    tok = bundle.towers["text"].tokenize(list(rows))
    return [tok["input_ids"], tok["attention_mask"]]  # (N, T), (N, T)


def _store(chunks: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate stem chunks, in memory or (above the limit) in a memory-mapped file."""
    shape = (sum(c.shape[0] for c in chunks), *chunks[0].shape[1:])
    nbytes = int(np.prod(shape)) * 4
    if nbytes <= MEMORY_LIMIT_MB * 2**20:
        return torch.cat(chunks)
    folder = Path(os.environ.get("FEDMM_CACHE", Path.home() / ".cache" / "fedmm")) / "stems"
    folder.mkdir(parents=True, exist_ok=True)
    handle, path = tempfile.mkstemp(suffix=".npy", dir=folder)
    os.close(handle)
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
    os.unlink(path)  # the mapping lives on while the process holds it; nothing is left behind
    start = 0
    for c in chunks:
        array[start:start + c.shape[0]] = c.numpy()
        start += c.shape[0]
    return torch.from_numpy(array)


@torch.no_grad()
def cached_stems(bundle, data: Encoded, device: torch.device) -> dict[str, tuple]:
    """Per cacheable tower: (stem outputs (N, ...), the head's extra inputs (N, ...) or None)."""
    out = {}
    for modality, tower in bundle.towers.items():
        if not cacheable(tower) or modality not in data.inputs:
            continue
        key = stem_key(bundle, modality)
        if key not in data.stems:
            was_training = tower.training
            tower.eval()
            inputs = _stem_inputs(bundle, data, modality)
            chunks = [tower.stem(*(x[i:i + BATCH].to(device) for x in inputs)).float().cpu()
                      for i in range(0, len(data), BATCH)]
            tower.train(was_training)
            data.stems[key] = (_store(chunks), inputs[1] if len(inputs) > 1 else None)
        out[modality] = data.stems[key]
    return out
