"""Local training and evaluation of a site's model on its own data.

`train_local(bundle, data, cfg.train)` runs AdamW over the trainable tensors only (LoRA +
modules_to_save) with every option of `TrainConfig`:
  proximal_mu            FedProx's term mu/2 * ||w - w_global||^2
  absent_class_scale     FedRS's restricted softmax (Li & Zhan, KDD 2021): logits of classes the
                         site does not hold are scaled, so a site with few labels does not push
                         the shared head away from the others' classes
  modality_dropout_*     each step hides some rows' text or image (never both): the fusion
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

from common.data import Encoded
from common.model import Bundle
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
                 hidden: tuple[torch.Tensor, torch.Tensor] | None = None,
                 stems: dict[str, tuple] | None = None) -> dict[str, torch.Tensor]:
    """One batch's tower inputs (cached stem outputs where given) and presence masks.

    `hidden`: (text, image) rows (B,) to treat as missing this step (modality dropout);
    `stems`: `cached_stems` of `data`, used instead of the towers' raw inputs.
    """
    has_text, has_image = data.has_text[idx], data.has_image[idx]  # (B,)
    if hidden is not None:
        has_text, has_image = has_text & ~hidden[0], has_image & ~hidden[1]
    stems, towers = stems or {}, bundle.towers
    inputs = {"image_mask": has_image.to(device), "text_mask": has_text.to(device)}  # (B,)
    if "image" in stems:
        inputs["image_stem"] = stems["image"][0][idx].to(device)  # (B, C, h, w)
    elif "image" in towers:
        inputs["pixel_values"] = data.pixel_values[idx].to(device)  # (B, 3, H, W)
    if "text" in stems:
        stem, mask = stems["text"]
        mask = mask[idx]  # (B, T_all)
        length = int(mask.sum(1).max())  # the batch's longest text: as if tokenised alone
        inputs["text_stem"] = stem[idx][:, :length].to(device)  # (B, T, D)
        inputs["attention_mask"] = mask[:, :length].to(device)  # (B, T)
    elif "text" in towers:
        texts = [data.texts[i] if keep else "" for i, keep in zip(idx.tolist(), has_text.tolist())]
        inputs.update({k: v.to(device) for k, v in towers["text"].tokenize(texts).items()})
    return inputs


def modality_dropout(has_text: torch.Tensor, has_image: torch.Tensor, text_rate: float,
                     image_rate: float, generator: torch.Generator
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (B,) whose text / image to hide this step.

    One uniform draw per row: below `text_rate` hides the text, the next `image_rate` hides the
    image, so no row loses both; a row whose other modality is already missing keeps what it has.
    """
    u = torch.rand(has_text.shape[0], generator=generator)  # (B,)
    hide_text = (u < text_rate) & has_image
    hide_image = (u >= text_rate) & (u < text_rate + image_rate) & has_text
    return hide_text, hide_image


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def loss_fn(logits: torch.Tensor, labels: torch.Tensor, train: TrainConfig) -> torch.Tensor:
    """The training loss (cross-entropy, with `train.label_smoothing`); DP-SGD uses it too."""
    return nn.functional.cross_entropy(logits, labels, label_smoothing=train.label_smoothing)


def train_local(bundle: Bundle, data: Encoded, train: TrainConfig, *, seed: int = 0,
                device: torch.device | None = None, cache: bool = True) -> dict[str, float]:
    """Train the trainable tensors for `train.epochs` on `data`; return mean loss and counts.

    `cache`: run the towers' frozen stems once per row (common/stems.py), not every step.
    """
    device = device or pick_device()
    stems = cached_stems(bundle, data, device) if cache else None
    model = bundle.model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if train.proximal_mu > 0 else []
    optimizer = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout draws from the global RNG: same seed, same run
    labels = data.labels.to(device)
    scale = restricted_softmax_scale(labels, len(bundle.label_names),
                                     train.absent_class_scale)  # (C,)
    text_rate, image_rate = train.modality_dropout_text, train.modality_dropout_image
    losses: list[float] = []
    for _ in range(train.epochs):
        for idx in batches(len(data), train.batch_size, generator):
            hidden = None
            if text_rate or image_rate:  # no draw when off: same runs
                hidden = modality_dropout(data.has_text[idx], data.has_image[idx], text_rate,
                                          image_rate, generator)
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
