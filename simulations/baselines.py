"""Baselines on the same split as a federated run: centralized and local-only training.

    centralized  all sites' training data pooled; the same model, the same `TrainConfig` and the
                 same number of training samples processed as the federation (rounds x epochs
                 passes over the pooled data when every site trains every round).
    local        every site trains alone for rounds x epochs epochs on its own data;
                 each is evaluated on the server's test split (mean and worst site reported).

Both run in-process through the same common/ code the ClientApp uses, so the only difference
from the federation is the absence of aggregation.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from common.config import Config
from common.encoded import Encoded
from common.model import build_model
from common.task import load_test_split, site_data
from common.train import evaluate, pick_device, train_local


def _sites(cfg: Config) -> list[Encoded]:
    return [site_data(cfg, train_manifest=str(cfg.data.train), partition_id=i)[0]
            for i in range(cfg.partition.num_clients)]


def centralized(cfg: Config) -> dict[str, float]:
    """Train one model on all sites' data pooled; evaluate on the test split."""
    s = cfg.strategy
    epochs = max(1, round(s.rounds * cfg.train.epochs * s.fraction_train))
    bundle = build_model(cfg.model, list(cfg.data.labels))
    pooled = Encoded.concat(_sites(cfg))
    train_local(bundle, pooled, replace(cfg.train, epochs=epochs, proximal_mu=0.0),
                seed=cfg.seed, device=pick_device(cfg.device))
    result = evaluate(bundle, load_test_split(cfg))
    return {"centralized_accuracy": result["accuracy"], "centralized_macro_f1": result["macro_f1"]}


def local(cfg: Config) -> dict[str, float]:
    """Train each site alone; report mean and worst test accuracy over sites."""
    sites, test = _sites(cfg), load_test_split(cfg)
    train = replace(cfg.train, epochs=cfg.strategy.rounds * cfg.train.epochs, proximal_mu=0.0)
    accuracies = []
    for i, data in enumerate(sites):
        bundle = build_model(cfg.model, list(cfg.data.labels))  # every site starts the same
        train_local(bundle, data, train, seed=cfg.seed * 1000 + i, device=pick_device(cfg.device))
        accuracies.append(evaluate(bundle, test)["accuracy"])
    return {"local_mean_accuracy": float(np.mean(accuracies)),
            "local_worst_accuracy": float(np.min(accuracies)),
            "local_accuracies": [float(a) for a in accuracies]}


BASELINES = {"centralized": centralized, "local": local}
