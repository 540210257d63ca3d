"""Central DP over Poisson-sampled sites: the sampler, the released sum and the reported ε,
against independent references (Opacus's RDP accountant at sample_rate=q, NumPy, closed forms)."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from opacus.accountants import RDPAccountant

from common import keys
from common.config import ConfigError, load_config
from common.privacy import (epsilon, gaussian_sum_release, noise_to_signal, poisson_sample,
                            resolve_noise_multiplier)
from server.privacy import privacy_metrics
from server.strategy import RoundStats, make_strategy
from tests.conftest import NodeGrid

pytestmark = pytest.mark.usefixtures("flower_task_identity")

POISSON_200 = ["privacy=central_dp", "strategy.sampling=poisson", "strategy.fraction_train=0.05",
               "partition.num_clients=200", "strategy.rounds=30"]
SHAPES = {"t.lora_A.weight": (2, 6), "t.lora_B.weight": (6, 2), "head.weight": (3, 4)}


def test_reported_epsilon_under_poisson_sampling_matches_opacus_at_sample_rate_q():
    cfg = resolve_noise_multiplier(load_config(POISSON_200))
    z, q, rounds, delta = cfg.privacy.noise_multiplier, 0.05, cfg.strategy.rounds, cfg.privacy.delta
    reference = RDPAccountant()
    for _ in range(rounds):
        reference.step(noise_multiplier=z, sample_rate=q)
    reported = privacy_metrics(cfg, rounds, RoundStats())[keys.EPSILON]
    assert reported == pytest.approx(reference.get_epsilon(delta), rel=0.01)
    assert reported <= 8.0 + 1e-6
    assert epsilon(z, 1.0, rounds, delta) > 5 * reported  # the amplification sampling buys


def test_each_site_joins_a_round_independently_with_probability_q():
    nodes, q, rounds = list(range(1000, 1200)), 0.1, 400
    drawn = [poisson_sample(nodes, q, seed=0, server_round=r) for r in range(1, rounds + 1)]
    counts = np.array([len(d) for d in drawn])
    share = np.array([[n in set(d) for n in nodes] for d in drawn]).mean(axis=0)  # per site
    assert counts.mean() == pytest.approx(len(nodes) * q, rel=0.05)
    assert counts.var() == pytest.approx(len(nodes) * q * (1 - q), rel=0.25)  # Binomial, not fixed
    assert abs(share - q).max() < 5 * math.sqrt(q * (1 - q) / rounds)
    assert poisson_sample(nodes, q, 0, 7) == drawn[6] and drawn[6] != drawn[7]


def test_gaussian_sum_release_clips_each_site_and_adds_noise_of_std_zc_over_the_divisor():
    rng = np.random.default_rng(0)
    shapes = {"a": (3, 4), "b": (5,)}
    updates = [{k: rng.normal(scale=s, size=v) for k, v in shapes.items()} for s in (0.01, 3.0)]
    c, divisor = 1.0, 7.5
    out = gaussian_sum_release(updates, shapes, c, 0.0, divisor, rng)
    norms = [math.sqrt(sum(np.sum(u[k] ** 2) for k in shapes)) for u in updates]
    expected = {k: sum(u[k] * min(1, c / n) for u, n in zip(updates, norms)) / divisor
                for k in shapes}
    for k in shapes:
        np.testing.assert_allclose(out[k], expected[k], rtol=1e-6)
    d, z = 200_000, 1.3
    noise = gaussian_sum_release([], {"w": (d,)}, c, z, divisor, rng)["w"]  # no site sampled
    assert noise.std() == pytest.approx(z * c / divisor, rel=0.01)
    assert noise_to_signal(replace(load_config(POISSON_200), privacy=replace(
        load_config(POISSON_200).privacy, noise_multiplier=z)), d) == pytest.approx(
        np.linalg.norm(noise) / c * divisor / 10, rel=0.01)  # q·N = 10 sites per round


def _reply(arrays: dict[str, np.ndarray], node: int) -> Message:
    instruction = Message(RecordDict({keys.CONFIG: ConfigRecord()}), dst_node_id=node,
                          message_type="train")
    return Message(RecordDict({
        keys.ARRAYS: ArrayRecord({k: Array(v.astype(np.float32)) for k, v in arrays.items()}),
        keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: 20, keys.TRAIN_LOSS: 1.0})}),
        reply_to=instruction)


def test_poisson_strategy_samples_clips_and_releases_the_fixed_denominator_mean_with_ffa():
    cfg = load_config(POISSON_200 + ["strategy.lora_aggregation=ffa", "privacy.target_epsilon=0",
                                     "privacy.noise_multiplier=1e-9"])
    rng = np.random.default_rng(1)
    glob = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    strategy = make_strategy(cfg, ArrayRecord({k: Array(v) for k, v in glob.items()}))
    nodes = list(range(1, 201))
    sent = list(strategy.configure_train(3, ArrayRecord({k: Array(v) for k, v in glob.items()}),
                                         ConfigRecord(), NodeGrid(nodes)))
    assert sorted(m.metadata.dst_node_id for m in sent) == poisson_sample(nodes, 0.05, 0, 3)
    uploads = [{k: glob[k] + rng.normal(scale=s, size=v) for k, v in SHAPES.items()
                if ".lora_A." not in k} for s in (0.01, 5.0, 5.0)]  # ffa: A stays home
    arrays, _ = strategy.aggregate_train(3, [_reply(u, 1) for u in uploads])
    for k in SHAPES:
        if ".lora_A." in k:
            np.testing.assert_array_equal(arrays[k].numpy(), glob[k])  # frozen, bit for bit
            continue
        deltas = [u[k] - glob[k] for u in uploads]
        norms = [math.sqrt(sum(np.sum((u[j] - glob[j]) ** 2) for j in u)) for u in uploads]
        mean = sum(dl * min(1, 1.0 / n) for dl, n in zip(deltas, norms)) / (0.05 * 200)
        np.testing.assert_allclose(arrays[k].numpy(), glob[k] + mean, rtol=1e-5, atol=1e-6)
    empty, _ = strategy.aggregate_train(4, [])  # a round that sampled nobody still releases
    assert empty is not None and strategy.state.dp_releases == 2


@pytest.mark.parametrize("overrides,key", [
    (["privacy=central_dp", "privacy.dp=client_fixed", "strategy.lora_aggregation=ffa"],
     "strategy.lora_aggregation"),
    (["privacy=central_dp", "privacy.dp=server_adaptive", "strategy.sampling=poisson"],
     "privacy.dp"),
    (["privacy=secagg", "strategy.sampling=poisson"], "strategy.sampling"),
    (["strategy.sampling=uniform"], "strategy.sampling"),
])
def test_sampling_and_ffa_settings_dp_cannot_account_are_refused(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config(overrides)
    assert str(err.value).startswith(key) and "\n" not in str(err.value)


def test_ffa_composes_with_server_side_central_dp():
    for dp in ("server_fixed", "server_adaptive"):
        cfg = load_config(["privacy=central_dp", f"privacy.dp={dp}", "strategy.lora_aggregation=ffa"])
        assert cfg.strategy.lora_aggregation == "ffa"


def test_launcher_advice_prints_the_closed_form_ratio_and_warns_above_one(capsys):
    from launcher.prepare import noise_advice, noised_coordinates

    small = ["model=minilm_cnn", "model.modalities=[image,text]", "data.labels=[a,b,c]",
             "model.lora.r=2", "model.text.lora_layers=1", "model.fusion_dim=8",
             "strategy.lora_aggregation=ffa"]
    cfg = load_config(small + ["privacy=central_dp", "privacy.target_epsilon=0",
                               "privacy.noise_multiplier=1.0"])
    d = noised_coordinates(cfg)
    assert noise_advice(cfg, 100) == pytest.approx(math.sqrt(d) / 10)  # z·√d / m, m = 10 sites
    assert "warning: the noise outweighs the update" in capsys.readouterr().err
    scaled = load_config(small + POISSON_200 + ["partition.num_clients=100000",
                                                "privacy.target_epsilon=0",
                                                "privacy.noise_multiplier=1.0"])
    assert noise_advice(scaled, 100) == pytest.approx(math.sqrt(d) / 5000)  # q·N = 5000
    assert "warning" not in capsys.readouterr().err
