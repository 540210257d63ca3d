"""What each aggregation strategy and LoRA mode is: one table, from which every list and refusal
derives (common/rules.py reads it; server/strategy.py builds the Flower strategy from it).

    kind          mean | server_optimizer | robust
    linear        the new global adapter is a weighted mean of the replies: it composes with
                  SecAgg+'s masked sum, central DP's noised mean, modality weighting, FlexLoRA
    one_rank      every site must train LoRA at the global rank
    secagg        composes with SecAgg+ (the server only ever sees the sum of masked updates)
    central_dp    composes with Flower's central-DP wrappers (a uniform mean of clipped updates)
    server_state  what the Flower strategy carries across rounds (saved in every checkpoint)
    flower        the Flower Message-API class (flwr.serverapp.strategy), or fedmm's own
    args          Flower constructor argument <- config key
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StrategyTraits:
    kind: str
    linear: bool
    one_rank: bool
    secagg: bool
    central_dp: bool
    flower: str
    server_state: tuple[str, ...] = ()
    args: tuple[tuple[str, str], ...] = ()


_SAMPLING = (("fraction_train", "strategy.fraction_train"),
             ("fraction_evaluate", "strategy.fraction_evaluate"),
             ("min_train_nodes", "strategy.min_train_nodes"),
             ("min_available_nodes", "strategy.min_available_nodes"))
_MEAN = dict(kind="mean", linear=True, one_rank=False, secagg=True, central_dp=True)
_OPTIMIZER = dict(kind="server_optimizer", linear=False, one_rank=True, secagg=False,
                  central_dp=False)
_ROBUST = dict(kind="robust", linear=False, one_rank=True, secagg=False, central_dp=False)

STRATEGY_TRAITS: dict[str, StrategyTraits] = {
    "fedavg": StrategyTraits(**_MEAN, flower="FedAvg", args=_SAMPLING),
    "fedprox": StrategyTraits(**_MEAN, flower="FedProx",
                              args=_SAMPLING + (("proximal_mu", "train.proximal_mu"),)),
    "fedadam": StrategyTraits(**_OPTIMIZER, flower="FedAdam", server_state=("m_t", "v_t"),
                              args=_SAMPLING + (("eta", "strategy.server_lr"),
                                                ("eta_l", "train.lr"))),
    "fedyogi": StrategyTraits(**_OPTIMIZER, flower="FedYogi", server_state=("m_t", "v_t"),
                              args=_SAMPLING + (("eta", "strategy.server_lr"),
                                                ("eta_l", "train.lr"))),
    "fedavgm": StrategyTraits(**_OPTIMIZER, flower="FedAvgM",
                              server_state=("momentum_vector", "current_arrays"),
                              args=_SAMPLING + (("server_learning_rate", "strategy.server_lr"),
                                                ("server_momentum",
                                                 "strategy.server_momentum"))),
    "fedmedian": StrategyTraits(**_ROBUST, flower="FedMedian", args=_SAMPLING),
    "fedtrimmedavg": StrategyTraits(**_ROBUST, flower="FedTrimmedAvg",
                                    args=_SAMPLING + (("beta", "strategy.trim_fraction"),)),
    "krum": StrategyTraits(**_ROBUST, flower="Krum",
                           args=_SAMPLING + (("num_malicious_nodes", "strategy.num_malicious"),)),
    "multikrum": StrategyTraits(**_ROBUST, flower="MultiKrum",
                                args=_SAMPLING + (("num_malicious_nodes",
                                                   "strategy.num_malicious"),
                                                  ("num_nodes_to_select",
                                                   "strategy.num_to_keep"))),
    "normbounded": StrategyTraits(**_ROBUST, flower="NormBoundedFedAvg", args=_SAMPLING),
}
STRATEGIES = tuple(STRATEGY_TRAITS)


@dataclass(frozen=True)
class LoraModeTraits:
    linear: bool        # the aggregate is a weighted mean of what sites upload
    uploads_a: bool     # sites upload their LoRA A factors
    server_state: tuple[str, ...] = ()


LORA_MODES: dict[str, LoraModeTraits] = {
    "naive": LoraModeTraits(linear=True, uploads_a=True),   # FedIT: average A and B
    "ffa": LoraModeTraits(linear=True, uploads_a=False),    # FFA-LoRA: A frozen from the seed
    "exact": LoraModeTraits(linear=False, uploads_a=True,   # FedEx-LoRA: residual in base W
                            server_state=("residuals",)),
}
LORA_AGGREGATIONS = tuple(LORA_MODES)


def site_only(lora_aggregation: str, personalization: str = "none") -> tuple[str, ...]:
    """Key fragments of the LoRA factors sites never upload: A under ffa (frozen from the
    shared seed), B under FedSA-LoRA (`personalization=fedsa`: each site's own)."""
    return ((() if LORA_MODES[lora_aggregation].uploads_a else (".lora_A.",))
            + ((".lora_B.",) if personalization == "fedsa" else ()))


def traits(name: str) -> StrategyTraits:
    """The traits of strategy `name` (validated config names only)."""
    return STRATEGY_TRAITS[name]


def names_where(**wanted: object) -> list[str]:
    """Strategy names whose traits have the given values, e.g. `names_where(linear=True)`."""
    return [n for n, t in STRATEGY_TRAITS.items()
            if all(getattr(t, k) == v for k, v in wanted.items())]
