"""Bytes per site-round: upload and download, and their ratio to the backbone's bytes.

    python -m benchmarks.bytes [--topk-fraction 0.05]

One JSON line per (LoRA aggregation mode, compression setting) on the default model: what a site
uploads (the reply's ArrayRecord, `count_bytes()`, exactly what metrics.jsonl counts) and what
it downloads (the train message's ArrayRecords: the global adapter, plus the base-weight
residuals in `exact` mode), each also as a share of the frozen backbone's bytes. The update is
a real one: one local training run of one default site from the initial adapter.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from benchmarks.measure import emit
from common.adapter import adapter_state, to_numpy
from common.compression import COMPRESSIONS, compress
from common.config import load_config
from common.lora_math import delta_w, lora_pairs
from common.model import backbone_bytes, build_model
from common.strategies import LORA_AGGREGATIONS, LORA_MODES
from common.task import resolve_data, site_data
from common.train import train_local


def record_bytes(state: dict[str, np.ndarray]) -> int:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()}).count_bytes()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--topk-fraction", type=float, default=None,
                   help="default: strategy.topk_fraction of the packaged config")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = resolve_data(load_config(["train.epochs=1"]))
    fraction = args.topk_fraction or cfg.strategy.topk_fraction
    bundle = build_model(cfg.model, list(cfg.data.labels))
    backbone = backbone_bytes(bundle.model)
    initial = to_numpy(adapter_state(bundle.model))
    train, _ = site_data(cfg, train_manifest=cfg.data.train, partition_id=0)
    train_local(bundle, train, cfg.train, seed=0)
    local = to_numpy(adapter_state(bundle.model))
    scaling = cfg.model.lora.alpha / cfg.model.lora.r
    residuals = {prefix: delta_w(initial, prefix, scaling).astype(np.float32)  # (out, in)
                 for prefix in lora_pairs(initial)}
    emit(figure="backbone", backbone_bytes=backbone, adapter_numbers=int(
        sum(v.size for v in initial.values())), adapter_tensors=len(initial))
    for mode in LORA_AGGREGATIONS:
        uploaded = {k: v for k, v in local.items()
                    if LORA_MODES[mode].uploads_a or ".lora_A." not in k}
        down = record_bytes(initial) + (record_bytes(residuals) if mode == "exact" else 0)
        plain = record_bytes(uploaded)
        for compression in COMPRESSIONS:
            if compression == "none":
                up = plain
            else:
                delta = {k: v - initial[k] for k, v in uploaded.items()}
                payload, _ = compress(delta, compression, np.random.default_rng(0), fraction)
                up = record_bytes(payload)
            emit(figure="bytes per site-round", lora_aggregation=mode, compression=compression,
                 topk_fraction=fraction if compression == "topk" else None,
                 upload_bytes=up, download_bytes=down,
                 upload_of_backbone_pct=round(100 * up / backbone, 4),
                 download_of_backbone_pct=round(100 * down / backbone, 4),
                 upload_reduction=round(plain / up, 2),
                 goal={"int8": ">= 3.5x", "int4": ">= 7x", "topk": ">= 7x"}.get(compression))


if __name__ == "__main__":
    main()
