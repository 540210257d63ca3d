"""The update a site uploads, compressed as `strategy.compression` asks (common/compression.py).

With `topk`, what a round did not send (the error-feedback residual) stays in this site's
Flower Context (`context.state`), which Flower keeps across rounds in simulation and at a
deployed SuperNode, and joins the next round's update.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Context

from common.compression import compress
from common.schema import Config

RESIDUAL_STATE = "fedmm.topk-residual"  # this site's error-feedback residual (topk)


def upload_record(cfg: Config, context: Context, state: dict[str, np.ndarray],
                  global_state: dict[str, np.ndarray], seed: int) -> ArrayRecord:
    """The reply's ArrayRecord: the adapter tensors, or the compressed update local − global."""
    mode = cfg.strategy.compression
    if mode == "none":
        return ArrayRecord({k: Array(v) for k, v in state.items()})
    delta = {k: np.asarray(v, np.float32) - global_state[k] for k, v in state.items()}
    stored = context.state.array_records.get(RESIDUAL_STATE)
    residual = {k: v.numpy() for k, v in stored.items()} if stored is not None else None
    payload, residual = compress(delta, mode, np.random.default_rng(seed),
                                 cfg.strategy.topk_fraction, residual)
    if residual is not None:
        context.state[RESIDUAL_STATE] = ArrayRecord({k: Array(v) for k, v in residual.items()})
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in payload.items()})
