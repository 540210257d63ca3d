"""Opacus DP-SGD over a PEFT model: the private step must move the adapter exactly as the
non-private reference does (Opacus with PEFT has silently corrupted LoRA updates before)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from common.config import load_config
from common.dp_sgd import UNSUPPORTED, per_sample_clipping, train_local_dp
from common.model import build_model
from common.train import model_inputs
from tests.conftest import LABELS, random_batch, tiny_overrides, train_options

CPU = torch.device("cpu")


@pytest.fixture
def bundle(tiny_text_dir):
    """A tiny PEFT model without dropout, LoRA B random so that every factor gets a gradient."""
    cfg = load_config(tiny_overrides(tiny_text_dir) + ["model.lora.dropout=0"])
    torch.manual_seed(0)
    bundle = build_model(cfg.model, LABELS)
    for name, module in bundle.model.named_modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if name.endswith("lora_B.default"):
            nn.init.normal_(module.weight, std=0.05)
    bundle.model.train()
    return bundle


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()
            if p.requires_grad and UNSUPPORTED not in n}


def _grad(bundle, data, idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """Plain autograd gradient of the mean loss over `idx` (the non-private reference)."""
    model = bundle.model
    model.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(**model_inputs(bundle, data, idx, CPU)),
                                       data.labels[idx])
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()
            if p.requires_grad and UNSUPPORTED not in n}


def _dp_step(bundle, data, idx, *, noise, clip) -> dict[str, torch.Tensor]:
    """One DP-SGD step with SGD(lr=1): returns the change of every trainable tensor."""
    before = _trainable(bundle.model)
    params = [p for p in bundle.model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1.0)
    with per_sample_clipping(bundle.model, optimizer, noise_multiplier=noise,
                             max_grad_norm=clip, expected_batch_size=len(idx)) as (m, opt):
        opt.zero_grad(set_to_none=True)
        logits = m(**model_inputs(bundle, data, idx, CPU))  # (B, C)
        nn.functional.cross_entropy(logits, data.labels[idx]).backward()
        opt.step()
    after = _trainable(bundle.model)
    return {n: after[n] - before[n] for n in before}


def test_tiny_noise_dp_step_moves_the_adapter_as_the_plain_step(bundle):
    data, idx = random_batch(6), torch.arange(6)
    reference = _grad(bundle, data, idx)
    delta = _dp_step(bundle, data, idx, noise=1e-9, clip=1e3)  # no clipping, noise std 1e-6
    assert any(".lora_A." in n for n in delta) and any(".lora_B." in n for n in delta)
    assert any("modules_to_save" in n for n in delta)
    for name, g in reference.items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(delta[name], -g, rtol=1e-3, atol=1e-6, msg=name)


def test_clipped_dp_step_equals_the_mean_of_per_sample_clipped_gradients(bundle):
    data, idx = random_batch(4, seed=3), torch.arange(4)
    per_sample = [_grad(bundle, data, idx[i:i + 1]) for i in range(4)]  # plain autograd, one by one
    norms = torch.stack([torch.sqrt(sum(g.pow(2).sum() for g in ps.values()))
                         for ps in per_sample])
    clip = float(norms.median())  # some samples clipped, some not
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    expected = {n: -sum(f * ps[n] for f, ps in zip(factors, per_sample)) / 4
                for n in per_sample[0]}
    delta = _dp_step(bundle, data, idx, noise=1e-9, clip=clip)
    for name in expected:
        torch.testing.assert_close(delta[name], expected[name], rtol=1e-3, atol=1e-6, msg=name)


def test_dp_training_leaves_the_model_unhooked_and_reports_steps(bundle):
    result = train_local_dp(bundle, random_batch(12),
                            train_options(epochs=1, batch_size=4, lr=1e-3), noise_multiplier=1.0, max_grad_norm=1.0, seed=0, device=CPU)
    assert result["steps"] == 3 and result["sample_rate"] == pytest.approx(4 / 12)
    assert all(not hasattr(p, "grad_sample") for p in bundle.model.parameters())
    placeholders = [p for n, p in bundle.model.named_parameters()
                    if "modules_to_save" in n and UNSUPPORTED in n]
    assert placeholders and all(p.requires_grad for p in placeholders)  # trainable again


def test_dp_sgd_trains_audio_subsets_and_refuses_rows_without_a_modality(tiny_text_dir,
                                                                          tiny_whisper_dir):
    for modalities in ("audio", "text,audio"):
        cfg = load_config(tiny_overrides(tiny_text_dir, audio_dir=tiny_whisper_dir,
                                         modalities=modalities))
        data = random_batch(16, modalities=tuple(modalities.split(",")))
        metrics = train_local_dp(build_model(cfg.model, LABELS), data,
                                 train_options(epochs=1, batch_size=8), noise_multiplier=1.0,
                                 max_grad_norm=1.0)
        assert metrics["steps"] == 2 and metrics["num_examples"] == 16
    cfg = load_config(tiny_overrides(tiny_text_dir, audio_dir=tiny_whisper_dir,
                                     modalities="image,text,audio"))
    with pytest.raises(ValueError, match="16 of 16 rows have no audio"):
        train_local_dp(build_model(cfg.model, LABELS), random_batch(16), train_options(),
                       noise_multiplier=1.0, max_grad_norm=1.0)


def test_per_layer_clipped_step_clips_each_tensor_of_each_sample_to_its_share(bundle):
    """privacy.per_layer_clipping: every trainable tensor of every sample's gradient is clipped
    to C / sqrt(L) on its own (reference: plain autograd one sample at a time)."""
    data, idx = random_batch(4, seed=5), torch.arange(4)
    per_sample = [_grad(bundle, data, idx[i:i + 1]) for i in range(4)]
    clip = float(torch.stack([torch.sqrt(sum(g.pow(2).sum() for g in ps.values()))
                              for ps in per_sample]).median())
    share = clip / len(per_sample[0]) ** 0.5
    expected = {n: -sum((share / (ps[n].norm() + 1e-6)).clamp(max=1.0) * ps[n]
                        for ps in per_sample) / 4 for n in per_sample[0]}
    before = _trainable(bundle.model)
    params = [p for p in bundle.model.parameters() if p.requires_grad]
    with per_sample_clipping(bundle.model, torch.optim.SGD(params, lr=1.0), noise_multiplier=1e-9,
                             max_grad_norm=clip, expected_batch_size=4, per_layer=True) as (m, opt):
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(m(**model_inputs(bundle, data, idx, CPU)),
                                    data.labels[idx]).backward()
        opt.step()
    after = _trainable(bundle.model)
    clipped = 0
    for name, want in expected.items():
        torch.testing.assert_close(after[name] - before[name], want, rtol=1e-3, atol=1e-6,
                                   msg=name)
        clipped += any(float(ps[name].norm()) > share for ps in per_sample)
    assert clipped > 0  # some tensor of some sample was over its share
