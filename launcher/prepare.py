"""A run's config, composed and checked before any Flower process starts.

`compose` gives the validated config of a new run (Hydra overrides) or of a run to resume (its
saved `config.json`); `prepare` makes its paths absolute, generates or finds the data, fixes the
label set and the noise multiplier, and runs the pre-flight checks (common/preflight.py: every
image and audio file decoded, test labels known to training, the device present, the output folder
writable), so that a bad value or a bad file stops the run here with one line. Both `fedmm train` and `python -m simulations.run` use them.
With DP on, `prepare` also prints the expected noise-to-signal ratio of one release (noise norm /
clipping norm, common/privacy.py::noise_to_signal) and warns when the noise outweighs the update.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

from common.adapter import adapter_state
from common.config import Config, from_json, load_config, packaged_defaults
from common.data import load_manifest
from common.preflight import (check_device, check_test_labels, check_trackers,
                              check_train_labels, check_writable)
from common.privacy import expected_sampled_sites, noise_to_signal, resolve_noise_multiplier
from common.rules import DP_SGD_OFF
from common.strategies import LORA_MODES
from common.task import cached_bundle, resolve_data
from launcher.processes import DeployError


def compose(overrides: list[str], resume_dir: Path | None = None) -> Config:
    """The run's validated config: Hydra overrides, or the saved config of a run to resume."""
    if resume_dir is None:
        return load_config(overrides)
    saved = resume_dir / "config.json"
    if not saved.is_file():
        raise DeployError(f"{saved}: not found; --resume takes a run folder")
    if overrides:
        raise DeployError("--resume continues a run with its saved config; drop the overrides")
    return replace(from_json(saved.read_text()), resume=True, output_dir=str(resume_dir))


def prepare(cfg: Config) -> Config:
    """Absolute paths, data resolved, noise solved, manifests loaded: the config to launch."""
    cfg = replace(cfg, output_dir=str(Path(cfg.output_dir).resolve()),
                  data=replace(cfg.data, demo_dir=str(Path(cfg.data.demo_dir).resolve())))
    cfg = resolve_noise_multiplier(resolve_data(cfg))
    if cfg.privacy.dp not in ("none", "local") and cfg.privacy.target_epsilon > 0:
        print(f"fedmm: noise multiplier {cfg.privacy.noise_multiplier:.4f} reaches "
              f"ε={cfg.privacy.target_epsilon} at δ={cfg.privacy.delta}", flush=True)
    used = cfg.model.modalities  # every image and clip decoded once, bad rows counted
    train_ds, _ = load_manifest(cfg.data.train, modalities=used)
    test_ds, _ = load_manifest(cfg.data.test, modalities=used)
    check_train_labels(train_ds, cfg.data.train)
    turned_off = dp_turned_off(cfg)
    if turned_off:
        print(f"fedmm: privacy.dp=local turns off {', '.join(turned_off)} (DP-SGD refuses them)",
              flush=True)
    noise_advice(cfg, site_train_rows(cfg, len(train_ds)))
    check_test_labels(cfg.data.labels, test_ds, cfg.data.test)
    check_device(cfg.device)
    check_writable(Path(cfg.output_dir))
    check_trackers(cfg.logging)
    return cfg


def dp_turned_off(cfg: Config) -> list[str]:
    """The local-training options of the packaged defaults that local DP-SGD runs without (its
    preset, privacy=local_dp, sets them off): "train.<key> (<default> -> <value>)" each."""
    if cfg.privacy.dp != "local":
        return []
    default = packaged_defaults()["train"]
    return [f"train.{key} ({default[key]:g} -> {value:g})" for key, value in vars(cfg.train).items()
            if key in DP_SGD_OFF and value != default[key]]


def site_train_rows(cfg: Config, train_rows: int) -> int:
    """The training rows of a site of average size (its partition less its held-out share)."""
    return round(train_rows / cfg.partition.num_clients * (1 - cfg.partition.holdout_fraction))


def noised_coordinates(cfg: Config) -> int:
    """How many numbers DP noises: the adapter state a site uploads (ffa keeps A home)."""
    uploads_a = LORA_MODES[cfg.strategy.lora_aggregation].uploads_a
    state = adapter_state(cached_bundle(cfg.model, cfg.data.labels).model)
    return sum(v.numel() for k, v in state.items() if uploads_a or ".lora_A." not in k)


def noise_advice(cfg: Config, site_examples: int) -> float:
    """Print one DP release's expected noise-to-signal ratio (warn above 1); return it."""
    p = cfg.privacy
    if p.dp == "none":
        return 0.0
    d = noised_coordinates(cfg)
    ratio = noise_to_signal(cfg, d, site_examples)
    per = (f"DP-SGD step of {cfg.train.batch_size} samples" if p.dp == "local" else
           f"round of {expected_sampled_sites(cfg):g} sites")
    print(f"fedmm: expected noise-to-signal ratio {ratio:.2f} (noise norm / clipping norm of one "
          f"{per}, {d:,} noised coordinates)", flush=True)
    if ratio > 1:
        more = ("train on larger batches (train.batch_size)" if p.dp == "local" else
                "sample more sites per round (partition.num_clients, strategy.fraction_train)")
        print(f"fedmm: warning: the noise outweighs the update ({ratio:.1f} > 1): {more}, "
              "noise fewer coordinates (strategy.lora_aggregation=ffa, model.lora.r, "
              "target_modules) or raise privacy.target_epsilon", file=sys.stderr, flush=True)
    return ratio
