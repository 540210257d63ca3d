"""`NormBoundedFedAvg`: the robust FedAvg Flower lacks (Sun et al. 2019, norm bounding).

Each site's update (its adapter minus the global one) is clipped to a norm bound before the
weighted mean: `strategy.norm_bound`, or 0 for the round's median update norm.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common import keys
from common.lora_math import norm_bounded_mean
from server.replies import decode_arrays, to_record

log = logging.getLogger("fedmm.server")


class NormBoundedFedAvg(FedAvg):
    """FedAvg of updates clipped to a norm bound (default: the round's median update norm)."""

    def __init__(self, *, norm_bound: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.norm_bound = norm_bound
        self.current: dict[str, np.ndarray] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.current = decode_arrays(arrays)  # the global adapter the updates are measured from
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = [m for m in replies if not m.has_error()]
        if not replies:
            return None, None
        states = [decode_arrays(m.content[keys.ARRAYS]) for m in replies]
        weights = [float(m.content[keys.METRICS][keys.NUM_EXAMPLES]) for m in replies]
        state, bound = norm_bounded_mean(states, weights, self.current, self.norm_bound or None)
        log.info("round %d: updates clipped to norm %.4g", server_round, bound)
        metrics = self.train_metrics_aggr_fn([m.content for m in replies], self.weighted_by_key)
        return to_record(state), metrics
