"""The attributes fedmm reads from inside Flower's strategies: all of them, in this one file.

Flower's server optimizers keep their state as attributes (FedAdam/FedYogi `m_t`, `v_t`;
FedAvgM `momentum_vector`, `current_arrays`), which common/strategies.py lists per strategy as
`server_state`. `read_optimizer_state` flattens them to named arrays for a checkpoint and
`write_optimizer_state` puts them back; `flower_strategy` finds the Flower strategy behind a DP
wrapper; `aggregate_train_metrics` averages replies' metrics the way that strategy does.
tests/unit/test_flower_state.py pins every name here against the installed Flower.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, Strategy

DP_INNER = "strategy"  # Flower's DP wrappers hold the wrapped strategy here


def flower_strategy(strategy: Strategy) -> Strategy:
    """The Flower strategy itself, behind any of Flower's DP wrappers."""
    return getattr(strategy, DP_INNER, strategy)


def aggregate_train_metrics(strategy: Strategy, contents: list[RecordDict]) -> MetricRecord:
    """Weighted mean of the replies' train metrics, by the strategy's own rule and weight key."""
    flower: FedAvg = flower_strategy(strategy)  # type: ignore[assignment]
    return flower.train_metrics_aggr_fn(contents, flower.weighted_by_key)


def read_optimizer_state(strategy: Strategy, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The named state attributes of a Flower strategy as flat named arrays.

    dict -> `name/dict/key`, list -> `name/list/00000`, ArrayRecord (ordered) ->
    `name/record/00000/key`; unset (None or empty) attributes are left out.
    """
    flower, out = flower_strategy(strategy), {}
    for name in names:
        value = getattr(flower, name)
        if isinstance(value, ArrayRecord):
            for i, (key, array) in enumerate(value.items()):
                out[f"{name}/record/{i:05d}/{key}"] = np.ascontiguousarray(array.numpy())
        elif isinstance(value, dict):
            out.update({f"{name}/dict/{k}": np.ascontiguousarray(v) for k, v in value.items()})
        elif isinstance(value, list):
            out.update({f"{name}/list/{i:05d}": np.ascontiguousarray(v)
                        for i, v in enumerate(value)})
        elif value is not None:
            raise TypeError(f"{type(flower).__name__}.{name}: cannot checkpoint {type(value)}")
    return out


def write_optimizer_state(strategy: Strategy, state: dict[str, np.ndarray]) -> None:
    """Put what `read_optimizer_state` returned back into a freshly built Flower strategy."""
    flower = flower_strategy(strategy)
    parts: dict[str, dict] = {}
    for flat in sorted(state):
        name, kind, rest = flat.split("/", 2)
        parts.setdefault(name, {"kind": kind, "items": []})["items"].append((rest, state[flat]))
    for name, part in parts.items():
        items = part["items"]
        if part["kind"] == "record":
            value = ArrayRecord({key.split("/", 1)[1]: Array(v) for key, v in items})
        elif part["kind"] == "dict":
            value = dict(items)
        else:
            value = [v for _, v in items]
        setattr(flower, name, value)
