"""Every configured strategy and LoRA mode through the real Flower strategy objects vs NumPy."""

from __future__ import annotations


import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from common import keys
from common.config import load_config
from common.strategies import STRATEGIES
from server.strategy import make_strategy
from tests.conftest import start_round, strategy_cfg

pytestmark = pytest.mark.usefixtures("flower_task_identity")
A, B, HEAD = "m.layer.q.lora_A.weight", "m.layer.q.lora_B.weight", "m.head.weight"
SHAPES = {A: (4, 12), B: (10, 4), HEAD: (3,)}
SCALING = 2.0
ALPHA = SCALING * SHAPES[A][0]  # LoRA scaling = alpha / r


def _cfg(name: str, **overrides):
    return strategy_cfg(name, lora_alpha=ALPHA, **overrides)


def _record(state):
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()})


def _reply(state, num_examples: float) -> Message:
    instruction = Message(RecordDict({keys.CONFIG: ConfigRecord()}), dst_node_id=1,
                          message_type="train")
    return Message(RecordDict({keys.ARRAYS: _record(state), keys.METRICS: MetricRecord(
        {keys.NUM_EXAMPLES: num_examples, keys.TRAIN_LOSS: 1.0})}), reply_to=instruction)


def _states(rng, n: int, global_state, spread: float = 0.1):
    return [{k: (v + spread * rng.normal(size=v.shape)).astype(np.float32)
             for k, v in global_state.items()} for _ in range(n)]


def _start(strategy, global_state, server_round: int = 1):
    """Start a round from `global_state` through the strategy's real configure_train."""
    start_round(strategy, server_round, global_state)


@pytest.fixture
def setting():
    rng = np.random.default_rng(0)
    global_state = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    return rng, global_state


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_strategy_aggregates_screened_replies(name, setting):
    rng, global_state = setting
    strategy = make_strategy(_cfg(name, num_malicious=1, num_to_keep=2), _record(global_state))
    _start(strategy, global_state)
    states = _states(rng, 5, global_state)
    bad = {**states[0], HEAD: np.full(3, np.nan, np.float32)}
    arrays, _ = strategy.aggregate_train(1, [_reply(s, 10 + i) for i, s in enumerate(states)]
                                         + [_reply(bad, 10)])
    assert set(arrays.keys()) == set(SHAPES)
    assert strategy.round_stats[1].rejected == 1 and strategy.round_stats[1].replied == 5
    assert all(np.all(np.isfinite(v.numpy())) for v in arrays.values())


def test_median_and_trimmed_mean_match_numpy(setting):
    rng, global_state = setting
    states = _states(rng, 5, global_state)
    for name, reference in [
        ("fedmedian", lambda x: np.median(x, axis=0)),
        ("fedtrimmedavg", lambda x: np.sort(x, axis=0)[1:-1].mean(axis=0)),  # 0.2 of 5 = 1
    ]:
        strategy = make_strategy(_cfg(name), _record(global_state))
        _start(strategy, global_state)
        arrays, _ = strategy.aggregate_train(1, [_reply(s, 10) for s in states])
        for k in SHAPES:
            np.testing.assert_allclose(arrays[k].numpy(), reference(np.stack(
                [s[k] for s in states])), rtol=1e-5, atol=1e-6)


def test_norm_bounded_mean_clips_a_scaled_attacker(setting):
    rng, global_state = setting
    honest = _states(rng, 4, global_state, spread=0.01)
    attacker = {k: global_state[k] + 50 * (honest[0][k] - global_state[k]) for k in SHAPES}
    strategy = make_strategy(_cfg("normbounded"), _record(global_state))
    _start(strategy, global_state)
    arrays, _ = strategy.aggregate_train(1, [_reply(s, 10) for s in honest + [attacker]])
    honest_mean = {k: np.mean([s[k] for s in honest], axis=0) for k in SHAPES}
    error = np.sqrt(sum(((arrays[k].numpy() - honest_mean[k]) ** 2).sum() for k in SHAPES))
    plain = np.sqrt(sum(((np.mean([s[k] for s in honest + [attacker]], axis=0)
                          - honest_mean[k]) ** 2).sum() for k in SHAPES))
    assert error < 0.1 * plain


def test_ffa_accepts_b_only_replies_and_keeps_a_frozen(setting):
    rng, global_state = setting
    strategy = make_strategy(_cfg("fedavg", lora_aggregation="ffa"), _record(global_state))
    _start(strategy, global_state)
    states = [{k: v for k, v in s.items() if k != A} for s in _states(rng, 3, global_state)]
    weights = [5, 10, 20]
    arrays, _ = strategy.aggregate_train(1, [_reply(s, w) for s, w in zip(states, weights)])
    np.testing.assert_array_equal(arrays[A].numpy(), global_state[A])
    expected_b = np.average(np.stack([s[B] for s in states]), axis=0, weights=weights)
    np.testing.assert_allclose(arrays[B].numpy(), expected_b, rtol=1e-6)
    # A reply that still carries A is not what an ffa site sends: rejected.
    full = _states(rng, 1, global_state)[0]
    strategy.aggregate_train(2, [_reply(full, 5)])
    assert strategy.round_stats[2].rejected == 1


def test_exact_mode_global_delta_equals_weighted_mean_of_client_deltas(setting):
    rng, global_state = setting
    strategy = make_strategy(_cfg("fedavg", lora_aggregation="exact"), _record(global_state))
    _start(strategy, global_state)
    states = _states(rng, 4, global_state, spread=0.5)
    weights = np.array([1.0, 2.0, 3.0, 4.0])
    arrays, _ = strategy.aggregate_train(1, [_reply(s, w) for s, w in zip(states, weights)])
    target = sum(w * SCALING * s[B].astype(np.float64) @ s[A] for w, s in zip(
        weights / weights.sum(), states))
    got = SCALING * arrays[B].numpy() @ arrays[A].numpy() + strategy.state.residuals["m.layer.q"]
    assert np.linalg.norm(got - target) / np.linalg.norm(target) < 1e-5


def test_exact_mode_refuses_non_mean_strategies():
    from common.config import ConfigError

    with pytest.raises(ConfigError, match="strategy.lora_aggregation"):
        load_config(["strategy=krum", "strategy.lora_aggregation=exact"])


def test_update_norm_bound_rejects_far_updates(setting):
    rng, global_state = setting
    strategy = make_strategy(_cfg("fedavg", max_update_norm=1.0), _record(global_state))
    _start(strategy, global_state)
    near = _states(rng, 2, global_state, spread=0.01)
    far = _states(rng, 1, global_state, spread=5.0)
    strategy.aggregate_train(1, [_reply(s, 10) for s in near + far])
    stats = strategy.round_stats[1]
    assert (stats.replied, stats.rejected) == (2, 1) and "norm" in stats.reasons[0]


def _svd_approx(delta: np.ndarray, rank: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(delta, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vt[:rank]


def test_heterogeneous_ranks_match_numpy_svd_reference(setting):
    rng, global_state = setting
    strategy = make_strategy(_cfg("fedavg"), _record(global_state))
    _start(strategy, global_state)
    ranks, weights = [2, 4, 8], np.array([10.0, 20.0, 30.0])
    states = []
    for r in ranks:
        state = {HEAD: rng.normal(size=3).astype(np.float32),
                 A: rng.normal(size=(r, 12)).astype(np.float32),
                 B: rng.normal(size=(10, r)).astype(np.float32)}
        states.append(state)
    replies = [_reply(s, w) for s, w in zip(states, weights)]
    arrays, _ = strategy.aggregate_train(1, replies)
    p = weights / weights.sum()
    dense = sum(pk * (ALPHA / r) * s[B].astype(np.float64) @ s[A] for pk, r, s in
                zip(p, ranks, states))
    got = (ALPHA / 4) * arrays[B].numpy().astype(np.float64) @ arrays[A].numpy()
    assert arrays[A].numpy().shape == (4, 12) and arrays[B].numpy().shape == (10, 4)
    np.testing.assert_allclose(got, _svd_approx(dense, 4), atol=1e-4)
    np.testing.assert_allclose(arrays[HEAD].numpy(), np.average(
        np.stack([s[HEAD] for s in states]), axis=0, weights=weights), rtol=1e-5)
    # A rank-8 site gets rank-8 factors of the dense aggregate, not of the rank-4 global.
    _start(strategy, {k: v.numpy() for k, v in arrays.items()}, server_round=2)
    own = strategy.arrays_for_rank(8)
    assert own[A].shape == (8, 12) and own[B].shape == (10, 8)
    np.testing.assert_allclose((ALPHA / 8) * own[B].astype(np.float64) @ own[A],
                               _svd_approx(dense, 8), atol=1e-4)


def test_rank_mismatch_inside_a_pair_is_rejected(setting):
    rng, global_state = setting
    strategy = make_strategy(_cfg("fedavg"), _record(global_state))
    _start(strategy, global_state)
    bad = {**global_state, A: np.zeros((3, 12), np.float32)}  # B still has rank 4
    arrays, _ = strategy.aggregate_train(1, [_reply(bad, 10)])
    assert arrays is None and "pair" in strategy.round_stats[1].reasons[0]


def test_robust_strategies_keep_ranks_fixed(setting):
    rng, global_state = setting
    strategy = make_strategy(_cfg("fedmedian"), _record(global_state))
    _start(strategy, global_state)
    other_rank = {HEAD: global_state[HEAD], A: np.zeros((2, 12), np.float32),
                  B: np.zeros((10, 2), np.float32)}
    strategy.aggregate_train(1, [_reply(other_rank, 10)])
    assert strategy.round_stats[1].rejected == 1


@pytest.mark.parametrize("name, overrides", [("fedadam", {}), ("fedyogi", {}),
                                              ("fedavgm", {}),
                                              ("fedavg", {"lora_aggregation": "exact"})])
def test_strategy_state_round_trips_through_a_checkpoint(name, overrides, setting, tmp_path):
    from server.checkpoint import load_strategy_state, save_strategy_state

    rng, global_state = setting
    original = make_strategy(_cfg(name, **overrides), _record(global_state))
    _start(original, global_state)
    arrays, _ = original.aggregate_train(1, [_reply(s, 10) for s in _states(rng, 3, global_state)])
    original.state.node_ranks = {2**64 - 5: 8, 17: 4}  # Flower node ids are unsigned 64-bit
    save_strategy_state(original.snapshot(), tmp_path)
    assert (tmp_path / "server_state.safetensors").is_file()
    resumed = make_strategy(_cfg(name, **overrides), _record(global_state))
    resumed.restore(load_strategy_state(tmp_path))
    assert resumed.state.node_ranks == original.state.node_ranks
    round1 = {k: v.numpy() for k, v in arrays.items()}
    round2 = _states(rng, 3, round1)
    for strategy in (original, resumed):
        _start(strategy, round1, server_round=2)
    a, _ = original.aggregate_train(2, [_reply(s, 10) for s in round2])
    b, _ = resumed.aggregate_train(2, [_reply(s, 10) for s in round2])
    for k in SHAPES:
        np.testing.assert_array_equal(a[k].numpy(), b[k].numpy())
    fresh = make_strategy(_cfg(name, **overrides), _record(global_state))
    _start(fresh, round1, server_round=2)
    c, _ = fresh.aggregate_train(2, [_reply(s, 10) for s in round2])
    if name != "fedavg":  # without the moments the next step differs: the state matters
        assert any(not np.array_equal(a[k].numpy(), c[k].numpy()) for k in SHAPES)


@pytest.mark.parametrize("name", ["fedavg", "fedadam", "fedmedian"])
def test_fedsa_accepts_replies_without_b_and_keeps_the_global_b(name, setting):
    """FedSA-LoRA: sites keep B; A and the head aggregate as usual (here vs np.average)."""
    rng, global_state = setting
    cfg = _cfg(name, overrides=("personalization=fedsa",))
    strategy = make_strategy(cfg, _record(global_state))
    _start(strategy, global_state)
    states = [{k: v for k, v in s.items() if k != B} for s in _states(rng, 3, global_state)]
    weights = [5, 10, 20]
    arrays, _ = strategy.aggregate_train(1, [_reply(s, w) for s, w in zip(states, weights)])
    np.testing.assert_array_equal(arrays[B].numpy(), global_state[B])
    if name == "fedavg":
        expected_a = np.average(np.stack([s[A] for s in states]), axis=0, weights=weights)
        np.testing.assert_allclose(arrays[A].numpy(), expected_a, rtol=1e-6)
    strategy.aggregate_train(2, [_reply(_states(rng, 1, global_state)[0], 5)])
    assert strategy.round_stats[2].rejected == 1  # a reply carrying B is not a fedsa site's
