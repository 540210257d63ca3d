"""Encoded rows: each modality's model inputs as tensors, which rows hold it, and the rows'
labels; `common.data.encode` builds them from a manifest, `common.skews` masks modalities out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple, Sequence

import torch


class Clips(NamedTuple):
    """Audio rows as a tower takes them: features and which frames hold real audio."""

    features: torch.Tensor  # (N, M, T) float32 log-mel (Whisper), or (N, S) waveform
    mask: torch.Tensor  # (N, T) | (N, S) bool: real audio, not padding


def _num_rows(value: Any) -> int:
    return value.features.shape[0] if isinstance(value, Clips) else len(value)


def _take(value: Any, idx: torch.Tensor) -> Any:
    """The rows `idx` of one modality's inputs (a tensor, a list of strings or Clips)."""
    if isinstance(value, torch.Tensor):
        return value[idx]
    if isinstance(value, Clips):
        return Clips(*(v[idx] for v in value))
    return [value[i] for i in idx.tolist()]


@dataclass
class Encoded:
    """Encoded rows: each modality's inputs, and which rows really have it.

    `inputs` maps a modality to its rows: "image" (N, 3, H, W) float32 normalised, "text" N
    strings, "audio" `Clips`. A modality missing from `inputs` is absent from every row; one in
    `inputs` without a `present` mask is present in every row. Every row keeps one modality.
    """

    labels: torch.Tensor  # (N,) int64 class indices
    inputs: dict[str, Any]
    present: dict[str, torch.Tensor] = field(default_factory=dict)  # modality -> (N,) bool
    stems: dict = field(default_factory=dict, compare=False, repr=False)  # common/stems.py

    def __post_init__(self) -> None:
        n = self.labels.shape[0]
        masks = {}
        for m, rows in self.inputs.items():
            if _num_rows(rows) != n:
                raise RuntimeError(f"Encoded {m} has {_num_rows(rows)} rows, labels {n}")
            mask = self.present.get(m)
            mask = torch.ones(n, dtype=torch.bool) if mask is None else torch.as_tensor(
                mask).to(torch.bool).reshape(-1)
            if mask.shape[0] != n:
                raise RuntimeError(f"Encoded {m} mask has {mask.shape[0]} rows, expected {n}")
            masks[m] = mask
        if unknown := set(self.present) - set(self.inputs):
            raise RuntimeError(f"Encoded masks for modalities without inputs: {sorted(unknown)}")
        self.present = masks
        none = ~torch.stack(list(masks.values())).any(0) if masks else torch.ones(n, dtype=bool)
        if bool(none.any()):
            raise ValueError(f"{int(none.sum())} rows have no modality (first: row "
                             f"{int(none.nonzero()[0])}); a row must keep one modality")

    def __len__(self) -> int:
        return self.labels.shape[0]

    def has(self, modality: str) -> torch.Tensor:
        """Which rows (N,) hold `modality` (all False if the data has none of it)."""
        mask = self.present.get(modality)
        return torch.zeros(len(self), dtype=torch.bool) if mask is None else mask

    @property
    def modalities(self) -> tuple[str, ...]:
        """The modalities these rows were encoded with (some rows may lack them)."""
        return tuple(self.inputs)

    @property
    def pixel_values(self) -> torch.Tensor:
        return self.inputs["image"]  # (N, 3, H, W)

    @property
    def texts(self) -> list[str]:
        return self.inputs["text"]

    @property
    def has_image(self) -> torch.Tensor:
        return self.has("image")  # (N,)

    @property
    def has_text(self) -> torch.Tensor:
        return self.has("text")  # (N,)

    def subset(self, indices: Sequence[int]) -> Encoded:
        """Return the rows at `indices`, in that order."""
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return Encoded(self.labels[idx], {m: _take(v, idx) for m, v in self.inputs.items()},
                       {m: v[idx] for m, v in self.present.items()})

    @staticmethod
    def concat(parts: Sequence[Encoded]) -> Encoded:
        """The rows of `parts`, one after the other (the same modalities in each)."""
        modalities = parts[0].modalities
        if any(p.modalities != modalities for p in parts):
            raise ValueError(f"cannot concatenate rows of modalities "
                             f"{sorted({p.modalities for p in parts})}")

        def join(values: list) -> Any:
            if isinstance(values[0], torch.Tensor):
                return torch.cat(values)
            if isinstance(values[0], Clips):
                return Clips(*(torch.cat(v) for v in zip(*values)))
            return [x for v in values for x in v]
        return Encoded(torch.cat([p.labels for p in parts]),
                       {m: join([p.inputs[m] for p in parts]) for m in modalities},
                       {m: torch.cat([p.present[m] for p in parts]) for m in modalities})
