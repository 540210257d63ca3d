"""Run a fedmm federation on Flower's simulation engine from the Hydra config tree.

    python -m simulations.run                                   # the default demo federation
    python -m simulations.run strategy=fedprox partition.alpha=0.1 partition.num_clients=8
    python -m simulations.run data=manifest data.train=/d/train.csv data.test=/d/test.csv

Composes and validates the config first (a bad value stops here, in about a second, with one
line naming the key: torch, PEFT and the datasets stack are imported only after), then
simulations/federation.py prepares the data, checks the split and runs the federation; prints
the run's summary.json. A run that did not complete, or in which fewer than
`strategy.min_completed_rounds` rounds aggregated an update, exits non-zero with one line saying
why (launcher/outcome.py).
"""

from __future__ import annotations

import json
import signal
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from common.config import CONF_DIR, ConfigError, validate
from launcher.processes import DeployError


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through run_app's teardown of Flower and Ray


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(raw: DictConfig) -> None:
    """Hydra entry point (also the `fedmm-simulate` console script)."""
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        raw.output_dir = HydraConfig.get().runtime.output_dir  # one folder per (multi)run job
        cfg = validate(raw)
    except ConfigError as err:
        sys.exit(f"fedmm: {err}")
    from common.data import ManifestError  # the heavy imports, once the config is valid
    from simulations import federation

    try:
        summary = federation.launch(federation.prepare(cfg))
    except (ConfigError, ManifestError, DeployError) as err:
        sys.exit(f"fedmm: {err}")
    if cfg.baselines:
        summary = federation.add_baselines(cfg, summary)
    print(json.dumps(summary, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
