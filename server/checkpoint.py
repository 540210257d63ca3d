"""A checkpoint: the global adapter, the strategy's `StrategyState`, the RNG states, the round.

`StrategyState` (server/strategy.py) holds what aggregation carries across rounds: Flower's
server-optimizer moments (FedAdam/FedYogi `m_t`, `v_t`; FedAvgM `momentum_vector`,
`current_arrays`), exact LoRA aggregation's base-weight residuals, heterogeneous ranks' dense
ΔW and each node's rank, and central DP's count of noised releases (from which the accountant
recomputes ε). It is saved as named arrays (safetensors) every round and restores into a freshly
built strategy, so the next round aggregates exactly as the uninterrupted run would.

A round folder `adapters/round-NNN/` is complete when it holds `checkpoint.json` (round number,
Python/NumPy/torch RNG states): the folder is written under a temp name and renamed, so a
crash leaves either the whole round or none of it (a temp folder, `.round-NNN-*`, which
`last_checkpoint` never reads and `discard_partial` removes). `last_checkpoint` finds the newest
one and `restore_adapter` loads its adapter into the server's model for `resume=true`.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from peft import PeftModel, set_peft_model_state_dict
from safetensors.numpy import load_file, save_file
from safetensors.torch import load_file as load_torch

from common.adapter import adapter_state, set_adapter_state, to_numpy
from common.model import Bundle
from server.strategy import StrategyState

STATE_FILE = "server_state.safetensors"
META_FILE = "checkpoint.json"
ADAPTER_FILES = ("adapter_model.safetensors", "model.safetensors")  # PEFT, CNN-only ablation
_ARRAY_DICTS = ("residuals", "global_delta", "optimizer")  # StrategyState fields of named arrays


def state_arrays(state: StrategyState) -> dict[str, np.ndarray]:
    """A StrategyState as flat named arrays (what `server_state.safetensors` holds)."""
    out = {f"{name}/{key}": np.ascontiguousarray(value) for name in _ARRAY_DICTS
           for key, value in getattr(state, name).items()}
    if state.dp_releases:
        out["dp_releases"] = np.array([state.dp_releases], dtype=np.int64)
    if state.node_ranks:  # (N, 2) node ids are u64
        out["node_ranks"] = np.array(sorted(state.node_ranks.items()), dtype=np.uint64)
    return out


def state_from_arrays(arrays: dict[str, np.ndarray]) -> StrategyState:
    """What `state_arrays` flattened, rebuilt."""
    parts = {name: {k.split("/", 1)[1]: v for k, v in arrays.items()
                    if k.startswith(f"{name}/")} for name in _ARRAY_DICTS}
    releases = int(arrays["dp_releases"][0]) if "dp_releases" in arrays else 0
    ranks = {int(n): int(r) for n, r in arrays.get("node_ranks", np.zeros((0, 2)))}
    return StrategyState(**parts, node_ranks=ranks, dp_releases=releases)


def save_strategy_state(state: StrategyState, out_dir: Path) -> None:
    """Write the strategy state beside a checkpoint's adapter."""
    arrays = state_arrays(state)
    if arrays:
        save_file(arrays, str(out_dir / STATE_FILE))


def load_strategy_state(checkpoint_dir: Path) -> StrategyState:
    """Read a checkpoint's strategy state (an empty one if it has none)."""
    path = Path(checkpoint_dir) / STATE_FILE
    return state_from_arrays(load_file(str(path)) if path.is_file() else {})


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


def discard_partial(run_dir: Path) -> list[Path]:
    """Remove round folders a crash left half-written (temp names); return what was removed."""
    partial = sorted((Path(run_dir) / "adapters").glob(".round-*"))
    for folder in partial:
        shutil.rmtree(folder, ignore_errors=True)
    return partial


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
