"""Local DP-SGD at a site (`privacy.dp=local`): Opacus per-sample clipping + Gaussian noise.

Only the trainable tensors (LoRA A/B, the CNN and the fusion head, PEFT `modules_to_save`) get
per-sample gradients; the frozen backbone gets no hooks. Opacus's hooks cover every trainable
layer here (Linear, Conv2d, GroupNorm, LayerNorm); the head's missing-modality placeholders are
bare parameters Opacus cannot differentiate per sample, so they stay frozen under DP-SGD (they
only matter to rows without a modality, which this mode refuses: a tower that skips rows breaks
the per-sample batch alignment). Batches are Poisson-sampled with rate q = batch_size / n, as the
accountant (common/privacy.py) assumes; an empty batch still takes a noised step.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer, DPPerLayerOptimizer
from torch import nn

from common.encoded import Encoded
from common.model import Bundle
from common.privacy import local_steps
from common.schema import TrainConfig
from common.stems import cached_stems
from common.train import _autocast, loss_fn, model_inputs, pick_device

UNSUPPORTED = "placeholders."  # the head's bare nn.Parameters (a ParameterDict)


@contextmanager
def per_sample_clipping(model: nn.Module, optimizer: torch.optim.Optimizer, *,
                        noise_multiplier: float, max_grad_norm: float,
                        expected_batch_size: int, per_layer: bool = False
                        ) -> Iterator[tuple[nn.Module, DPOptimizer]]:
    """Wrap `model` for per-sample gradients and `optimizer` for clipping + noise; undo after.

    `per_layer`: each of the L trainable tensors is clipped to max_grad_norm / sqrt(L) on its
    own (Opacus's per-layer clipping), so a sample's whole gradient is still within
    max_grad_norm and the noise and the accounting are unchanged.
    """
    frozen = [p for n, p in model.named_parameters() if p.requires_grad and UNSUPPORTED in n]
    for p in frozen:
        p.requires_grad_(False)
    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    common = dict(noise_multiplier=noise_multiplier, expected_batch_size=expected_batch_size,
                  loss_reduction="mean")
    if per_layer:
        count = sum(p.requires_grad for g in optimizer.param_groups for p in g["params"])
        dp_optimizer = DPPerLayerOptimizer(optimizer, max_grad_norm=[max_grad_norm / count ** 0.5]
                                           * count, **common)
    else:
        dp_optimizer = DPOptimizer(optimizer, max_grad_norm=max_grad_norm, **common)
    try:
        yield wrapped, dp_optimizer
    finally:
        wrapped._close()  # remove the hooks: the cached model trains/evaluates plainly again
        for p in frozen:
            p.requires_grad_(True)


def train_local_dp(bundle: Bundle, data: Encoded, train: TrainConfig, *,
                   noise_multiplier: float, max_grad_norm: float, seed: int = 0,
                   device: torch.device | None = None, per_layer: bool = False
                   ) -> dict[str, float]:
    """DP-SGD (AdamW on privatised gradients) for `train.epochs`; return loss, counts, steps.

    The options DP-SGD cannot honour per sample are refused by the config rules
    (common/rules.py); `max_grad_norm` here is the per-sample clipping norm.
    """
    for m in bundle.towers:  # the config rules refuse missing-modality skews; a site's data
        if missing := int((~data.has(m)).sum()):  # may still lack a modality itself
            raise ValueError(f"privacy.dp=local needs every row to hold each of the model's "
                             f"modalities: {missing} of {len(data)} rows have no {m} (a tower "
                             "that skips rows breaks Opacus's per-sample gradients)")
    batch_size = train.batch_size
    device = device or pick_device()
    stems = cached_stems(bundle, data, device)  # before Opacus hooks the trainable layers
    model = bundle.model.to(device).train()
    n = len(data)
    rate = min(1.0, batch_size / n)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout and Opacus's noise draw from the global RNG
    labels = data.labels.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    losses: list[float] = []
    steps = local_steps(n, batch_size, train.epochs)
    with per_sample_clipping(model, optimizer, noise_multiplier=noise_multiplier,
                             max_grad_norm=max_grad_norm,
                             expected_batch_size=batch_size, per_layer=per_layer
                             ) as (wrapped, dp_optimizer):
        trainable = [p for p in params if p.requires_grad]
        for _ in range(steps):
            idx = torch.nonzero(torch.rand(n, generator=generator) < rate).squeeze(1)  # (b,)
            dp_optimizer.zero_grad(set_to_none=True)
            if len(idx) == 0:  # nobody sampled: the step is noise alone
                for p in trainable:
                    p.grad_sample = torch.zeros((0, *p.shape), device=device)
            else:
                with _autocast(device):
                    logits = wrapped(**model_inputs(bundle, data, idx, device, None, stems))  # (b, C)
                    loss = loss_fn(logits.float(), labels[idx.to(device)], train)
                loss.backward()
                losses.append(loss.item())
            dp_optimizer.step()
    model.eval()
    return {"train_loss": float(np.mean(losses)) if losses else float("nan"),
            "num_examples": n, "steps": steps, "sample_rate": rate}
