"""Property test: malformed replies never crash aggregation nor touch the global adapter."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common import keys
from server.strategy import make_strategy
from tests.conftest import start_round, strategy_cfg

SHAPES = {"m.q.lora_A.weight": (2, 6), "m.q.lora_B.weight": (5, 2), "m.head.weight": (3,)}
NAMES = ["fedavg", "fedadam", "fedmedian", "krum", "normbounded"]
CONFIGS = {name: strategy_cfg(name, num_malicious=0) for name in NAMES}
GLOBAL = {k: np.arange(np.prod(s), dtype=np.float32).reshape(s) / 10 for k, s in SHAPES.items()}


def _malformed(draw) -> tuple[dict, float]:
    """Draw an adapter state and num-examples with at least one defect."""
    state = {k: v.copy() for k, v in GLOBAL.items()}
    defect = draw(st.sampled_from(["nan", "inf", "shape", "missing", "extra", "dtype",
                                   "examples", "rank"]))
    key = draw(st.sampled_from(sorted(SHAPES)))
    examples = float(draw(st.integers(1, 1000)))
    if defect in ("nan", "inf"):
        flat = state[key].reshape(-1)
        flat[draw(st.integers(0, flat.size - 1))] = np.nan if defect == "nan" else np.inf
    elif defect == "shape":
        state[key] = np.zeros(tuple(d + draw(st.integers(1, 3)) for d in SHAPES[key]),
                              np.float32)
    elif defect == "missing":
        del state[key]
    elif defect == "extra":
        state[draw(st.text("abc.", min_size=1, max_size=12)) + ".x"] = np.zeros(2, np.float32)
    elif defect == "dtype":
        state[key] = state[key].astype(draw(st.sampled_from([np.int32, np.int64, np.bool_])))
    elif defect == "examples":
        examples = draw(st.sampled_from([0.0, -5.0, float("nan"), float("inf")]))
    else:  # a LoRA factor of another rank
        state["m.q.lora_A.weight"] = np.zeros((3, 6), np.float32)
    return state, examples


@pytest.mark.usefixtures("flower_task_identity")
@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(st.data(), st.sampled_from(NAMES))
def test_malformed_reply_is_rejected_and_global_state_untouched(data, name):
    cfg = CONFIGS[name]
    initial = ArrayRecord({k: Array(v.copy()) for k, v in GLOBAL.items()})
    strategy = make_strategy(cfg, initial)
    start_round(strategy, 1, GLOBAL)
    state, examples = _malformed(data.draw)
    instruction = Message(RecordDict({keys.CONFIG: ConfigRecord()}), dst_node_id=1,
                          message_type="train")
    reply = Message(RecordDict({
        keys.ARRAYS: ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()}),
        keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: examples, keys.TRAIN_LOSS: 1.0})}),
        reply_to=instruction)
    arrays, _ = strategy.aggregate_train(1, [reply])
    assert arrays is None  # nothing to aggregate: the caller keeps the global adapter
    assert strategy.round_stats[1].rejected == 1
    for k, v in GLOBAL.items():  # the strategy's own copy of the global adapter is untouched
        np.testing.assert_array_equal(strategy.global_state[k], v)
    snapshot = strategy.snapshot()  # and nothing of the reply reached the aggregation state
    assert snapshot.node_ranks == {} and snapshot.residuals == {}
    assert snapshot.global_delta == {} and snapshot.optimizer == {}
