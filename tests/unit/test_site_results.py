"""Per-site results and personalization contracts, against NumPy and real Flower Messages."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from common import keys
from common.config import ConfigError, load_config
from common.model import build_model
from common.site_metrics import site_summary
from common.train import train_local
from server.site_report import plot_sites, site_columns, site_outcome
from server.replies import site_results
from tests.conftest import LABELS, random_batch, tiny_overrides, train_options

SITES = {"h-a": {"accuracy": 0.9, "macro_f1": 0.8}, "h-b": {"accuracy": 0.4, "macro_f1": 0.5},
         "other": {"accuracy": 0.7, "macro_f1": 0.2}}


def test_site_summary_is_mean_worst_and_spread():
    out = site_summary(SITES)
    acc, f1 = [s["accuracy"] for s in SITES.values()], [s["macro_f1"] for s in SITES.values()]
    assert out["site_accuracy_mean"] == pytest.approx(np.mean(acc))
    assert out["site_accuracy_worst"] == np.min(acc) and out["site_accuracy_worst_site"] == "h-b"
    assert out["site_accuracy_spread"] == pytest.approx(np.ptp(acc))
    assert out["site_macro_f1_worst_site"] == "other"
    assert out["site_macro_f1_spread"] == pytest.approx(np.ptp(f1))


def _reply(name: str | None, accuracy: float, personal: float | None = None) -> Message:
    metrics = {keys.NUM_EXAMPLES: 10, keys.EVAL_LOSS: 1.0, keys.EVAL_ACCURACY: accuracy,
               keys.EVAL_MACRO_F1: accuracy / 2}
    if personal is not None:
        metrics.update({keys.PERSONAL_ACCURACY: personal, keys.PERSONAL_MACRO_F1: personal})
    content = RecordDict({keys.METRICS: MetricRecord(metrics)})
    if name is not None:
        content[keys.SITE] = ConfigRecord({keys.SITE_NAME: name})
    return Message(content, dst_node_id=7, message_type="evaluate")


@pytest.mark.usefixtures("flower_task_identity")
def test_site_results_name_each_site_and_skip_replies_without_a_name():
    sites = site_results([_reply("b", 0.5, 0.75), _reply("a", 0.25), _reply(None, 1.0)])
    assert list(sites) == ["a", "b"]
    assert sites["b"] == {"accuracy": 0.5, "macro_f1": 0.25, "loss": 1.0, "num_examples": 10,
                          "personal_accuracy": 0.75, "personal_macro_f1": 0.75}


def test_summary_compares_global_and_personal_per_site(tmp_path):
    cfg = load_config(["personalization=finetune"])
    sites = {n: {**s, "personal_accuracy": s["accuracy"] + d, "personal_macro_f1": 0.5}
             for (n, s), d in zip(SITES.items(), (0.05, 0.2, -0.1))}
    rows = [{"round": 0}, {"round": 1, "sites": SITES}, {"round": 2, "sites": sites}]
    out = site_outcome(cfg, rows)
    assert out["sites_round"] == 2 and out["personalization"] == "finetune"
    assert out["personal_gain"] == pytest.approx({"h-a": 0.05, "h-b": 0.2, "other": -0.1})
    assert out["personal_gain_mean"] == pytest.approx(np.mean([0.05, 0.2, -0.1]))
    assert out["personal_gain_worst"] == pytest.approx(-0.1)
    assert out["personal_accuracy_worst_site"] == "other"
    assert plot_sites(tmp_path / "per_site.png", rows).stat().st_size > 0
    assert plot_sites(tmp_path / "none.png", rows[:1]) is None


def test_per_site_figures_under_dp_are_marked_outside_the_accountant():
    assert "sites_outside_accountant" not in site_columns(load_config([]), SITES)
    assert site_columns(load_config(["privacy=central_dp"]), SITES)["sites_outside_accountant"]
    assert site_columns(load_config(["privacy=central_dp"]), {}) == {}


@pytest.mark.parametrize("overrides, key", [
    (["privacy=secagg", "personalization=finetune"], "personalization.name"),
    (["personalization=ditto", "strategy.fraction_evaluate=0.5"], "strategy.fraction_evaluate"),
    (["privacy=local_dp", "personalization=ditto"], "personalization.name"),
    (["personalization.name=fedavg"], "personalization.name"),
])
def test_personalization_refusals_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=rf"^{key} must be"):
        load_config(overrides)


def test_personalization_options_turn_on_per_site_evaluation():
    for mode in ("finetune", "ditto"):
        cfg = load_config([f"personalization={mode}"])
        assert cfg.personalization.name == mode and cfg.strategy.fraction_evaluate == 1.0
    assert load_config(["privacy=local_dp", "personalization=finetune"]).personalization.name


def _trainable(bundle) -> list[torch.Tensor]:
    return [p.detach().clone() for p in bundle.model.parameters() if p.requires_grad]


def _distance(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return float(sum((x - y).pow(2).sum() for x, y in zip(a, b)))


def test_ditto_anchor_pulls_towards_the_given_tensors_not_the_start(tiny_text_dir):
    """Ditto trains the personal v with lambda/2 ||v - w_global||^2: from a v away from w, a
    strong pull ends nearer w than no pull does (an anchor ignored would pull towards v)."""
    cfg = load_config(tiny_overrides(tiny_text_dir))
    bundle = build_model(cfg.model, LABELS)
    data = random_batch(16)
    w = _trainable(bundle)
    train_local(bundle, data, train_options(epochs=3, batch_size=8, lr=1e-2))
    v = _trainable(bundle)
    ends = {}
    for mu, anchor in ((0.0, w), (50.0, w), (50.0, None)):  # None: the start, v
        with torch.no_grad():
            for p, start in zip([p for p in bundle.model.parameters() if p.requires_grad], v):
                p.copy_(start)
        train_local(bundle, data, train_options(epochs=2, batch_size=8, lr=1e-2,
                                                proximal_mu=mu), anchor=anchor)
        ends[mu, anchor is None] = _distance(_trainable(bundle), w)
    assert ends[50.0, False] < 0.5 * ends[0.0, False] < ends[50.0, True], ends


@pytest.mark.parametrize("overrides, key", [
    (["personalization=fedsa", "privacy=central_dp"], "personalization.name"),
    (["personalization=fedsa", "strategy.lora_aggregation=ffa"], "strategy.lora_aggregation"),
    (["personalization=fedsa", "simulation.site_ranks=[4,8]"], "simulation.site_ranks"),
])
def test_fedsa_refusals_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=rf"^{key} must be"):
        load_config(overrides)
