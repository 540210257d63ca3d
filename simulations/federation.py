"""A fedmm federation on Flower's simulation engine, for a validated config.

`prepare(cfg)` resolves paths, generates or checks the data and checks the split (a bad value
or a bad file stops here, before any training, with one line), writes the partition report;
`launch(cfg)` runs the ServerApp/ClientApp of this repository through `flwr run` and returns the
run's summary (DeployError when it did not complete, or when fewer than
`strategy.min_completed_rounds` rounds aggregated an update: launcher/outcome.py);
`add_baselines` trains the configured baselines on the same split. `python -m simulations.run`
is the command line.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from common import keys
from common.config import Config, to_json
from common.data import load_manifest
from common.files import write_json_atomic
from common.partition import OTHER, label_counts, natural_sites, partition_indices, site_names
from common.task import has_skew, site_data
from launcher.outcome import run_summary
from launcher.prepare import prepare as prepare_run
from launcher.simulation import run_app
from simulations.baselines import BASELINES
from simulations.partition_report import write_partition_report

APP_DIR = Path(__file__).resolve().parent.parent  # the Flower app: pyproject.toml + packages


def prepare(cfg: Config) -> Config:
    """Resolve paths, generate or check the data, and check the split before any training."""
    cfg = prepare_run(cfg)
    train_ds, _ = load_manifest(cfg.data.train, modalities=cfg.model.modalities)
    parts = partition_indices(train_ds, cfg.partition, cfg.seed)
    names = list(cfg.data.labels)
    small = None
    if cfg.partition.name == "natural":
        plan = natural_sites(train_ds, cfg.partition)
        small = plan.report()
        print(f"fedmm: natural split by column {cfg.partition.column!r}: {len(plan.site_of)} "
              f"values -> {len(plan.names)} sites ({len(plan.merged)} merged into "
              f"{OTHER!r}, {len(plan.dropped)} dropped with {plan.dropped_rows} rows)",
              flush=True)
    counts = label_counts(train_ds, parts, names)
    if cfg.train.absent_class_scale < 1:
        print(restricted_softmax_note(cfg.train.absent_class_scale, counts), flush=True)
    write_partition_report(Path(cfg.output_dir), names, counts,
                           [len(p) for p in parts], modality=site_skews(cfg, names),
                           site_names=site_names(train_ds, cfg.partition), small_sites=small)
    return cfg


def restricted_softmax_note(scale: float, counts: list[dict[str, int]]) -> str:
    """The run log's line on where FedRS's restricted softmax acts: at the sites that lack a
    class (each site's own label set decides it; with every class everywhere it is inert)."""
    lacking = [i for i, site in enumerate(counts) if min(site.values()) == 0]
    where = (f"acts at the {len(lacking)} of {len(counts)} sites that lack a class "
             f"({', '.join(map(str, lacking))})" if lacking else
             f"is inert: each of the {len(counts)} sites holds every class")
    return f"fedmm: restricted softmax (train.absent_class_scale={scale:g}) {where}"


def site_skews(cfg: Config, names: list[str]) -> list[dict] | None:
    """Per site: modality availability and realised skews (None when no skew is set)."""
    if not has_skew(cfg):
        return None
    out = []
    for site in range(cfg.partition.num_clients):
        train, val, stats = site_data(cfg, train_manifest=str(cfg.data.train),
                                      partition_id=site, with_stats=True)
        present = {f"{m}_present": float(torch.cat([train.has(m), val.has(m)]).float().mean())
                   for m in cfg.model.modalities}
        out.append({**present, **stats})
    return out


def launch(cfg: Config) -> dict:
    """Run the federation for a prepared config; return its summary (DeployError if it failed:
    Flower's run did not complete, or too few rounds aggregated an update)."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    federation = {"num-supernodes": cfg.partition.num_clients,
                  "client-resources-num-cpus": cfg.simulation.client_num_cpus,
                  "client-resources-num-gpus": float(cfg.simulation.client_num_gpus)}
    run = run_app(APP_DIR, {keys.RUN_CONFIG: to_json(cfg)}, federation,
                  timeout=cfg.simulation.timeout_s, log_path=out / "flower.log",
                  env_extra={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                             "TOKENIZERS_PARALLELISM": "false"})
    summary = run_summary(run, out, resume=f"resume with resume=true output_dir={out}")
    if summary["rounds_without_updates"]:
        print(f"fedmm: warning: {summary['rounds_without_updates']} round(s) got no usable "
              f"update (see 'rejected' in {out / 'metrics.jsonl'})", file=sys.stderr)
    return summary


def add_baselines(cfg: Config, summary: dict) -> dict:
    """Train the configured baselines on the same split; add them and the gap to the summary."""
    for name in cfg.baselines:
        print(f"fedmm: training the {name} baseline", flush=True)
        summary.update(BASELINES[name](cfg))
    if "centralized_accuracy" in summary and summary["centralized_accuracy"] > 0:
        summary["federated_gap"] = summary["test_accuracy"] / summary["centralized_accuracy"]
    write_json_atomic(Path(cfg.output_dir) / "summary.json", summary)
    return summary
