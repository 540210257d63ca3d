"""Which settings combine: one table of rules, checked after every field's own range.

Each rule names the key its message is about, when it applies and what must hold; a broken rule
raises `ConfigError("<key> must be <allowed> (got <value>)")`, one line, before any work. The
strategy and LoRA-mode traits these rules read live in common/strategies.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.schema import CENTRAL_DP, MODALITIES, Config, ConfigError
from common.privacy import num_sampled_sites
from common.strategies import LORA_MODES, names_where, traits


@dataclass(frozen=True)
class Rule:
    key: str                                  # the setting the message names
    ok: Callable[[Config], bool]              # what must hold ...
    allowed: str | Callable[[Config], str]    # ... said as "<key> must be <allowed>"
    when: Callable[[Config], bool] = lambda c: True
    got: Callable[[Config], Any] | None = None  # the value shown (default: the key's)


def _local_dp(c: Config) -> bool:
    return c.privacy.dp == "local"


def _central_dp(c: Config) -> bool:
    return c.privacy.dp in CENTRAL_DP


def _secagg(c: Config) -> bool:
    return c.privacy.secagg


def _compressed(c: Config) -> bool:
    return c.strategy.compression != "none"


def _dropout(c: Config) -> float:
    t = c.train
    return t.modality_dropout_text + t.modality_dropout_image + t.modality_dropout_audio


def _absent_modality_skews(c: Config) -> dict:
    """Missing-modality skews of a modality the model does not have (they would do nothing)."""
    have = c.model.modalities or MODALITIES
    return {k: v for k, v in vars(c.skew).items()
            if k.startswith("missing_") and v > 0 and k.split("_")[1] not in have}


def _failing_sites(c: Config) -> int:
    """Sites that fail each round by config: dropped ones plus the crashing share."""
    sim = c.simulation
    return len(set(sim.drop_sites)) + round(sim.crash_fraction * c.partition.num_clients)


def _missing_skews(c: Config) -> dict:
    return {k: v for k, v in vars(c.skew).items() if k.startswith("missing_") and v > 0}


# The local-training options DP-SGD refuses (rules below); privacy=local_dp turns them off.
DP_SGD_OFF = ("proximal_mu", "absent_class_scale", "modality_dropout_text",
              "modality_dropout_image", "modality_dropout_audio", "max_grad_norm")
MEAN = names_where(linear=True)
LOCAL_DP = "with privacy.dp=local ("
CENTRAL = ("with privacy.dp={} (the DP wrappers clip and noise one uniform mean of "
           "whole-adapter updates)")
SECAGG = "with privacy.secagg=true (the server only sees the sum of masked updates; "
NOT_SECAGG = {"robust": "robust aggregation needs each update in plaintext)",
              "server_optimizer": "server optimizers are not wired through SecAgg+ here)"}

RULES: tuple[Rule, ...] = (
    # model and data
    Rule("model.vision.channels", lambda c: len(c.model.vision.channels) > 0,
         "non-empty when model.vision.name_or_path is null",
         when=lambda c: c.model.vision.name_or_path is None),
    Rule("model.projection_dim", lambda c: c.model.projection_dim > 0,
         "> 0 with model.fusion=gated (the gates mix projections of one width)",
         when=lambda c: c.model.fusion == "gated"),
    Rule("data.train", lambda c: bool(c.data.train), "a manifest path when data.source=manifest",
         when=lambda c: c.data.source == "manifest"),
    Rule("data.test", lambda c: bool(c.data.test), "a manifest path when data.source=manifest",
         when=lambda c: c.data.source == "manifest"),
    Rule("data.demo_train", lambda c: c.data.demo_train > 0, "> 0 with data.source=demo",
         when=lambda c: c.data.source == "demo"),
    Rule("data.demo_test", lambda c: c.data.demo_test > 0, "> 0 with data.source=demo",
         when=lambda c: c.data.source == "demo"),
    Rule("partition.on_small", lambda c: c.partition.on_small in ("refuse", "rebalance"),
         lambda c: f"refuse or rebalance with partition={c.partition.name} (merge and drop "
                   "group the sites of partition=natural)",
         when=lambda c: c.partition.name != "natural"),
    Rule("partition.on_small", lambda c: c.partition.on_small != "rebalance",
         "refuse, merge or drop with partition=natural (a natural site's rows stay its own)",
         when=lambda c: c.partition.name == "natural"),
    # personalization (client/personal.py)
    Rule("personalization.name", lambda c: c.personalization.name == "none",
         "none with privacy.secagg=true (comparing personal and global adapters per site is a "
         "federated evaluation, refused under SecAgg+)", when=_secagg),
    Rule("strategy.fraction_evaluate", lambda c: c.strategy.fraction_evaluate == 1,
         lambda c: f"1.0 with personalization={c.personalization.name} (every site compares "
                   "its personal adapter with the global one in the last round's evaluation)",
         when=lambda c: c.personalization.name != "none" and not c.privacy.secagg),
    Rule("personalization.name", lambda c: c.personalization.name != "ditto",
         "none or finetune with privacy.dp=local (Ditto's personal steps are not wired "
         "through the Opacus-wrapped DP-SGD model here)", when=_local_dp),
    Rule("personalization.name", lambda c: c.privacy.dp == "none",
         lambda c: f"none, finetune or ditto with privacy.dp={c.privacy.dp} (FedSA-LoRA's "
                   "partial uploads are not wired through the DP clipping here)",
         when=lambda c: c.personalization.name == "fedsa"),
    Rule("strategy.lora_aggregation", lambda c: c.strategy.lora_aggregation == "naive",
         "naive with personalization=fedsa (ffa would share no LoRA factor; exact needs each "
         "site's B to fold B·A)", when=lambda c: c.personalization.name == "fedsa"),
    Rule("simulation.site_ranks", lambda c: not set(c.simulation.site_ranks) - {c.model.lora.r},
         "[] with personalization=fedsa (FlexLoRA refactors the dense B·A, B stays at the sites)",
         when=lambda c: c.personalization.name == "fedsa"),
    # sampling and local training
    Rule("strategy.min_train_nodes", lambda c: c.strategy.min_train_nodes <= c.partition.num_clients,
         lambda c: f"in [1, partition.num_clients={c.partition.num_clients}]"),
    Rule("strategy.min_available_nodes",
         lambda c: c.strategy.min_available_nodes <= c.partition.num_clients,
         lambda c: f"in [1, partition.num_clients={c.partition.num_clients}]"),
    Rule("strategy.min_completed_rounds",
         lambda c: c.strategy.min_completed_rounds is None
         or c.strategy.min_completed_rounds <= c.strategy.rounds,
         lambda c: f"null (all) or in [1, strategy.rounds={c.strategy.rounds}]"),
    # simulated faults
    Rule("simulation.crash_fraction",
         lambda c: c.partition.num_clients - _failing_sites(c) >= c.strategy.min_train_nodes,
         lambda c: f"small enough to leave strategy.min_train_nodes={c.strategy.min_train_nodes}"
                   f" of partition.num_clients={c.partition.num_clients} sites training "
                   f"(with simulation.drop_sites={list(c.simulation.drop_sites)})",
         when=lambda c: c.simulation.crash_fraction > 0),
    Rule("simulation.straggler_s", lambda c: c.simulation.straggler_s > 0,
         "> 0 with simulation.straggler_sites set",
         when=lambda c: bool(c.simulation.straggler_sites)),
    Rule("strategy.name", lambda c: c.strategy.name != "fedprox", "other than fedprox " + LOCAL_DP
         + "the proximal term is not a per-sample loss)", when=_local_dp),
    Rule("train.proximal_mu", lambda c: c.train.proximal_mu > 0, "> 0 with strategy=fedprox",
         when=lambda c: c.strategy.name == "fedprox"),
    Rule("skew", lambda c: not _absent_modality_skews(c),
         lambda c: f"free of missing-modality skews of modalities outside model.modalities="
                   f"{list(c.model.modalities or ())}", got=_absent_modality_skews),
    Rule("train.modality_dropout_text", lambda c: _dropout(c) <= 1,
         lambda c: f"<= 1 - train.modality_dropout_image - train.modality_dropout_audio = "
                   f"{1 - c.train.modality_dropout_image - c.train.modality_dropout_audio:g} "
                   "(one draw per row hides one modality at most)"),
    # aggregation
    Rule("strategy.lora_aggregation", lambda c: traits(c.strategy.name).linear,
         lambda c: f"naive or ffa with strategy={c.strategy.name} (exact folds a non-linear "
                   f"residual and composes only with {MEAN})",
         when=lambda c: not LORA_MODES[c.strategy.lora_aggregation].linear),
    Rule("simulation.site_ranks",
         lambda c: traits(c.strategy.name).linear and c.strategy.lora_aggregation == "naive",
         lambda c: f"[] with strategy={c.strategy.name} strategy.lora_aggregation="
                   f"{c.strategy.lora_aggregation} (heterogeneous ranks need a mean strategy "
                   f"{MEAN} with naive LoRA aggregation)",
         when=lambda c: bool(set(c.simulation.site_ranks) - {c.model.lora.r})),
    # differential privacy
    Rule("privacy.noise_multiplier",
         lambda c: c.privacy.noise_multiplier > 0 or c.privacy.target_epsilon > 0,
         lambda c: f"> 0 (or privacy.target_epsilon > 0) with privacy.dp={c.privacy.dp}",
         when=lambda c: c.privacy.dp != "none"),
    Rule("skew", lambda c: not _missing_skews(c), "free of missing modalities " + LOCAL_DP
         + "a tower that skips rows breaks Opacus's per-sample gradients)", when=_local_dp,
         got=_missing_skews),
    Rule("train.proximal_mu", lambda c: c.train.proximal_mu == 0, "0 " + LOCAL_DP
         + "the proximal term is not a per-sample loss)", when=_local_dp),
    Rule("train.absent_class_scale", lambda c: c.train.absent_class_scale == 1, "1 " + LOCAL_DP
         + "the site's label set is not covered by per-sample clipping)", when=_local_dp),
    Rule("train.modality_dropout_text", lambda c: _dropout(c) == 0,
         "0 (and modality_dropout_image, modality_dropout_audio 0) " + LOCAL_DP
         + "a tower that skips rows breaks Opacus's per-sample gradients)", when=_local_dp,
         got=_dropout),
    Rule("train.max_grad_norm", lambda c: c.train.max_grad_norm == 0, "0 " + LOCAL_DP
         + "DP-SGD clips each sample to privacy.clipping_norm)", when=_local_dp),
    Rule("privacy.per_layer_clipping", lambda c: not c.privacy.per_layer_clipping,
         lambda c: f"false with privacy.dp={c.privacy.dp} (per-layer clipping is wired to local "
                   "DP-SGD's per-sample gradients; central DP clips each site's whole update)",
         when=lambda c: not _local_dp(c)),
    Rule("strategy.name", lambda c: traits(c.strategy.name).central_dp,
         lambda c: f"one of {names_where(central_dp=True)} " + CENTRAL.format(c.privacy.dp),
         when=_central_dp),
    Rule("strategy.lora_aggregation", lambda c: c.strategy.lora_aggregation == "naive" or (
        c.strategy.lora_aggregation == "ffa" and c.privacy.dp.startswith("server_")),
        lambda c: f"naive, or ffa with a server_* mode, with privacy.dp={c.privacy.dp} (the "
                  "server clips one uniform mean of whole-adapter updates, to which ffa's "
                  "frozen A adds nothing; client_* sites clip without A)", when=_central_dp),
    Rule("privacy.dp", lambda c: c.privacy.dp in ("none", "server_fixed", "local"),
         "none, server_fixed or local with strategy.sampling=poisson (fedmm releases the "
         "Poisson-sampled Gaussian sum itself, clipping at the server with a fixed norm)",
         when=lambda c: c.strategy.sampling == "poisson"),
    Rule("simulation.site_ranks", lambda c: not c.simulation.site_ranks,
         lambda c: "[] " + CENTRAL.format(c.privacy.dp), when=_central_dp),
    Rule("privacy.secagg", lambda c: not c.privacy.secagg,
         lambda c: f"false with privacy.dp={c.privacy.dp} (central DP here is wired to the "
                   "plaintext Message-API strategy; use privacy.dp=local with SecAgg+)",
         when=_central_dp),
    # secure aggregation
    Rule("strategy.sampling", lambda c: c.strategy.sampling == "fixed", "fixed " + SECAGG
         + "Flower's SecAgg+ workflow samples the sites itself)", when=_secagg),
    Rule("resume", lambda c: not c.resume, "false with privacy.secagg=true (Flower's legacy "
         "SecAgg+ workflow always starts at round 1)", when=_secagg),
    Rule("strategy.lora_aggregation", lambda c: LORA_MODES[c.strategy.lora_aggregation].linear,
         "naive or ffa " + SECAGG + "exact needs each site's factors to form the product "
         "residual)", when=_secagg),
    Rule("strategy.name", lambda c: traits(c.strategy.name).secagg,
         lambda c: f"one of {names_where(secagg=True)} " + SECAGG
                   + NOT_SECAGG[traits(c.strategy.name).kind], when=_secagg),
    Rule("simulation.site_ranks", lambda c: not c.simulation.site_ranks,
         "[] " + SECAGG + "heterogeneous ranks need each site's factors)", when=_secagg),
    Rule("strategy.max_update_norm", lambda c: c.strategy.max_update_norm == 0,
         "0 " + SECAGG + "screening an update's norm needs it in plaintext)", when=_secagg),
    Rule("strategy.fraction_evaluate", lambda c: c.strategy.fraction_evaluate == 0,
         "0 " + SECAGG + "the server evaluates the global adapter on the test split)",
         when=_secagg),
    Rule("privacy.num_shares", lambda c: c.privacy.num_shares <= 1 or (
        c.privacy.num_shares == int(c.privacy.num_shares) and c.privacy.num_shares > 2),
        "a fraction in (0, 1] or an integer > 2", when=_secagg),
    Rule("privacy.reconstruction_threshold", lambda c: c.privacy.reconstruction_threshold <= 1
         or c.privacy.num_shares <= 1 or c.privacy.reconstruction_threshold < c.privacy.num_shares,
         "a fraction in (0, 1] or an integer < privacy.num_shares", when=_secagg),
    Rule("strategy.fraction_train", lambda c: num_sampled_sites(c) >= 3,
         "large enough to sample >= 3 sites with privacy.secagg=true", when=_secagg),
    # compressed updates (common/compression.py)
    Rule("strategy.compression", lambda c: not c.privacy.secagg,
         "none " + SECAGG + "SecAgg+ quantizes the masked update itself)", when=_compressed),
    Rule("strategy.compression", lambda c: c.privacy.dp not in ("client_fixed", "client_adaptive"),
         lambda c: f"none with privacy.dp={c.privacy.dp} (the site clips its plain update; "
                   "compressing it after the clip breaks the clip's bound)", when=_compressed),
    Rule("simulation.site_ranks", lambda c: not set(c.simulation.site_ranks) - {c.model.lora.r},
         lambda c: f"[] with strategy.compression={c.strategy.compression} (the server decodes "
                   "each update against the global adapter's layout)", when=_compressed),
)


def value_at(cfg: Config, key: str) -> Any:
    """The config value at a dotted key."""
    value: Any = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return list(value) if isinstance(value, tuple) else value


def check_rules(cfg: Config, check_files: bool = True) -> None:
    """Raise ConfigError for the first broken rule (and, with `check_files`, missing manifests)."""
    for rule in RULES:
        if rule.when(cfg) and not rule.ok(cfg):
            allowed = rule.allowed(cfg) if callable(rule.allowed) else rule.allowed
            got = rule.got(cfg) if rule.got else value_at(cfg, rule.key)
            raise ConfigError(f"{rule.key} must be {allowed} (got {got!r})")
    if check_files and cfg.data.source == "manifest":
        for key in ("data.train", "data.test"):
            if not Path(str(value_at(cfg, key))).is_file():
                raise ConfigError(f"{key} must be an existing file (got {value_at(cfg, key)!r})")
