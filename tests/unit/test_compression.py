"""Compressed updates: unbiased quantisers, exact error feedback, bytes, and screening after decode."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from client.compression import RESIDUAL_STATE, upload_record
from common import keys
from common.compression import CompressionError, compress, decompress, flatten
from common.config import ConfigError, load_config
from server.strategy import make_strategy
from tests.conftest import strategy_cfg

pytestmark = pytest.mark.usefixtures("flower_task_identity")

# a LoRA-like layout: A (r, in), B (out, r) of two layers, a head, a bias
SHAPES = {"l0.lora_A": (4, 48), "l0.lora_B": (48, 4), "l1.lora_A": (4, 32),
          "l1.lora_B": (32, 4), "head.weight": (6, 40), "head.bias": (6,)}


def _draw(rng: np.random.Generator, scale: float = 1.0) -> dict[str, np.ndarray]:
    return {k: (scale * rng.normal(size=s)).astype(np.float32) for k, s in SHAPES.items()}


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_stochastic_rounding_is_unbiased_and_its_mean_error_vanishes_over_seeds(mode):
    x = _draw(np.random.default_rng(0))
    flat = flatten(x, sorted(x))
    seeds = 2000
    decoded = np.stack([flatten(decompress(compress(x, mode, np.random.default_rng(s))[0], mode,
                                           SHAPES), sorted(x)) for s in range(seeds)])
    step = max(np.abs(v).max() for v in x.values()) / (127 if mode == "int8" else 7)
    # each draw is off by less than one step; its mean over S seeds by ~ step / (2 sqrt(S))
    assert np.abs(decoded - flat).max() <= step * 1.0001
    error_few = np.abs(decoded[:20].mean(0) - flat).mean()
    error_all = np.abs(decoded.mean(0) - flat).mean()
    assert error_all < error_few / 5  # shrinks like 1/sqrt(S): sqrt(100) = 10
    assert np.abs(decoded.mean(0) - flat).max() < 5 * step / (2 * np.sqrt(seeds))
    nearest = np.round(flat / step) * step  # what deterministic rounding would give
    assert error_all < np.abs(nearest - flat).mean() / 5  # ... and it is biased per coordinate


def test_topk_error_feedback_makes_the_cumulative_sum_exact():
    rng = np.random.default_rng(1)
    residual, sent_total, true_total = None, 0.0, 0.0
    for round_ in range(12):
        delta = _draw(rng, scale=1.0 / (round_ + 1))
        payload, residual = compress(delta, "topk", rng, fraction=0.05, residual=residual)
        assert len(payload["indices"]) <= sum(int(np.ceil(0.05 * np.prod(s)))
                                              for s in SHAPES.values())
        sent_total = sent_total + flatten(decompress(payload, "topk", SHAPES), sorted(SHAPES))
        true_total = true_total + flatten(delta, sorted(SHAPES))
    np.testing.assert_allclose(sent_total + flatten(residual, sorted(SHAPES)), true_total,
                               rtol=1e-5, atol=1e-5)
    assert np.abs(flatten(residual, sorted(SHAPES))).max() > 0  # something was held back


def test_topk_without_a_residual_sends_each_tensors_largest_entries():
    x = _draw(np.random.default_rng(2))
    out = decompress(compress(x, "topk", np.random.default_rng(0), fraction=0.1)[0], "topk",
                     SHAPES)
    for key, value in x.items():
        k = int(np.ceil(0.1 * value.size))
        kept = np.flatnonzero(out[key])
        assert len(kept) == k
        assert np.abs(value.ravel()[kept]).min() >= np.sort(np.abs(value.ravel()))[-k]
        np.testing.assert_array_equal(out[key].ravel()[kept], value.ravel()[kept])


@pytest.mark.parametrize("mode, at_least", [("int8", 3.5), ("int4", 7.0), ("topk", 7.0)])
def test_upload_bytes_shrink_by_the_promised_factor(mode, at_least):
    # the default adapter's scale: ~10^5 numbers in ~10^2 tensors (npy headers are ~10^2 B each)
    rng = np.random.default_rng(3)
    x = {f"layer{i}.lora_{ab}": rng.normal(size=(8, 384)).astype(np.float32)
         for i in range(48) for ab in "AB"}
    plain = ArrayRecord({k: Array(v) for k, v in x.items()}).count_bytes()
    payload, _ = compress(x, mode, np.random.default_rng(0), fraction=0.05)
    packed = ArrayRecord({k: Array(v) for k, v in payload.items()}).count_bytes()
    assert plain / packed >= at_least


@pytest.mark.parametrize("mode, broken", [
    ("int8", lambda p: {**p, "codes": p["codes"][:-1]}),
    ("int8", lambda p: {**p, "codes": p["codes"].astype(np.int16)}),
    ("int8", lambda p: {**p, "codes": np.full_like(p["codes"], -128)}),
    ("int4", lambda p: {**p, "codes": np.full_like(p["codes"], 0xFF)}),
    ("int4", lambda p: {**p, "scales": p["scales"][:2]}),
    ("int4", lambda p: {"codes": p["codes"]}),
    ("topk", lambda p: {**p, "indices": p["indices"] + 10**6}),
    ("topk", lambda p: {**p, "indices": np.zeros_like(p["indices"])}),
    ("topk", lambda p: {**p, "values": p["values"][:3]}),
])
def test_a_payload_that_does_not_fit_the_layout_is_refused(mode, broken):
    payload, _ = compress(_draw(np.random.default_rng(4)), mode, np.random.default_rng(0))
    with pytest.raises(CompressionError):
        decompress(broken(payload), mode, SHAPES)


def _context() -> Context:
    return Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})


def _compressed_reply(cfg, context, local, global_state, num_examples, seed) -> Message:
    instruction = Message(RecordDict({keys.CONFIG: ConfigRecord()}), dst_node_id=1,
                          message_type="train")
    record = upload_record(cfg, context, local, global_state, seed)
    content = RecordDict({keys.ARRAYS: record, keys.METRICS: MetricRecord(
        {keys.NUM_EXAMPLES: num_examples, keys.TRAIN_LOSS: 1.0})})
    return Message(content, reply_to=instruction)


def test_site_keeps_its_topk_residual_in_its_context_across_rounds():
    cfg = strategy_cfg(overrides=("strategy.compression=topk",))
    rng = np.random.default_rng(5)
    context, global_state = _context(), _draw(rng)
    local = {k: v + 0.1 * rng.normal(size=v.shape).astype(np.float32)
             for k, v in global_state.items()}
    first = upload_record(cfg, context, local, global_state, seed=0)
    residual = {k: v.numpy() for k, v in context.state[RESIDUAL_STATE].items()}
    sent = decompress({k: v.numpy() for k, v in first.items()}, "topk", SHAPES)
    for key in SHAPES:  # what was sent plus what was kept is the whole update
        np.testing.assert_allclose(sent[key] + residual[key], local[key] - global_state[key],
                                   atol=1e-6)
    second = upload_record(cfg, context, global_state, global_state, seed=1)  # Δ = 0: only e
    resent = decompress({k: v.numpy() for k, v in second.items()}, "topk", SHAPES)
    assert all(np.abs(resent[k]).max() > 0 for k in SHAPES)


@pytest.mark.parametrize("mode", ["int8", "int4", "topk"])
def test_server_decodes_before_screening_and_rejects_a_poisoned_compressed_reply(mode):
    cfg = strategy_cfg(overrides=(f"strategy.compression={mode}", "strategy.topk_fraction=0.5",
                                  "strategy.max_update_norm=5"))
    rng = np.random.default_rng(6)
    global_state = _draw(rng)
    strategy = make_strategy(cfg, ArrayRecord({k: Array(v) for k, v in global_state.items()}))
    honest = [{k: v + 0.02 * rng.normal(size=v.shape).astype(np.float32)
               for k, v in global_state.items()} for _ in range(3)]
    poisoned = {k: global_state[k] + 50 * (honest[0][k] - global_state[k]) for k in SHAPES}
    replies = [_compressed_reply(cfg, _context(), s, global_state, n, seed)
               for seed, (s, n) in enumerate(zip(honest + [poisoned], (10, 30, 60, 10)))]
    broken = _compressed_reply(cfg, _context(), honest[1], global_state, 10, seed=9)
    first = next(iter(broken.content[keys.ARRAYS].keys()))
    broken.content[keys.ARRAYS][first] = Array(np.zeros(3, np.float32))
    # what the honest replies decode to, exactly as the server must see them
    decoded = [{k: global_state[k] + d for k, d in decompress(
        {k: v.numpy() for k, v in r.content[keys.ARRAYS].items()}, mode, SHAPES).items()}
        for r in replies[:3]]
    uploaded = sum(r.content[keys.ARRAYS].count_bytes() for r in replies[:3])
    arrays, _ = strategy.aggregate_train(1, replies + [broken])
    stats = strategy.round_stats[1]
    assert (stats.replied, stats.rejected) == (3, 2)
    assert any("exceeds strategy.max_update_norm" in r for r in stats.reasons)
    assert any("cannot be decoded" in r for r in stats.reasons)
    assert stats.bytes_uploaded == uploaded  # counted as sent, compressed
    for key in SHAPES:
        expected = np.average(np.stack([d[key] for d in decoded]), axis=0, weights=[10, 30, 60])
        np.testing.assert_allclose(arrays[key].numpy(), expected, rtol=1e-5, atol=1e-6)


def test_robust_strategy_sees_the_decoded_arrays():
    cfg = strategy_cfg("fedmedian", overrides=("strategy.compression=int8",))
    rng = np.random.default_rng(7)
    global_state = _draw(rng)
    strategy = make_strategy(cfg, ArrayRecord({k: Array(v) for k, v in global_state.items()}))
    sites = [{k: v + rng.normal(size=v.shape).astype(np.float32) for k, v in global_state.items()}
             for _ in range(5)]
    replies = [_compressed_reply(cfg, _context(), s, global_state, 10, i)
               for i, s in enumerate(sites)]
    decoded = [{k: global_state[k] + d for k, d in decompress(
        {k: v.numpy() for k, v in r.content[keys.ARRAYS].items()}, "int8", SHAPES).items()}
        for r in replies]
    arrays, _ = strategy.aggregate_train(1, replies)
    for key in SHAPES:
        np.testing.assert_allclose(arrays[key].numpy(),
                                   np.median(np.stack([d[key] for d in decoded]), axis=0),
                                   rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("overrides, key", [
    (["strategy.compression=int8", "privacy=secagg"], "strategy.compression"),
    (["strategy.compression=topk", "privacy=central_dp", "privacy.dp=client_fixed"],
     "strategy.compression"),
    (["strategy.compression=int4", "simulation.site_ranks=[4,8]"], "simulation.site_ranks"),
    (["strategy.compression=gzip"], "strategy.compression"),
    (["strategy.topk_fraction=0"], "strategy.topk_fraction"),
])
def test_compression_that_cannot_compose_is_refused_naming_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config(overrides)
    assert str(err.value).startswith(key)


@pytest.mark.parametrize("overrides", [
    ["strategy.compression=int8", "privacy=central_dp"],  # the server clips decoded updates
    ["strategy.compression=topk", "privacy=local_dp"],    # post-processing of DP-SGD's output
    ["strategy.compression=int4", "strategy=krum"],
])
def test_compression_composes_with_server_side_dp_local_dp_and_robust_strategies(overrides):
    assert load_config(overrides).strategy.compression != "none"
