"""Cost of the embedded Whisper audio towers on CPU: one JSON line per figure.

    python -m benchmarks.audio_tower [--models tiny.en base] [--batch 16] [--threads 2]

Figures: conversion (first use) and cached load time, cache folder size, encoder forward
seconds for a batch of 1 s / 2 s / 5 s clips, and one LoRA r=8 training step (a linear probe
on the pooled features) with the stem recomputed or cached, for LoRA on every layer (stem =
conv front-end only) and on the top half of the layers. Times are the median of `--reps` runs
after one warm-up, and their min (the least disturbed by other load on a shared machine); the
analytic forward GFLOP per clip does not depend on load. Conversions go to a temp cache, so
~/.cache is left alone.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from functools import partial

import torch
from peft import LoraConfig, get_peft_model

from benchmarks.measure import emit, timed
from common.towers import packaged
from common.towers.whisper import build_audio_tower


def encoder_gflop(config, seconds: float) -> float:
    """Return the forward GFLOP of one clip through a Whisper encoder (2 FLOP per MAC)."""
    d, ffn, mels = config.d_model, config.encoder_ffn_dim, config.num_mel_bins
    mel_frames, frames = 100 * seconds, 50 * seconds
    macs = mel_frames * 3 * mels * d + frames * 3 * d * d  # conv1, conv2
    macs += config.encoder_layers * (frames * (4 * d * d + 2 * d * ffn) + 2 * frames**2 * d)
    return 2 * macs / 1e9


def folder_bytes(folder: os.PathLike) -> int:
    """Return the bytes of the files in `folder`."""
    return sum(f.stat().st_size for f in os.scandir(folder) if f.is_file())


def train_step(features: Callable[[torch.Tensor], torch.Tensor], probe: torch.nn.Module,
               opt: torch.optim.Optimizer, inputs: torch.Tensor, labels: torch.Tensor) -> None:
    """Take one optimizer step of LoRA + a linear probe on `features(inputs)` (B, D)."""
    loss = torch.nn.functional.cross_entropy(probe(features(inputs)), labels)
    opt.zero_grad()
    loss.backward()
    opt.step()


def bench_model(name: str, args: argparse.Namespace) -> None:
    """Print every figure of one embedded model."""
    start = time.perf_counter()
    folder = packaged.converted_folder(name)
    emit(figure="conversion_s", model=name, seconds=round(time.perf_counter() - start, 3))
    emit(figure="cache_folder_mb", model=name, mb=round(folder_bytes(folder) / 2**20, 1))
    start = time.perf_counter()
    tower = build_audio_tower(name).eval()
    emit(figure="cached_load_s", model=name, seconds=round(time.perf_counter() - start, 3))
    n_mels, layers = tower.encoder.config.num_mel_bins, tower.encoder.config.encoder_layers

    for clip in (1, 2, 5):
        mel = torch.randn(args.batch, n_mels, 100 * clip)  # (B, M, T): 100 mel frames per s
        with torch.no_grad():
            sec, best = timed(partial(tower, mel), args.reps)
        emit(figure="encoder_forward_s", model=name, clip_s=clip, batch=args.batch,
             seconds=round(sec, 3), min_seconds=round(best, 3),
             samples_per_s=round(args.batch / sec, 1),
             gflop_per_sample=round(encoder_gflop(tower.encoder.config, clip), 2))

    mel = torch.randn(args.batch, n_mels, 100 * args.step_clip)
    labels = torch.randint(0, 4, (args.batch,))
    for lora_layers, first in (("all", 0), ("top_half", layers // 2)):
        targets = [f"layers.{i}.self_attn.{p}" for i in range(first, layers)
                   for p in ("q_proj", "v_proj")]
        fresh = build_audio_tower(folder, targets)
        model = get_peft_model(fresh, LoraConfig(r=8, lora_alpha=16,
                                                 target_modules=fresh.lora_targets))
        probe = torch.nn.Linear(fresh.out_dim, 4)
        params = [p for p in model.parameters() if p.requires_grad] + list(probe.parameters())
        opt = torch.optim.AdamW(params, lr=1e-4)
        with torch.no_grad():
            cached = fresh.stem(mel)  # (B, T', D), what a per-row cache would hold
        for use_cache in (False, True):
            step = partial(train_step, fresh.head if use_cache else fresh, probe, opt,
                           cached if use_cache else mel, labels)
            sec, best = timed(step, args.reps)
            emit(figure="lora_r8_train_step_s", model=name, lora_layers=lora_layers,
                 stem_cached=use_cache, clip_s=args.step_clip, batch=args.batch,
                 seconds=round(sec, 3), min_seconds=round(best, 3),
                 samples_per_s=round(args.batch / sec, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny.en", "base"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--step-clip", type=int, default=2, help="clip seconds of the train step")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    emit(figure="setup", threads=args.threads, torch=torch.__version__,
         load_average=os.getloadavg()[0])
    a = torch.randn(1024, 1024)  # what this machine delivers now, to rescale the figures
    sec, best = timed(partial(torch.mm, a, a), 10)
    emit(figure="matmul_gflop_per_s", n=1024, median=round(2 * 1024**3 / sec / 1e9, 1),
         best=round(2 * 1024**3 / best / 1e9, 1))
    with tempfile.TemporaryDirectory() as cache:
        os.environ[packaged.CACHE_ENV] = cache
        for model in args.models:
            bench_model(f"embedded:whisper-{model}", args)
    emit(figure="done", load_average=os.getloadavg()[0])


if __name__ == "__main__":
    main()
