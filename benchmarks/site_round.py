"""Seconds of one site-round (local training of one site) per model, the cache's speed-up.

    python -m benchmarks.site_round [--rows 200] [--threads 2] [--fusions concat gated late]

Prints one JSON line per model: the first round apart (it fills the stem cache), the steady
state (best of the next rounds), samples/s, the ratio to the small-CNN model's steady
site-round, and, for models whose towers cache a stem, the same steady round without the cache.
All run in-process on the default demo task (one IID site of `--rows` rows, 3 local epochs),
once per `--fusions` entry (a model without projections gets 64-wide ones for `gated`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from dataclasses import replace

import torch

from common.adapter import adapter_state, set_adapter_state, to_numpy
from common.config import load_config
from common.model import build_model
from common.stems import cacheable
from common.task import resolve_data, site_data
from common.train import train_local

MODELS = {  # name -> overrides
    "cnn (model=minilm_cnn)": ["model=minilm_cnn"],
    "lite0 frozen": ["model.vision.target_modules=[]"],
    "lite0 + LoRA, text LoRA in all 6 layers": ["model.text.lora_layers=0"],
    "lite0 + LoRA, text LoRA in the top 2 (default)": [],
}


def site_round_seconds(overrides: list[str], rows: int, rounds: int, cache: bool
                       ) -> tuple[float, float, int, bool]:
    """(first round s, best later round s, rows, whether a stem is cached) of one site."""
    clients = max(1, 2000 // rows)
    cfg = resolve_data(load_config(["partition=iid", f"partition.num_clients={clients}",
                                    *overrides]))
    bundle = build_model(cfg.model, list(cfg.data.labels))
    start = to_numpy(adapter_state(bundle.model))
    train, _ = site_data(cfg, train_manifest=cfg.data.train, partition_id=0)
    train = replace(train, stems={})  # a fresh cache for this model
    times = []
    for r in range(rounds):
        set_adapter_state(bundle.model, start)
        t0 = time.perf_counter()
        train_local(bundle, train, cfg.train, seed=r, cache=cache)
        times.append(time.perf_counter() - t0)
    cached = cache and any(cacheable(t) for t in bundle.towers.values())
    return times[0], min(times[1:]), len(train), cached


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fusions", nargs="+", default=["concat"],
                        choices=["concat", "gated", "late"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cnn_steady: dict[str, float] = {}  # fusion -> the CNN model's steady round (first model)
    for (name, model), fusion in itertools.product(MODELS.items(), args.fusions):
        overrides = [*model, f"model.fusion={fusion}"]
        if fusion == "gated" and load_config(model).model.projection_dim == 0:
            overrides.append("model.projection_dim=64")  # gates mix projections of one width
        first, steady, n, cached = site_round_seconds(overrides, args.rows, args.rounds, True)
        baseline = cnn_steady.setdefault(fusion, steady)
        line = {"figure": "site_round_s", "model": name, "fusion": fusion, "rows": n,
                "first_round_s": round(first, 2), "steady_round_s": round(steady, 2),
                "samples_per_s": round(3 * n / steady, 1),
                "ratio_to_cnn": round(steady / baseline, 2)}
        if cached:
            _, uncached, _, _ = site_round_seconds(overrides, args.rows, args.rounds, False)
            line["steady_round_s_without_cache"] = round(uncached, 2)
            line["cache_speedup"] = round(uncached / steady, 2)
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
