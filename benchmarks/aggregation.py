"""Server cost of one round: screen and aggregate N adapters vs the same rule in plain NumPy.

    python -m benchmarks.aggregation [--sites 100] [--reps 3]

For naive/ffa/exact LoRA aggregation under FedAvg and for FedMedian (robust), one JSON line:
seconds for `ScreenedStrategy.aggregate_train` on N real Flower reply Messages of the default
adapter's layout (screening, LoRA handling and Flower's aggregation included), seconds for the
same rule written directly in NumPy on the replies stacked as (N, ...) arrays, and their ratio
(goal <= 1.5x). Times are the best of `--reps` runs (fresh Messages each run, the two sides
alternating): on a shared machine the least disturbed run is the truest.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from benchmarks.measure import emit
from common import keys
from common.adapter import adapter_state, to_numpy
from common.config import load_config
from common.lora_math import lora_pairs
from common.model import build_model
from common.task import resolve_data
from server.strategy import make_strategy

CASES = {  # name -> (strategy, lora_aggregation)
    "fedavg naive": ("fedavg", "naive"),
    "fedavg ffa": ("fedavg", "ffa"),
    "fedavg exact": ("fedavg", "exact"),
    "fedmedian": ("fedmedian", "naive"),
}


def numpy_rule(case: str, stacked: dict[str, np.ndarray], weights: np.ndarray,
               scaling: float) -> dict[str, np.ndarray]:
    """The aggregation rule of `case` on (N, ...) stacked replies, written directly."""
    if case == "fedmedian":
        return {k: np.median(v, axis=0) for k, v in stacked.items()}
    p = weights / weights.sum()  # (N,)
    mean = {k: np.tensordot(p, v, axes=1) for k, v in stacked.items()}
    if case == "fedavg exact":  # residual Σ p_k s B_k A_k − s B̄ Ā per LoRA layer
        for prefix, (a_key, b_key) in lora_pairs(stacked).items():
            a, b = stacked[a_key], stacked[b_key]  # (N, r, in, ...), (N, out, r, ...)
            n, r = a.shape[:2]
            a2, b2 = a.reshape(n, r, -1), b.reshape(n, b.shape[1], r)  # (N, r, I), (N, O, r)
            mixed = ((p[:, None, None] * b2).transpose(1, 0, 2).reshape(b2.shape[1], n * r)
                     @ a2.reshape(n * r, -1))  # Σ_k p_k B_k A_k as one matmul: (O, I)
            mean[prefix] = scaling * (mixed - mean[b_key].reshape(b2.shape[1:])
                                      @ mean[a_key].reshape(a2.shape[1:]))
    return mean


def replies(states: list[dict[str, np.ndarray]], weights: np.ndarray) -> list[Message]:
    instruction = Message(RecordDict({keys.CONFIG: ConfigRecord()}), dst_node_id=1,
                          message_type="train")
    return [Message(RecordDict({
        keys.ARRAYS: ArrayRecord({k: Array(v) for k, v in s.items()}),
        keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: float(w), keys.TRAIN_LOSS: 1.0})}),
        reply_to=instruction) for s, w in zip(states, weights)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sites", type=int, default=100)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    base = resolve_data(load_config([]))
    initial = to_numpy(adapter_state(build_model(base.model, list(base.data.labels)).model))
    rng = np.random.default_rng(0)
    states = [{k: v + 0.01 * rng.standard_normal(v.shape, np.float32) for k, v in initial.items()}
              for _ in range(args.sites)]
    weights = rng.integers(50, 250, args.sites).astype(np.float64)
    scaling = base.model.lora.alpha / base.model.lora.r
    for case, (name, mode) in CASES.items():
        cfg = load_config([f"strategy={name}", f"strategy.lora_aggregation={mode}",
                           f"strategy.min_train_nodes={min(args.sites, 2)}"])
        sent = [{k: v for k, v in s.items() if mode != "ffa" or ".lora_A." not in k}
                for s in states]
        ours, theirs = [], []
        for _ in range(args.reps):
            strategy = make_strategy(cfg, ArrayRecord({k: Array(v) for k, v in initial.items()}))
            messages = replies(sent, weights)
            start = time.perf_counter()
            arrays, _ = strategy.aggregate_train(1, messages)
            ours.append(time.perf_counter() - start)
            assert arrays is not None and strategy.round_stats[1].replied == args.sites
            stacked = {k: np.stack([s[k] for s in sent]) for k in sent[0]}  # (N, ...)
            start = time.perf_counter()
            numpy_rule(case, stacked, weights, scaling)
            theirs.append(time.perf_counter() - start)
        t_ours, t_numpy = min(ours), min(theirs)
        emit(figure="aggregation", case=case, sites=args.sites,
             numbers_per_adapter=int(sum(v.size for v in sent[0].values())),
             fedmm_s=round(t_ours, 4), numpy_s=round(t_numpy, 4),
             ratio=round(t_ours / t_numpy, 2), goal="<= 1.5x")


if __name__ == "__main__":
    main()
