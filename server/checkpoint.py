"""The server-side state a checkpoint must hold beside the global adapter, and resuming from it.

Flower's server optimizers keep moments (FedAdam/FedYogi `m_t`, `v_t`; FedAvgM
`momentum_vector`), exact LoRA aggregation keeps base-weight residuals, heterogeneous ranks keep
the dense aggregated ΔW and each node's rank, central DP the number of noised releases (from
which the accountant recomputes ε). `strategy_state` flattens all of it to named
arrays (saved as safetensors each round); `restore_strategy_state` puts it back into a freshly
built strategy so the next round aggregates exactly as the uninterrupted run would.

A round folder `adapters/round-NNN/` is complete when it holds `checkpoint.json` (round number,
Python/NumPy/torch RNG states): the folder is written under a temp name and renamed, so a
crash leaves either the whole round or none of it. `last_checkpoint` finds the newest one and
`restore_adapter` loads its adapter into the server's model for `resume=true`.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from peft import PeftModel, set_peft_model_state_dict
from safetensors.numpy import load_file, save_file
from safetensors.torch import load_file as load_torch

from common.adapter import adapter_state, set_adapter_state, to_numpy
from common.model import Bundle

STATE_FILE = "server_state.safetensors"
META_FILE = "checkpoint.json"
ADAPTER_FILES = ("adapter_model.safetensors", "model.safetensors")  # PEFT, CNN-only ablation
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


def rng_state() -> dict:
    """The server process's Python, NumPy and torch RNG states, as JSON-able values."""
    version, internal, gauss = random.getstate()
    name, keys_, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(internal), gauss],
            "numpy": [name, keys_.tolist(), pos, has_gauss, cached],
            "torch": torch.get_rng_state().tolist()}


def restore_rng_state(state: dict) -> None:
    """Put back what `rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys_, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys_, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def write_meta(out_dir: Path, server_round: int) -> None:
    """Mark a round folder complete: its round number and the RNG states after it."""
    (Path(out_dir) / META_FILE).write_text(json.dumps({"round": server_round,
                                                       "rng": rng_state()}))


def last_checkpoint(run_dir: Path) -> tuple[int, Path] | None:
    """The newest complete round folder of a run: (round, folder), or None."""
    found = []
    for folder in (Path(run_dir) / "adapters").glob("round-*"):
        if re.fullmatch(r"round-\d+", folder.name) and (folder / META_FILE).is_file():
            found.append((json.loads((folder / META_FILE).read_text())["round"], folder))
    return max(found) if found else None


def restore_adapter(bundle: Bundle, checkpoint_dir: Path) -> dict[str, np.ndarray]:
    """Load a checkpoint's adapter into the server's model; return it as the global state."""
    path = next(Path(checkpoint_dir) / f for f in ADAPTER_FILES
                if (Path(checkpoint_dir) / f).is_file())
    tensors = load_torch(str(path))
    if isinstance(bundle.model, PeftModel):
        set_peft_model_state_dict(bundle.model, tensors)
    else:  # the CNN-only ablation saved its whole state dict: keep the trainable part
        set_adapter_state(bundle.model, {k: tensors[k] for k in adapter_state(bundle.model)})
    return to_numpy(adapter_state(bundle.model))
