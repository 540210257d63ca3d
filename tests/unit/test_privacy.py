"""Privacy math against independent references: Opacus's RDP analysis for the accountant,
Flower's own SecAgg+ quantiser for the error bound; and the refusals of settings that need
plaintext updates."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.common.secure_aggregation.quantization import dequantize, quantize
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from common.config import ConfigError, load_config
from common.rules import value_at
from common.privacy import (epsilon, num_sampled_sites, resolve_noise_multiplier,
                            secagg_error_bound, solve_noise_multiplier)

OPACUS_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))


def opacus_epsilon(z: float, q: float, steps: int, delta: float) -> float:
    rdp = compute_rdp(q=q, noise_multiplier=z, steps=steps, orders=OPACUS_ORDERS)
    return get_privacy_spent(orders=OPACUS_ORDERS, rdp=rdp, delta=delta)[0]


@pytest.mark.parametrize("z,q,steps,delta", [
    (1.4, 1.0, 5, 1e-5),        # central DP, every site every round (no amplification)
    (0.8, 1.0, 50, 1e-5),
    (1.1, 0.01, 1000, 1e-5),    # DP-SGD shapes: small batches, many steps
    (0.8, 0.05, 300, 1e-6),
    (2.0, 0.3, 20, 1e-5),       # central DP with fraction_train = 0.3
])
def test_accountant_agrees_with_opacus_within_one_percent(z, q, steps, delta):
    ours, reference = epsilon(z, q, steps, delta), opacus_epsilon(z, q, steps, delta)
    assert ours == pytest.approx(reference, rel=0.01)


def test_epsilon_grows_with_rounds_and_shrinks_with_noise():
    assert epsilon(1.0, 1.0, 0, 1e-5) == 0.0
    assert epsilon(1.0, 1.0, 2, 1e-5) < epsilon(1.0, 1.0, 5, 1e-5)
    assert epsilon(2.0, 1.0, 5, 1e-5) < epsilon(1.0, 1.0, 5, 1e-5)


def test_solved_noise_multiplier_just_reaches_the_target():
    z = solve_noise_multiplier(8.0, 1.0, 5, 1e-5)
    assert opacus_epsilon(z, 1.0, 5, 1e-5) == pytest.approx(8.0, rel=0.01)
    assert epsilon(z * 0.99, 1.0, 5, 1e-5) > 8.0  # smallest: a little less noise overshoots


def test_target_epsilon_config_sets_the_noise_multiplier_before_the_run():
    cfg = resolve_noise_multiplier(load_config(["privacy=central_dp"]))
    assert cfg.privacy.noise_multiplier > 0
    z, rounds = cfg.privacy.noise_multiplier, cfg.strategy.rounds
    assert opacus_epsilon(z, 1.0, rounds, cfg.privacy.delta) <= 8.0 * 1.01
    assert num_sampled_sites(cfg) == cfg.partition.num_clients


@pytest.mark.parametrize("seed", range(3))
def test_secagg_mean_of_flowers_quantised_uploads_is_within_the_bound(seed):
    """Replay SecAgg+'s arithmetic (the masks cancel exactly mod 2**32) with Flower's quantiser."""
    rng = np.random.default_rng(seed)
    np.random.seed(seed)  # Flower's stochastic rounding draws from NumPy's global RNG
    c, q_range, max_weight, k = 0.5, 2**12, 1000.0, 6  # coarse Q: the error is visible
    counts = rng.integers(20, 400, size=k)
    updates = [rng.uniform(-c, c, size=5000) for _ in range(k)]
    total, factor = np.zeros(5000, dtype=np.int64), 0
    for n, x in zip(counts, updates):  # what secaggplus_mod does per site
        q_ratio = round(n / max_weight * q_range)
        total += quantize([x * (q_ratio / q_range)], c, q_range)[0]
        factor += q_ratio
    mean = dequantize([total], c, q_range)[0] - (k - 1) * c  # what the workflow does
    mean *= q_range / factor
    plain = np.average(updates, axis=0, weights=counts)
    bound = secagg_error_bound(k, c, q_range, factor / q_range)
    gap = np.abs(mean - plain).max()
    assert gap <= bound
    assert gap > bound / 20  # a real quantisation error, and the bound is not vacuous


@pytest.mark.parametrize("overrides,key", [
    (["privacy=secagg", "strategy.lora_aggregation=exact"], "strategy.lora_aggregation"),
    (["privacy=secagg", "strategy=krum"], "strategy.name"),
    (["privacy=secagg", "strategy=fedmedian"], "strategy.name"),
    (["privacy=secagg", "strategy=normbounded"], "strategy.name"),
    (["privacy=secagg", "simulation.site_ranks=[4,8]"], "simulation.site_ranks"),
    (["privacy=secagg", "strategy.max_update_norm=5"], "strategy.max_update_norm"),
    (["privacy=secagg", "strategy.fraction_evaluate=0.5"], "strategy.fraction_evaluate"),
    (["privacy=secagg", "privacy.num_shares=2"], "privacy.num_shares"),
    (["privacy=central_dp", "strategy=fedtrimmedavg"], "strategy.name"),
    (["privacy=central_dp", "strategy.lora_aggregation=exact"], "strategy.lora_aggregation"),
    (["privacy=central_dp", "privacy.secagg=true"], "privacy.secagg"),
    (["privacy.dp=server_fixed"], "privacy.noise_multiplier"),
    (["privacy.dp=gaussian"], "privacy.dp"),
    (["privacy=central_dp", "privacy.delta=0"], "privacy.delta"),
    (["privacy=local_dp", "train.absent_class_scale=0"], "train.absent_class_scale"),
    (["privacy=local_dp", "train.modality_dropout_text=0.5"], "train.modality_dropout_text"),
    (["privacy=local_dp", "train.max_grad_norm=1"], "train.max_grad_norm"),
    (["privacy=local_dp", "train.proximal_mu=0.1"], "train.proximal_mu"),
    (["privacy=local_dp", "strategy=fedprox"], "strategy.name"),
    (["privacy=central_dp", "privacy.per_layer_clipping=true"], "privacy.per_layer_clipping"),
    (["privacy.per_layer_clipping=true"], "privacy.per_layer_clipping"),
    (["privacy=secagg", "resume=true"], "resume"),
])
def test_incompatible_privacy_settings_are_refused_with_one_line_naming_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config(overrides)
    message = str(err.value)
    assert message.startswith(key) and "\n" not in message


@pytest.mark.parametrize("overrides, expected", [
    (["privacy=secagg"], {"privacy.secagg": True, "privacy.dp": "none"}),
    (["privacy=secagg", "strategy=fedprox", "train.proximal_mu=0.1"],
     {"privacy.secagg": True, "strategy.name": "fedprox", "train.proximal_mu": 0.1}),
    (["privacy=secagg", "strategy.lora_aggregation=ffa"],
     {"privacy.secagg": True, "strategy.lora_aggregation": "ffa"}),
    (["privacy=central_dp"], {"privacy.dp": "server_fixed", "privacy.target_epsilon": 8.0}),
    (["privacy=central_dp", "privacy.dp=client_adaptive"], {"privacy.dp": "client_adaptive"}),
    (["privacy=local_dp"], {"privacy.dp": "local", "privacy.secagg": False}),
    (["privacy=local_dp", "privacy.secagg=true"], {"privacy.dp": "local", "privacy.secagg": True}),
    (["privacy=local_dp", "privacy.per_layer_clipping=true"], {"privacy.per_layer_clipping": True}),
])
def test_linear_modes_compose_with_privacy(overrides, expected):
    cfg = load_config(overrides)
    assert {key: value_at(cfg, key) for key in expected} == expected


@pytest.mark.parametrize("recipe", ["default", "plain", "label_skew", "prox_rs"])
def test_the_local_dp_preset_turns_off_what_dp_sgd_refuses_and_says_so(recipe, capsys):
    """Whatever `train` chose, privacy=local_dp runs without the options DP-SGD refuses; the
    launcher's line names those the packaged default has on."""
    from common.rules import DP_SGD_OFF
    from launcher.prepare import dp_turned_off

    cfg = load_config([f"train={recipe}", "privacy=local_dp"])
    assert {k: value_at(cfg, f"train.{k}") for k in DP_SGD_OFF} == {
        k: 1.0 if k == "absent_class_scale" else 0.0 for k in DP_SGD_OFF}
    default = load_config([]).train
    expected = [k for k in DP_SGD_OFF if getattr(default, k) != getattr(cfg.train, k)]
    assert [line.split(" ")[0] for line in dp_turned_off(cfg)] == [f"train.{k}" for k in expected]
    assert dp_turned_off(load_config([f"train={recipe}"])) == []


def test_central_dp_accountant_state_survives_a_checkpoint():
    from flwr.app import Array, ArrayRecord

    from server.checkpoint import state_arrays, state_from_arrays
    from server.privacy import dp_wrapper
    from server.strategy import make_strategy

    cfg = load_config(["privacy=central_dp"])
    initial = ArrayRecord({"head.weight": Array(np.zeros((2, 3), dtype=np.float32))})
    strategy = make_strategy(cfg, initial, wrap=dp_wrapper(cfg, 10))
    strategy.state.dp_releases = 3
    fresh = make_strategy(cfg, initial, wrap=dp_wrapper(cfg, 10))
    fresh.restore(state_from_arrays(state_arrays(strategy.snapshot())))
    assert fresh.state.dp_releases == 3
