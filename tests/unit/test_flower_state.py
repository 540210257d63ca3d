"""Every name fedmm reads inside Flower's strategies, pinned against the installed Flower."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from common.strategies import STRATEGY_TRAITS
from server import flower_state
from server.privacy import WRAPPERS, dp_wrapper
from server.strategy import flower_class, make_strategy, strategy_args
from tests.conftest import strategy_cfg


@pytest.mark.parametrize("name", sorted(STRATEGY_TRAITS))
def test_traits_name_real_flower_classes_arguments_and_state(name):
    cls = flower_class(name)
    parameters = {n: p for c in cls.__mro__ if "__init__" in vars(c)
                  for n, p in inspect.signature(c.__init__).parameters.items()}  # **kwargs: bases
    for arg, _key in STRATEGY_TRAITS[name].args:
        assert arg in parameters, f"{cls.__name__}.__init__ takes no {arg!r}"
    strategy = cls(**strategy_args(strategy_cfg(name)))
    for attribute in STRATEGY_TRAITS[name].server_state:
        assert hasattr(strategy, attribute), f"{cls.__name__} has no {attribute!r}"
    for attribute in ("train_metrics_aggr_fn", "weighted_by_key"):  # aggregate_train_metrics
        assert hasattr(strategy, attribute), f"{cls.__name__} has no {attribute!r}"


@pytest.mark.parametrize("mode", sorted(WRAPPERS))
def test_flowers_dp_wrappers_hold_the_wrapped_strategy_where_fedmm_looks(mode):
    cfg = strategy_cfg("fedavg", overrides=(f"privacy.dp={mode}", "privacy.noise_multiplier=1",
                                                 "privacy.clipped_count_stddev=1"))
    initial = ArrayRecord({"head.weight": Array(np.zeros(3, np.float32))})
    strategy = make_strategy(cfg, initial, wrap=dp_wrapper(cfg, 2))
    assert isinstance(strategy.inner, WRAPPERS[mode])
    assert getattr(strategy.inner, flower_state.DP_INNER) is flower_state.flower_strategy(
        strategy.inner)
    assert type(flower_state.flower_strategy(strategy.inner)).__name__ == "FedAvg"


def test_optimizer_state_of_every_kind_round_trips():
    strategy = flower_class("fedavgm")(**strategy_args(strategy_cfg("fedavgm")))
    strategy.current_arrays = ArrayRecord({"b": Array(np.ones(2, np.float32)),
                                           "a": Array(np.zeros(3, np.float32))})
    strategy.momentum_vector = [np.full(2, 0.5, np.float32), np.full(3, 0.25, np.float32)]
    flat = flower_state.read_optimizer_state(strategy, ("momentum_vector", "current_arrays"))
    fresh = flower_class("fedavgm")(**strategy_args(strategy_cfg("fedavgm")))
    flower_state.write_optimizer_state(fresh, flat)
    assert list(fresh.current_arrays.keys()) == ["b", "a"]  # order is what FedAvgM zips by
    for got, want in zip(fresh.momentum_vector, strategy.momentum_vector):
        np.testing.assert_array_equal(got, want)
    adam = flower_class("fedadam")(**strategy_args(strategy_cfg("fedadam")))
    adam.m_t, adam.v_t = {"x": np.ones(2, np.float32)}, {"x": np.full(2, 2, np.float32)}
    again = flower_class("fedadam")(**strategy_args(strategy_cfg("fedadam")))
    flower_state.write_optimizer_state(again, flower_state.read_optimizer_state(adam, ("m_t",
                                                                                       "v_t")))
    np.testing.assert_array_equal(again.v_t["x"], adam.v_t["x"])
