"""A run's config, composed and checked before any Flower process starts.

`compose` gives the validated config of a new run (Hydra overrides) or of a run to resume (its
saved `config.json`); `prepare` makes its paths absolute, generates or finds the data, fixes the
label set and the noise multiplier, and runs the pre-flight checks (common/preflight.py: every
image and audio file decoded, test labels known to training, the device present, the output folder
writable), so that a bad value or a bad file stops the run here with one line. Both `fedmm train` and `python -m simulations.run` use them.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from common.config import Config, from_json, load_config
from common.data import load_manifest
from common.preflight import (check_device, check_test_labels, check_trackers,
                              check_train_labels, check_writable)
from common.privacy import resolve_noise_multiplier
from common.task import resolve_data
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
    check_test_labels(cfg.data.labels, test_ds, cfg.data.test)
    check_device(cfg.device)
    check_writable(Path(cfg.output_dir))
    check_trackers(cfg.logging)
    return cfg
