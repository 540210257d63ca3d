"""fedmm ServerApp: runs Flower's FedAvg/FedProx over LoRA adapters for R rounds.

Each round: sample sites, send the global adapter and round config, screen and aggregate the
replies (server/strategy.py), evaluate the new global adapter on the held-out test split and
save it (server/report.py). Launch it with `python -m simulations.run` (simulation) or
`flwr run` against a SuperLink (deployment). With `resume=true` it continues the run in
`output_dir` after its last complete checkpoint (server/checkpoint.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from common import keys
from common.adapter import adapter_state
from common.config import CENTRAL_DP, Config, from_run_config
from common.model import Bundle
from common.privacy import num_sampled_sites, resolve_noise_multiplier
from common.task import cached_bundle, load_test_split, manifest_labels, prepare_manifests
from server.checkpoint import (META_FILE, last_checkpoint, load_strategy_state, restore_adapter,
                               restore_rng_state, restore_strategy_state)
from server.privacy import wrap_dp
from server.report import RunRecorder
from server.secagg import run_secagg
from server.strategy import ScreenedAggregation, make_strategy

app = ServerApp()


def round_config(cfg: Config, labels: list[str], train_manifest: Path) -> ConfigRecord:
    """What every site needs to run a round, besides the adapter."""
    s = cfg.strategy
    config = ConfigRecord({keys.LR: s.lr, keys.LOCAL_EPOCHS: s.local_epochs,
                           keys.BATCH_SIZE: s.batch_size, keys.WEIGHT_DECAY: s.weight_decay,
                           keys.ABSENT_CLASS_SCALE: s.absent_class_scale,
                           keys.MODALITY_DROPOUT_TEXT: s.modality_dropout_text,
                           keys.MODALITY_DROPOUT_IMAGE: s.modality_dropout_image,
                           keys.MAX_GRAD_NORM: s.max_grad_norm,
                           keys.LABEL_NAMES: labels, keys.TRAIN_MANIFEST: str(train_manifest),
                           keys.FREEZE_LORA_A: s.lora_aggregation == "ffa"})
    if s.proximal_mu > 0:  # the FedProx term composes with every server-side strategy
        config[keys.PROXIMAL_MU] = s.proximal_mu
    return config


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation and write the run folder."""
    cfg = from_run_config(str(context.run_config.get(keys.RUN_CONFIG, "")))
    cfg = resolve_noise_multiplier(cfg)  # a target ε fixes the noise multiplier, before any round
    train_manifest, test_manifest = prepare_manifests(cfg)
    labels = manifest_labels(train_manifest)
    bundle = cached_bundle(cfg.model, labels)
    initial = ArrayRecord(adapter_state(bundle.model))
    strategy = make_strategy(cfg.strategy, initial, cfg.model.lora.alpha)
    if cfg.privacy.dp in CENTRAL_DP:  # the DP wrappers weigh every reply alike
        strategy.modality_weighting = False
    done = resume(cfg, bundle, strategy) if cfg.resume else 0
    if done:
        initial = ArrayRecord(adapter_state(bundle.model))
    test = load_test_split(bundle, test_manifest)
    recorder = RunRecorder(cfg, Path(cfg.output_dir), bundle, test, strategy.round_stats,
                           strategy, resume_round=done)

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        state = {k: v.numpy() for k, v in arrays.items()}
        return MetricRecord(recorder.evaluate_round(server_round, state, strategy.residuals))

    config = round_config(cfg, labels, train_manifest)
    if cfg.privacy.secagg:  # Flower's legacy SecAgg+ workflow (server/secagg.py)
        run_secagg(grid, context, cfg, {k: v.numpy() for k, v in initial.items()}, dict(config),
                   strategy.round_stats, recorder.evaluate_round)
        recorder.finish(num_clients=len(list(grid.get_node_ids())))
        return
    runner = wrap_dp(strategy, cfg, num_sampled_sites(cfg))
    runner.start(grid=grid, initial_arrays=initial, num_rounds=cfg.strategy.rounds,
                 start_round=done + 1, timeout=cfg.simulation.timeout_s, train_config=config,
                 evaluate_config=config, evaluate_fn=evaluate_fn)
    num_nodes = len(list(grid.get_node_ids()))
    recorder.finish(num_clients=num_nodes)


def resume(cfg: Config, bundle: Bundle, strategy: ScreenedAggregation) -> int:
    """Load the run's last complete checkpoint into model, strategy and RNGs; its round."""
    found = last_checkpoint(Path(cfg.output_dir))
    if found is None:
        print(f"[fedmm] resume: no complete round in {cfg.output_dir}; starting at round 1",
              flush=True)
        return 0
    done, folder = found
    restore_adapter(bundle, folder)
    restore_strategy_state(strategy, load_strategy_state(folder))
    restore_rng_state(json.loads((folder / META_FILE).read_text())["rng"])
    print(f"[fedmm] resume: continuing after round {done} from {folder}", flush=True)
    return done
