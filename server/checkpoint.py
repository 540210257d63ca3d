"""The server-side state a checkpoint must hold beside the global adapter.

Flower's server optimizers keep moments (FedAdam/FedYogi `m_t`, `v_t`; FedAvgM
`momentum_vector`), exact LoRA aggregation keeps base-weight residuals, heterogeneous ranks keep
the dense aggregated ΔW and each node's rank, central DP the number of noised releases (from
which the accountant recomputes ε). `strategy_state` flattens all of it to named
arrays (saved as safetensors each round); `restore_strategy_state` puts it back into a freshly
built strategy so the next round aggregates exactly as the uninterrupted run would.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord
from safetensors.numpy import load_file, save_file

STATE_FILE = "server_state.safetensors"
_DICTS = ("m_t", "v_t", "residuals", "global_delta")


def strategy_state(strategy: object) -> dict[str, np.ndarray]:
    """Named arrays of everything the strategy carries from round to round."""
    out: dict[str, np.ndarray] = {}
    for name in _DICTS:
        for key, value in (getattr(strategy, name, None) or {}).items():
            out[f"{name}/{key}"] = np.ascontiguousarray(value)
    for i, value in enumerate(getattr(strategy, "momentum_vector", None) or []):
        out[f"momentum_vector/{i:05d}"] = np.ascontiguousarray(value)
    current = getattr(strategy, "current_arrays", None)
    if isinstance(current, ArrayRecord):  # FedAvgM keeps the arrays its momentum refers to
        current = {k: v.numpy() for k, v in current.items()}
    for i, (key, value) in enumerate((current or {}).items()):  # order matters to FedAvgM
        out[f"current_arrays/{i:05d}/{key}"] = np.ascontiguousarray(value)
    if getattr(strategy, "dp_releases", 0):  # central DP: the accountant's state
        out["dp_releases"] = np.array([strategy.dp_releases], dtype=np.int64)  # type: ignore[attr-defined]
    nodes = getattr(strategy, "node_ranks", None) or {}
    if nodes:
        out["node_ranks"] = np.array(sorted(nodes.items()), dtype=np.uint64)  # (N, 2) node ids are u64
    return out


def restore_strategy_state(strategy: object, state: dict[str, np.ndarray]) -> None:
    """Load `strategy_state` output into a strategy built from the same config."""
    for name in _DICTS:
        part = {k.split("/", 1)[1]: v for k, v in state.items() if k.startswith(f"{name}/")}
        if part or hasattr(strategy, name):
            setattr(strategy, name, part)
    momentum = [state[k] for k in sorted(state) if k.startswith("momentum_vector/")]
    if momentum:
        strategy.momentum_vector = momentum  # type: ignore[attr-defined]
    current = {k.split("/", 2)[2]: state[k] for k in sorted(state)
               if k.startswith("current_arrays/")}
    if current:
        from flwr.serverapp.strategy import FedAvgM

        strategy.current_arrays = (  # type: ignore[attr-defined]
            ArrayRecord({k: Array(v) for k, v in current.items()})
            if isinstance(strategy, FedAvgM) else current)
    if "dp_releases" in state:
        strategy.dp_releases = int(state["dp_releases"][0])  # type: ignore[attr-defined]
    if "node_ranks" in state:
        strategy.node_ranks = {int(n): int(r) for n, r in state["node_ranks"]}  # type: ignore[attr-defined]


def save_strategy_state(strategy: object, out_dir: Path) -> None:
    """Write the strategy state beside a checkpoint's adapter."""
    state = strategy_state(strategy)
    if state:
        save_file(state, str(out_dir / STATE_FILE))


def load_strategy_state(checkpoint_dir: Path) -> dict[str, np.ndarray]:
    """Read a checkpoint's strategy state (empty if it has none)."""
    path = Path(checkpoint_dir) / STATE_FILE
    return load_file(str(path)) if path.is_file() else {}
