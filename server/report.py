"""What a run leaves on disk: per-round metrics, the global adapter, and summary.json.

    RUN_DIR/
      config.json            the validated config the ServerApp ran with
      metrics.jsonl          one JSON object per round (round 0 = the initial adapter)
      adapters/round-NNN/    the global adapter after round N (PEFT format + labels.json)
                             + server_state.safetensors (optimizer moments, residuals, ranks)
                             + checkpoint.json (round, RNG states): what `resume=true` reads
      adapter/               the final global adapter (same format)
      per_site.png           per-site held-out accuracy (with federated evaluation;
                             server/site_report.py)
      summary.json           the run's one machine-readable result; `status` is `failed`
                             (with `failure`, one line) when fewer than
                             strategy.min_completed_rounds rounds aggregated an update
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from common.adapter import apply_base_residuals, set_adapter_state
from common.config import Config, StrategyConfig, to_json
from common.encoded import Encoded
from common.files import write_json_atomic
from common.model import Bundle, backbone_bytes, save_adapter
from common.train import evaluate
from server.checkpoint import last_checkpoint, save_strategy_state, write_meta
from server.privacy import privacy_metrics
from server.site_report import PLOT, plot_sites, site_columns, site_outcome
from server.strategy import RoundStats, ScreenedStrategy, StrategyState
from server.tracking import Trackers

log = logging.getLogger("fedmm.server")


def save_adapter_atomic(bundle: Bundle, out_dir: Path, residuals: dict | None = None,
                        state: StrategyState | None = None, server_round: int | None = None
                        ) -> Path:
    """Write an adapter folder so that a reader sees the old one or the new one, never half.

    With `state` and `server_round` it is a checkpoint: strategy state and checkpoint.json
    are written inside the temp folder before the rename.
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        save_adapter(bundle, tmp, residuals)
        if state is not None:
            save_strategy_state(state, tmp)
        _test_fault(server_round)
        if server_round is not None:
            write_meta(tmp, server_round)
        old = out_dir.with_name(f".{out_dir.name}-old")
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed write leaves nothing behind
    shutil.rmtree(old, ignore_errors=True)
    return out_dir


def _test_fault(server_round: int | None) -> None:
    """Test-only hooks (tests/faults), mid-way through a checkpoint: a slow write, a full disk."""
    if server_round is None:
        return
    if os.environ.get("FEDMM_TEST_DISK_FULL_ROUND") == str(server_round):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    time.sleep(float(os.environ.get("FEDMM_TEST_SLOW_CHECKPOINT_S", "0")))


class CheckpointError(RuntimeError):
    """A round's checkpoint could not be written (full disk, permissions); earlier ones stand."""


class RunRecorder:
    """Evaluates the global adapter each round and writes everything a run leaves behind."""

    def __init__(self, cfg: Config, run_dir: Path, bundle: Bundle, test: Encoded,
                 strategy: ScreenedStrategy, resume_round: int = 0):
        self.cfg, self.run_dir, self.bundle, self.test = cfg, run_dir, bundle, test
        self.round_stats, self.strategy = strategy.round_stats, strategy
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(json.loads(to_json(cfg)), indent=2))
        self.metrics_path = run_dir / "metrics.jsonl"
        self.rows = kept_rows(self.metrics_path, resume_round) if resume_round else []
        self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        self.rows = [{k: (math.nan if v is None else v) for k, v in r.items()} for r in self.rows]
        self.started = time.monotonic() - (self.rows[-1]["elapsed_s"] if self.rows else 0.0)
        self.trackers = Trackers(cfg, run_dir)  # logging=[tensorboard, mlflow]

    def evaluate_round(self, server_round: int, state: dict) -> dict[str, float]:
        """Load the global adapter, evaluate it on the test split, save it, log one line."""
        set_adapter_state(self.bundle.model, state)
        apply_base_residuals(self.bundle.model, self.strategy.state.residuals)
        evaluating = time.monotonic()
        result = evaluate(self.bundle, self.test)
        evaluate_s = round(time.monotonic() - evaluating, 4)
        stats = self.round_stats.get(server_round, RoundStats())
        row = {"round": server_round, "sampled": stats.sampled, "replied": stats.replied,
               "rejected": stats.rejected, "bytes_uploaded": stats.bytes_uploaded,
               "train_loss": stats.train_loss, "test_loss": result["loss"],
               "site_train_s": _mean(stats.site_seconds),
               "site_train_s_max": max(stats.site_seconds, default=math.nan),
               "test_accuracy": result["accuracy"], "test_macro_f1": result["macro_f1"],
               "elapsed_s": round(time.monotonic() - self.started, 2),
               "aggregated": stats.aggregated, "reasons": stats.reasons,
               **stats.timings(), "evaluate_s": evaluate_s,
               **privacy_metrics(self.cfg, self.strategy.state.dp_releases, stats),
               **site_columns(self.cfg, stats.sites)}
        self.rows.append(row)
        with self.metrics_path.open("a") as f:
            f.write(json.dumps({k: (None if isinstance(v, float) and math.isnan(v) else v)
                                for k, v in row.items()}) + "\n")
        self.trackers.log_round(row)
        if server_round > 0:
            self.checkpoint(server_round)
        print(progress_line(row, self.cfg.strategy.rounds), flush=True)
        return {"test_loss": result["loss"], "test_accuracy": result["accuracy"],
                "test_macro_f1": result["macro_f1"]}

    def checkpoint(self, server_round: int) -> None:
        """Write the round's checkpoint; on failure say which one is intact, in one line."""
        folder = self.run_dir / "adapters" / f"round-{server_round:03d}"
        try:
            save_adapter_atomic(self.bundle, folder, self.strategy.state.residuals,
                                self.strategy.snapshot(), server_round)
        except OSError as err:
            found = last_checkpoint(self.run_dir)
            intact = (f"round {found[0]}'s checkpoint {found[1]} is intact" if found
                      else "no earlier checkpoint")
            raise CheckpointError(f"{folder}: checkpoint not written ({err.strerror or err}); "
                                  f"{intact}; fix and resume the run") from None

    def finish(self, num_clients: int) -> dict:
        """Save the final adapter and write summary.json."""
        adapter_dir = save_adapter_atomic(self.bundle, self.run_dir / "adapter",
                                          self.strategy.state.residuals)
        shutil.copy(self.run_dir / "config.json", adapter_dir / "config.json")  # self-contained
        last = self.rows[-1]
        trained = [r for r in self.rows if r["round"] > 0]
        total_up = sum(r["bytes_uploaded"] for r in trained)
        replies = sum(r["replied"] for r in trained)
        summary = {
            "test_accuracy": last["test_accuracy"], "test_macro_f1": last["test_macro_f1"],
            "test_loss": last["test_loss"], "rounds": len(trained), "num_clients": num_clients,
            "bytes_uploaded": total_up,
            "bytes_uploaded_per_client_round": total_up / replies if replies else 0,
            "backbone_bytes": backbone_bytes(self.bundle.model),
            "rejected_updates": sum(r["rejected"] for r in trained),
            # a site-round's training seconds: round 1 fills the stem caches, later rounds reuse
            "site_train_s_first": _finite(trained[0].get("site_train_s")) if trained else None,
            "site_train_s_steady": _finite(_mean([r["site_train_s"] for r in trained[1:]
                                                  if _finite(r.get("site_train_s"))])),
            "rounds_without_updates": sum(1 for r in trained if not aggregated(r)),
            "wall_time_s": round(time.monotonic() - self.started, 2),
            "adapter_dir": str(adapter_dir.resolve()),
            "strategy": self.cfg.strategy.name,
            "lora_aggregation": self.cfg.strategy.lora_aggregation,
            "partition": asdict(self.cfg.partition),
            "seed": self.cfg.seed,
            "privacy": asdict(self.cfg.privacy),
            **{k: last[k] for k in ("epsilon", "delta") if k in last},
            **outcome(trained, self.cfg.strategy),
            **site_outcome(self.cfg, self.rows),
        }
        plot_sites(self.run_dir / PLOT, self.rows)
        write_json_atomic(self.run_dir / "summary.json", summary)
        self.trackers.finish(summary, self.run_dir / "summary.json")
        return summary


def aggregated(row: dict) -> bool:
    """Whether a metrics row's round produced a new global adapter."""
    return bool(row.get("aggregated", row["replied"] > 0))  # rows written before the flag


def outcome(trained: list[dict], cfg: StrategyConfig) -> dict:
    """The run's status from its rounds' rows: `failed` when too few aggregated an update."""
    done = [r for r in trained if aggregated(r)]
    needed = cfg.min_completed_rounds or cfg.rounds
    result = {"status": "completed" if len(done) >= needed else "failed",
              "completed_rounds": len(done), "min_completed_rounds": needed,
              "round_reasons": {str(r["round"]): r["reasons"] for r in trained if r.get("reasons")}}
    if len(done) < needed:
        lost = [r for r in trained if not aggregated(r)]
        why = "; ".join(f"round {r['round']}: {_gist(r.get('reasons') or [])}" for r in lost[:3])
        more = f"; ... ({len(lost)} rounds in all)" if len(lost) > 3 else ""
        untrained = (". The reported test accuracy is the untrained initial adapter's"
                     if not done else "")
        result["failure"] = (f"{len(done)} of {len(trained)} rounds aggregated an update, fewer "
                             f"than strategy.min_completed_rounds={needed}: {why}{more}{untrained}")
    return result


def _gist(reasons: list[str]) -> str:
    if not reasons:
        return "no usable update"
    return " ".join(reasons[0].split()) + (f" (+{len(reasons) - 1} more)" if len(reasons) > 1
                                           else "")


def _finite(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else value


def _mean(values: list[float]) -> float:
    return round(sum(values) / len(values), 3) if values else math.nan


def kept_rows(metrics_path: Path, last_round: int) -> list[dict]:
    """Resuming after `last_round`: the metrics rows up to it (later ones were not checkpointed)."""
    if not metrics_path.is_file():
        return []
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["round"] <= last_round]


def progress_line(row: dict, rounds: int) -> str:
    """One human line per round."""
    loss = "   -  " if math.isnan(row["train_loss"]) else f"{row['train_loss']:.3f}"
    return (f"[fedmm] round {row['round']:>3}/{rounds} | clients {row['replied']}/"
            f"{row['sampled']} (rejected {row['rejected']}) | train loss {loss} | "
            f"test acc {row['test_accuracy']:.3f} f1 {row['test_macro_f1']:.3f} | "
            f"{_sites_note(row)}{row['elapsed_s']:.1f}s{_untrained_note(row)}")


def _sites_note(row: dict) -> str:
    if not row.get("sites"):
        return ""
    return (f"sites acc mean {row['site_accuracy_mean']:.3f} worst "
            f"{row['site_accuracy_worst']:.3f} ({row['site_accuracy_worst_site']}) | ")


def _untrained_note(row: dict) -> str:
    if row["round"] == 0:
        return " | initial adapter, untrained"
    return "" if aggregated(row) else " | no update aggregated: global adapter unchanged"
