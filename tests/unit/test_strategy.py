"""The server's strategy: Flower's FedAvg over screened replies, checked against NumPy."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from common import keys

pytestmark = pytest.mark.usefixtures("flower_task_identity")
from common.config import Config
from server.strategy import make_strategy
from tests.conftest import strategy_cfg

SHAPES = {"lora_A": (2, 4), "lora_B": (4, 2), "head": (3,)}


def _cfg(name: str = "fedavg", **overrides) -> Config:
    return strategy_cfg(name, **overrides)


def _arrays(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


def _reply(arrays: dict[str, np.ndarray], num_examples: float, loss: float = 1.0) -> Message:
    instruction = Message(RecordDict({keys.CONFIG: ConfigRecord()}), dst_node_id=1,
                          message_type="train")
    content = RecordDict({keys.ARRAYS: ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: num_examples,
                                                      keys.TRAIN_LOSS: loss})})
    return Message(content, reply_to=instruction)


@pytest.mark.parametrize("name", ["fedavg", "fedprox"])
def test_aggregate_matches_numpy_weighted_mean_and_drops_bad_replies(name):
    rng = np.random.default_rng(0)
    initial = ArrayRecord({k: Array(v) for k, v in _arrays(rng).items()})
    strategy = make_strategy(_cfg(name), initial)
    good = [(_arrays(rng), n) for n in (10, 30, 60)]
    nan = _arrays(rng)
    nan["head"][0] = np.nan
    wrong_shape = {**_arrays(rng), "lora_A": np.zeros((3, 3), np.float32)}
    missing_key = {k: v for k, v in _arrays(rng).items() if k != "head"}
    replies = [_reply(a, n) for a, n in good] + [
        _reply(nan, 10), _reply(wrong_shape, 10), _reply(missing_key, 10), _reply(good[0][0], 0)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    weights = np.array([n for _, n in good], dtype=float)
    for key in SHAPES:
        expected = np.average(np.stack([a[key] for a, _ in good]), axis=0, weights=weights)
        np.testing.assert_allclose(arrays[key].numpy(), expected, rtol=1e-6)
    stats = strategy.round_stats[1]
    assert (stats.replied, stats.rejected) == (3, 4)
    assert any("NaN" in r for r in stats.reasons) and any("shape" in r for r in stats.reasons)
    raw = 3 * sum(4 * int(np.prod(s)) for s in SHAPES.values())  # float32 tensor bytes
    assert raw <= stats.bytes_uploaded <= raw + 3 * len(SHAPES) * 256  # + per-array header
    assert metrics[keys.TRAIN_LOSS] == pytest.approx(1.0)


def test_a_round_with_only_bad_replies_leaves_nothing_to_aggregate():
    rng = np.random.default_rng(1)
    strategy = make_strategy(_cfg(), ArrayRecord({k: Array(v) for k, v in _arrays(rng).items()}))
    bad = _arrays(rng)
    bad["lora_B"][:] = np.inf
    arrays, _ = strategy.aggregate_train(1, [_reply(bad, 5)])
    assert arrays is None and strategy.round_stats[1].rejected == 1


def test_round_is_skipped_when_fewer_valid_updates_than_the_minimum_remain():
    rng = np.random.default_rng(2)
    global_state = _arrays(rng)
    strategy = make_strategy(_cfg(min_train_nodes=3),
                             ArrayRecord({k: Array(v) for k, v in global_state.items()}))
    bad = _arrays(rng)
    bad["head"][:] = np.nan
    arrays, _ = strategy.aggregate_train(1, [_reply(_arrays(rng), 5), _reply(_arrays(rng), 5),
                                             _reply(bad, 5)])
    assert arrays is None  # two valid < three required: nothing replaces the global adapter
    assert strategy.round_stats[1].rejected == 1 and strategy.round_stats[1].replied == 0


TOWERS = {"base_model.model.towers.image.conv": (2, 2), "base_model.model.towers.text.q": (3,),
          "base_model.model.towers.audio.k": (2,), "base_model.model.fusion_head.w": (3,)}


def _tower_reply(arrays, num_examples, images, texts, audio) -> Message:
    msg = _reply(arrays, num_examples)
    for key, count in ((keys.NUM_IMAGE_EXAMPLES, images), (keys.NUM_TEXT_EXAMPLES, texts),
                       (keys.NUM_AUDIO_EXAMPLES, audio)):
        msg.content[keys.METRICS][key] = count
    return msg


@pytest.mark.parametrize("weighting", [True, False])
def test_each_tower_is_averaged_over_the_rows_holding_its_modality(weighting):
    rng = np.random.default_rng(3)
    draw = lambda: {k: rng.normal(size=s).astype(np.float32) for k, s in TOWERS.items()}  # noqa: E731
    initial = ArrayRecord({k: Array(v) for k, v in draw().items()})
    strategy = make_strategy(_cfg(modality_weighting=weighting), initial)
    # site 1 holds no image, site 2 no audio
    sites = [(draw(), 10, 10, 10, 5), (draw(), 30, 0, 30, 30), (draw(), 60, 60, 30, 0)]
    bad_counts = [(draw(), 20, 21, 20, 20), (draw(), 20, 20, float("nan"), 20),
                  (draw(), 20, 20, 20, 25)]
    arrays, _ = strategy.aggregate_train(1, [_tower_reply(*s) for s in sites + bad_counts])
    assert strategy.round_stats[1].rejected == 3
    assert any("modality counts" in r for r in strategy.round_stats[1].reasons)
    column = {"image": 2, "text": 3, "audio": 4} if weighting else {}
    for key in TOWERS:
        tower = key.split(".")[3]
        weights = [s[column.get(tower, 1)] for s in sites]
        expected = np.average(np.stack([s[0][key] for s in sites]), axis=0, weights=weights)
        np.testing.assert_allclose(arrays[key].numpy(), expected, rtol=1e-6)


def test_every_lost_reply_is_named_by_node_error_replies_and_silent_sites_alike():
    from flwr.app import Error

    from tests.conftest import start_round

    rng = np.random.default_rng(3)
    global_state = _arrays(rng)
    strategy = make_strategy(_cfg(min_train_nodes=1, round_timeout_s=30.0),
                             ArrayRecord({k: Array(v) for k, v in global_state.items()}))
    sent = sorted(start_round(strategy, 1, global_state, node_ids=(11, 12, 13, 14)),
                  key=lambda m: m.metadata.dst_node_id)
    for msg in sent:  # what the Grid does as it sends them
        msg.metadata.__dict__["_message_id"] = msg.object_id
    ok = Message(RecordDict({keys.ARRAYS: ArrayRecord({k: Array(v) for k, v in
                                                       _arrays(rng).items()}),
                             keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: 5})}),
                 reply_to=sent[0])
    crashed = Message(Error(code=2, reason="<class 'RuntimeError'>:<'disk on\nfire'>"),
                      reply_to=sent[1])
    unreachable = Message(Error(code=5, reason="Error: Node Unavailable"), reply_to=sent[2])
    unreachable.metadata.__dict__["_src_node_id"] = 1  # the SuperLink answers for node 13
    arrays, _ = strategy.aggregate_train(1, [ok, crashed, unreachable])  # 14 never answers
    stats = strategy.round_stats[1]
    assert arrays is not None and stats.aggregated and stats.replied == 1
    assert stats.reasons == ["node 14: no reply within strategy.round_timeout_s=30",
                             "node 12: client error: RuntimeError: disk on fire",
                             "node 13: client error: Error: Node Unavailable"]


def test_a_round_without_valid_updates_is_not_aggregated():
    rng = np.random.default_rng(4)
    strategy = make_strategy(_cfg(), ArrayRecord({k: Array(v) for k, v in _arrays(rng).items()}))
    strategy.aggregate_train(1, [])
    assert not strategy.round_stats[1].aggregated


def test_the_aggregate_is_the_same_bits_whatever_order_the_replies_arrive_in():
    """Flower lists replies as they arrive; float sums depend on the order (shown with NumPy
    on these values), the global adapter must not."""
    from itertools import permutations

    from common.lora_math import weighted_mean

    rng = np.random.default_rng(5)
    strategy = make_strategy(_cfg(), ArrayRecord({k: Array(v) for k, v in _arrays(rng).items()}))
    states = [_arrays(rng) for _ in range(3)]
    for state, big in zip(states, (1e17, 1.0, -1e17)):
        state["head"][0] = big
    naive = {float(weighted_mean([states[i]["head"] for i in order], [1, 1, 1])[0])
             for order in permutations(range(3))}
    assert len(naive) > 1  # arrival order would reach the result
    results = []
    for order in permutations(range(3)):
        arrays, _ = strategy.aggregate_train(1, [_reply(states[i], 10) for i in order])
        results.append({k: arrays[k].numpy() for k in SHAPES})
    for result in results[1:]:
        for key in SHAPES:
            np.testing.assert_array_equal(result[key], results[0][key], err_msg=key)
