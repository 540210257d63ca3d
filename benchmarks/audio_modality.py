"""Which audio tower and LoRA layers: tone accuracy, site-round seconds, upload bytes.

    python -m benchmarks.audio_modality [--models tiny.en base] [--rows 180] [--test 240]

An audio-only fedmm model (projection + fusion head over the Whisper tower) learns the demo's
third factor, the tone (low/high) heard in each row's sound (`common.demo_data`, `--audio`),
on one site of `--rows` rows through the real pipeline (manifest, soundfile + soxr, log-mel,
cached stems, `train_local` with the packaged `TrainConfig`) for `--rounds` rounds. Per tower
and LoRA placement it prints one JSON line: tone accuracy on `--test` held-out rows after each
round, the first site-round's seconds (it fills the stem cache) and the steady one's (best of
the later rounds), and the bytes a site uploads per round (`adapter_state`).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.measure import emit
from common.adapter import adapter_state, state_bytes, to_numpy
from common.config import load_config
from common.encoded import Encoded
from common.model import build_model
from common.stems import cacheable
from common.task import load_test_split, resolve_data, site_data
from common.train import evaluate, train_local

PLACEMENTS = ("all", "top_half", "last", "frozen")  # which encoder layers take LoRA (q, v)


def targets(placement: str, layers: int) -> str:
    """The `model.audio.target_modules` override of a placement."""
    first = {"all": 0, "top_half": layers // 2, "last": layers - 1, "frozen": layers}[placement]
    return "[" + ",".join(f"layers.{i}.self_attn.{p}" for i in range(first, layers)
                          for p in ("q_proj", "v_proj")) + "]"


def tone_only(data: Encoded, names: list[str]) -> Encoded:
    """The rows with the tone (the label's last factor) as their label: 0 high, 1 low."""
    tones = torch.tensor([names[i].endswith("-low") for i in data.labels.tolist()]).long()
    return Encoded(tones, data.inputs, data.present)


def bench(model: str, placement: str, args: argparse.Namespace, data_dir: Path) -> None:
    layers = {"tiny.en": 4, "base": 6}[model]
    cfg = resolve_data(load_config([
        "data.demo_audio=true", f"data.demo_dir={data_dir}", f"data.demo_train={args.rows * 2}",
        f"data.demo_test={args.test}", "partition=iid", "partition.num_clients=2",
        "model.modalities=[audio]", f"model.audio.name_or_path=embedded:whisper-{model}",
        f"model.audio.target_modules={targets(placement, layers)}"]))
    names = list(cfg.data.labels)
    train = tone_only(site_data(cfg, train_manifest=cfg.data.train, partition_id=0)[0], names)
    test = tone_only(load_test_split(cfg), names)
    bundle = build_model(cfg.model, ["high", "low"])
    seconds, accuracy = [], []
    for r in range(args.rounds):
        start = time.perf_counter()
        train_local(bundle, train, cfg.train, seed=r)
        seconds.append(time.perf_counter() - start)
        accuracy.append(round(evaluate(bundle, test)["accuracy"], 3))
    emit(figure="audio_tower", model=model, lora_layers=placement, rows=len(train),
         test_rows=len(test), tone_accuracy_per_round=accuracy,
         first_round_s=round(seconds[0], 1), steady_round_s=round(min(seconds[1:]), 1),
         stem_cached=cacheable(bundle.towers["audio"]),
         upload_bytes=state_bytes(to_numpy(adapter_state(bundle.model))),
         load_average=round(os.getloadavg()[0], 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny.en", "base"])
    parser.add_argument("--placements", nargs="+", default=list(PLACEMENTS))
    parser.add_argument("--rows", type=int, default=180)
    parser.add_argument("--test", type=int, default=240)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", type=Path, default=None, help="demo folder (default: a temp one)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data or Path(tmp) / "demo-audio"
        for model in args.models:
            for placement in args.placements:
                bench(model, placement, args, data_dir)


if __name__ == "__main__":
    main()
