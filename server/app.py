"""fedmm ServerApp: runs a Flower strategy over LoRA adapters for R rounds.

Each round: sample sites, send the global adapter (the sites read everything else from the run
config), screen and aggregate the replies (server/strategy.py), evaluate the new global adapter
on the held-out test split and save it (server/report.py). Launch it with
`python -m simulations.run` (simulation) or `fedmm train` against a SuperLink (deployment). With
`resume=true` it continues the run in `output_dir` after its last complete checkpoint
(server/checkpoint.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from common import keys
from common.adapter import adapter_state
from common.config import Config, from_run_config
from common.model import Bundle
from common.privacy import num_sampled_sites, resolve_noise_multiplier
from common.task import cached_bundle, load_test_split, resolve_data
from server.checkpoint import (META_FILE, discard_partial, last_checkpoint, load_strategy_state,
                               restore_adapter, restore_rng_state)
from server.privacy import dp_wrapper
from server.progress import ProgressGrid
from server.report import RunRecorder
from server.secagg import run_secagg
from server.strategy import ScreenedStrategy, make_strategy

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation and write the run folder."""
    cfg = from_run_config(str(context.run_config.get(keys.RUN_CONFIG, "")))
    cfg = resolve_noise_multiplier(resolve_data(cfg))  # a target ε fixes z before any round
    bundle = cached_bundle(cfg.model, cfg.data.labels)
    initial = ArrayRecord(adapter_state(bundle.model))
    strategy = make_strategy(cfg, initial, wrap=dp_wrapper(cfg, num_sampled_sites(cfg)))
    done = resume(cfg, bundle, strategy) if cfg.resume else 0
    if done:
        initial = ArrayRecord(adapter_state(bundle.model))
    test = load_test_split(cfg)
    recorder = RunRecorder(cfg, Path(cfg.output_dir), bundle, test, strategy, resume_round=done)

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        state = {k: v.numpy() for k, v in arrays.items()}
        return MetricRecord(recorder.evaluate_round(server_round, state))

    if cfg.privacy.secagg:  # Flower's legacy SecAgg+ workflow (server/secagg.py)
        run_secagg(grid, context, cfg, {k: v.numpy() for k, v in initial.items()},
                   strategy.round_stats, recorder.evaluate_round)
    else:
        strategy.start(grid=ProgressGrid(grid, cfg.strategy.rounds), initial_arrays=initial,
                       num_rounds=cfg.strategy.rounds, start_round=done + 1,
                       timeout=cfg.strategy.round_timeout_s,
                       evaluate_fn=evaluate_fn)
    recorder.finish(num_clients=len(list(grid.get_node_ids())))


def resume(cfg: Config, bundle: Bundle, strategy: ScreenedStrategy) -> int:
    """Load the run's last complete checkpoint into model, strategy and RNGs; its round."""
    found = last_checkpoint(Path(cfg.output_dir))
    if found is None:
        print(f"[fedmm] resume: no complete round in {cfg.output_dir}; starting at round 1",
              flush=True)
        return 0
    done, folder = found
    for partial in discard_partial(Path(cfg.output_dir)):
        print(f"[fedmm] resume: removed the half-written {partial.name}", flush=True)
    restore_adapter(bundle, folder)
    strategy.restore(load_strategy_state(folder))
    restore_rng_state(json.loads((folder / META_FILE).read_text())["rng"])
    print(f"[fedmm] resume: continuing after round {done} from {folder}", flush=True)
    return done
