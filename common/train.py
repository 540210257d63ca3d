"""Local training and evaluation of a site's model on its own data.

`train_local(bundle, data, cfg.train)` runs AdamW over the trainable tensors only (LoRA +
modules_to_save) with every option of `TrainConfig`:
  proximal_mu            FedProx's term mu/2 * ||w - w_global||^2
  absent_class_scale     FedRS's restricted softmax (Li & Zhan, KDD 2021): logits of classes the
                         site does not hold are scaled, so a site with few labels does not push
                         the shared head away from the others' classes
  modality_dropout_*     each step hides one modality of some rows (never their last): the fusion
                         head's learned placeholder stands in, so the head cannot lean on the
                         modality learned first
  max_grad_norm          one global gradient-norm clip per step (as HF Trainer)
  label_smoothing        cross-entropy label smoothing (`loss_fn`, shared with DP-SGD)
`evaluate` reports loss, accuracy, macro-F1. On CUDA both run under bf16 autocast; on CPU in
float32.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from common.encoded import Encoded
from common.model import RAW_INPUTS, Bundle
from common.schema import TrainConfig
from common.stems import cached_stems


def pick_device(setting: str = "auto") -> torch.device:
    """Resolve `auto` to cuda when available, else cpu."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def batches(n: int, batch_size: int, generator: torch.Generator | None = None
            ) -> Iterator[torch.Tensor]:
    """Yield index batches: shuffled with `generator`, else in order."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    yield from order.split(batch_size)


def model_inputs(bundle: Bundle, data: Encoded, idx: torch.Tensor, device: torch.device,
                 hidden: dict[str, torch.Tensor] | None = None,
                 stems: dict[str, tuple] | None = None) -> dict[str, torch.Tensor]:
    """One batch's tower inputs (cached stem outputs where given) and presence masks.

    `hidden`: per modality, rows (B,) to treat as missing this step (modality dropout);
    `stems`: `cached_stems` of `data`, used instead of the towers' raw inputs. A modality the
    data does not hold gets its mask (all False) and no input: its tower skips every row.
    """
    stems, inputs = stems or {}, {}
    for m, tower in bundle.towers.items():
        present = data.has(m)[idx]  # (B,)
        if hidden is not None and m in hidden:
            present = present & ~hidden[m]
        inputs[f"{m}_mask"] = present.to(device)
        if m in stems:
            inputs.update(_cached_inputs(m, stems[m], idx, device))
        elif m in data.inputs:
            inputs.update(_raw_inputs(m, tower, data.inputs[m], idx, present, device))
    return inputs


def _cached_inputs(modality: str, cached: tuple, idx: torch.Tensor, device: torch.device
                 ) -> dict[str, torch.Tensor]:
    """A batch of cached stem outputs and the masks its tower's head takes."""
    stem, mask = cached
    if modality == "text":
        mask = mask[idx]  # (B, T_all)
        length = int(mask.sum(1).max())  # the batch's longest text: as if tokenised alone
        return {"text_stem": stem[idx][:, :length].to(device),  # (B, T, D)
                "attention_mask": mask[:, :length].to(device)}  # (B, T)
    out = {f"{modality}_stem": stem[idx].to(device)}  # image (B, C, h, w); audio (B, T', D)
    if mask is not None:
        out[RAW_INPUTS[modality][1]] = mask[idx].to(device)  # audio: (B, T) real frames
    return out


def _raw_inputs(modality: str, tower: nn.Module, rows, idx: torch.Tensor, present: torch.Tensor,
                device: torch.device) -> dict[str, torch.Tensor]:
    """A batch of a tower's raw inputs (RAW_INPUTS names them)."""
    if modality == "text":  # hidden texts are tokenised blank: nothing of them reaches the tower
        texts = [rows[i] if keep else "" for i, keep in zip(idx.tolist(), present.tolist())]
        return {k: v.to(device) for k, v in tower.tokenize(texts).items()}
    if modality == "audio":
        return {"input_features": rows.features[idx].to(device),  # (B, M, T) | (B, S)
                "feature_mask": rows.mask[idx].to(device)}  # (B, T) | (B, S)
    return {"pixel_values": rows[idx].to(device)}  # (B, 3, H, W)


DROPOUT_ORDER = ("text", "image", "audio")  # the bands of one uniform draw, in this order


def modality_dropout(present: dict[str, torch.Tensor], rates: dict[str, float],
                     generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Rows (B,) of each modality to hide this step.

    One uniform draw per row: below `rates["text"]` hides the text, the next `rates["image"]`
    the image, the next `rates["audio"]` the audio, so no row loses two; a row keeps a modality
    it would otherwise be left without (it hides one only while it holds another).
    """
    rows = next(iter(present.values())).shape[0]
    u = torch.rand(rows, generator=generator)  # (B,)
    count = torch.stack(list(present.values())).sum(0)  # (B,) modalities each row holds
    hide, low = {}, 0.0
    for m in DROPOUT_ORDER:
        rate = rates.get(m, 0.0)
        if m in present:
            hide[m] = (u >= low) & (u < low + rate) & present[m] & (count > 1)
        low += rate
    return hide


def dropout_rates(train: TrainConfig) -> dict[str, float]:
    """The configured modality dropout rate of each modality."""
    return {m: getattr(train, f"modality_dropout_{m}") for m in DROPOUT_ORDER}


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def loss_fn(logits: torch.Tensor, labels: torch.Tensor, train: TrainConfig) -> torch.Tensor:
    """The training loss (cross-entropy, with `train.label_smoothing`); DP-SGD uses it too."""
    return nn.functional.cross_entropy(logits, labels, label_smoothing=train.label_smoothing)


def train_local(bundle: Bundle, data: Encoded, train: TrainConfig, *, seed: int = 0,
                device: torch.device | None = None, cache: bool = True,
                anchor: list[torch.Tensor] | None = None) -> dict[str, float]:
    """Train the trainable tensors for `train.epochs` on `data`; return mean loss and counts.

    `cache`: run the towers' frozen stems once per row (common/stems.py), not every step.
    `anchor`: what `train.proximal_mu` pulls the trainable tensors to (in their order; default
    their values at the start; Ditto passes the global ones).
    """
    device = device or pick_device()
    stems = cached_stems(bundle, data, device) if cache else None
    model = bundle.model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    if train.proximal_mu == 0:
        anchor = []
    else:
        anchor = [a.to(device) for a in anchor] if anchor is not None else [
            p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout draws from the global RNG: same seed, same run
    labels = data.labels.to(device)
    scale = restricted_softmax_scale(labels, len(bundle.label_names),
                                     train.absent_class_scale)  # (C,)
    rates = dropout_rates(train)
    towers = list(bundle.towers)
    losses: list[float] = []
    for _ in range(train.epochs):
        for idx in batches(len(data), train.batch_size, generator):
            hidden = None
            if any(rates.values()):  # no draw when off: same runs
                hidden = modality_dropout({m: data.has(m)[idx] for m in towers}, rates,
                                          generator)
            with _autocast(device):
                logits = model(**model_inputs(bundle, data, idx, device, hidden,
                                              stems)).float()  # (B, C)
                loss = loss_fn(logits * scale, labels[idx.to(device)], train)
            objective = loss
            if anchor:  # FedProx: pull the trainable tensors towards the global ones
                objective = loss + train.proximal_mu / 2 * sum(
                    (p - a).pow(2).sum() for p, a in zip(params, anchor))
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
            if train.max_grad_norm > 0:  # as HF Trainer's max_grad_norm: one norm over all
                nn.utils.clip_grad_norm_(params, train.max_grad_norm)
            optimizer.step()
            losses.append(loss.item())
    model.eval()
    return {"train_loss": float(np.mean(losses)) if losses else float("nan"),
            "num_examples": len(data), "steps": len(losses)}


def restricted_softmax_scale(labels: torch.Tensor, num_classes: int, absent_scale: float
                             ) -> torch.Tensor:
    """Per-class logit factor (C,): 1 for the classes in `labels`, `absent_scale` for the rest."""
    scale = torch.full((num_classes,), float(absent_scale), device=labels.device)
    scale[labels.unique()] = 1.0
    return scale


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    """Unweighted mean of per-class F1 over the classes present in truth or prediction."""
    scores = []
    for c in range(num_classes):
        tp = np.sum((y_pred == c) & (y_true == c))
        fp = np.sum((y_pred == c) & (y_true != c))
        fn = np.sum((y_pred != c) & (y_true == c))
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else 0.0


@torch.no_grad()
def predict(bundle: Bundle, data: Encoded, batch_size: int = 64,
            device: torch.device | None = None, cache: bool = True) -> torch.Tensor:
    """Return logits (N, C) for `data`, in order."""
    device = device or pick_device()
    model = bundle.model.to(device).eval()
    stems = cached_stems(bundle, data, device) if cache else None
    out = []
    for idx in batches(len(data), batch_size):
        with _autocast(device):
            out.append(model(**model_inputs(bundle, data, idx, device, None, stems)).float().cpu())
    return torch.cat(out)  # (N, C)


def evaluate(bundle: Bundle, data: Encoded, batch_size: int = 64,
             device: torch.device | None = None) -> dict[str, float]:
    """Return loss, accuracy and macro-F1 of the model on `data`."""
    logits = predict(bundle, data, batch_size, device)  # (N, C)
    loss = nn.functional.cross_entropy(logits, data.labels).item()
    y_pred, y_true = logits.argmax(-1).numpy(), data.labels.numpy()
    return {"loss": float(loss), "accuracy": float((y_pred == y_true).mean()),
            "macro_f1": macro_f1(y_true, y_pred, len(bundle.label_names)),
            "num_examples": len(data)}
