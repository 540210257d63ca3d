"""Compressed updates: what a site uploads instead of its float32 adapter (`strategy.compression`).

A site compresses its update Δ = local − global over the tensors it uploads (sorted keys, each
flattened, concatenated into one vector of n numbers); the server decompresses before screening,
so screening, robust strategies, DP wrappers and checkpoints see plain float32 arrays.

    none   float32 tensors, as without compression (4 bytes per number)
    int8   per tensor a scale s = max|Δ| / 127 and codes q in [-127, 127] by stochastic rounding,
           q = floor(Δ/s + u), u ~ U[0, 1): E[q·s] = Δ (unbiased); 1 byte per number
    int4   the same with 7 levels each side, two codes per byte: 1/2 byte per number
    topk   per tensor the ceil(f·n_t) entries of largest |Δ + e| (f = `strategy.topk_fraction`)
           as (index, value); e, what was not sent, stays at the site (its Flower Context) and
           joins the next round's update (error feedback), so Σ_t sent_t + e_T = Σ_t Δ_t;
           8 bytes per sent number

The payload is a few flat arrays, not one per tensor, so per-array headers do not eat the
savings (int8/int4: `codes`, `scales`; topk: `indices`, `values`). Everything here is NumPy:
client/compression.py and server/strategy.py wrap it in Flower records.
"""

from __future__ import annotations

import math

import numpy as np

COMPRESSIONS = ("none", "int8", "int4", "topk")
LEVELS = {"int8": 127, "int4": 7}  # codes per side of zero
PAYLOAD_KEYS = {"int8": ("codes", "scales"), "int4": ("codes", "scales"),
                "topk": ("indices", "values")}


class CompressionError(ValueError):
    """A compressed payload that cannot be decoded against the expected layout."""


def flatten(state: dict[str, np.ndarray], order: list[str]) -> np.ndarray:
    """The tensors of `state` in `order`, flattened and concatenated: (n,) float32."""
    return np.concatenate([np.asarray(state[k], np.float32).ravel() for k in order]) if order \
        else np.zeros(0, np.float32)


def unflatten(vector: np.ndarray, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Split a flat vector back into tensors of `shapes` (in sorted key order)."""
    out, start = {}, 0
    for key in sorted(shapes):
        size = math.prod(shapes[key])
        out[key] = vector[start:start + size].reshape(shapes[key]).astype(np.float32, copy=False)
        start += size
    return out


def _segments(shapes: dict[str, tuple[int, ...]]) -> np.ndarray:
    """Start offsets of each tensor in the flat vector (T + 1,)."""
    return np.cumsum([0] + [math.prod(shapes[k]) for k in sorted(shapes)])


def compress(delta: dict[str, np.ndarray], mode: str, rng: np.random.Generator,
             fraction: float = 0.05, residual: dict[str, np.ndarray] | None = None
             ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """The payload for update `delta`, and (topk) the new error-feedback residual."""
    shapes = {k: tuple(np.shape(v)) for k, v in delta.items()}
    order = sorted(shapes)
    x = flatten(delta, order)  # (n,)
    starts = _segments(shapes)
    if mode in LEVELS:
        return _quantize(x, starts, LEVELS[mode], rng, pack=mode == "int4"), None
    if mode != "topk":
        raise ValueError(f"unknown compression {mode!r}")
    if residual is not None and set(residual) == set(shapes) and all(
            np.shape(residual[k]) == shapes[k] for k in shapes):
        x = x + flatten(residual, order)  # what earlier rounds did not send
    indices = np.concatenate([s + _largest(x[s:e], fraction) for s, e in
                              zip(starts[:-1], starts[1:])]).astype(np.int32)
    values = x[indices]
    left = x.copy()
    left[indices] = 0.0
    return {"indices": indices, "values": values}, unflatten(left, shapes)


def _largest(segment: np.ndarray, fraction: float) -> np.ndarray:
    """Sorted indices of the ceil(fraction·n) entries of largest magnitude in `segment`."""
    k = min(len(segment), max(1, math.ceil(fraction * len(segment))))
    if k == len(segment):
        return np.arange(k)
    return np.sort(np.argpartition(np.abs(segment), len(segment) - k)[-k:])


def _quantize(x: np.ndarray, starts: np.ndarray, levels: int, rng: np.random.Generator,
              pack: bool) -> dict[str, np.ndarray]:
    """Per-tensor scales (T,) and stochastically rounded codes in [-levels, levels]."""
    sizes = np.diff(starts)
    peaks = np.array([np.abs(x[s:e]).max() if e > s else 0.0 for s, e in
                      zip(starts[:-1], starts[1:])], np.float32)  # (T,)
    scales = (peaks / levels).astype(np.float32)
    per_number = np.repeat(np.where(scales > 0, scales, 1.0), sizes)  # (n,)
    y = np.clip(x / per_number, -levels, levels)
    codes = np.floor(y + rng.random(y.shape[0], dtype=np.float32))  # unbiased stochastic round
    codes = np.clip(codes, -levels, levels).astype(np.int8)
    if pack:  # two 4-bit codes per byte, offset to [0, 14]; an odd tail pads with a zero code
        nibbles = (codes + levels).astype(np.uint8)
        if len(nibbles) % 2:
            nibbles = np.append(nibbles, np.uint8(levels))
        codes = nibbles[0::2] | (nibbles[1::2] << 4)
    return {"codes": codes, "scales": scales}


def decompress(payload: dict[str, np.ndarray], mode: str, shapes: dict[str, tuple[int, ...]]
               ) -> dict[str, np.ndarray]:
    """The update Δ (float32 tensors of `shapes`) a payload stands for; CompressionError if it
    does not fit that layout."""
    expected = PAYLOAD_KEYS.get(mode)
    if expected is None:
        raise ValueError(f"unknown compression {mode!r}")
    if set(payload) != set(expected):
        raise CompressionError(f"{mode} payload holds {sorted(payload)}, not {list(expected)}")
    starts = _segments(shapes)
    n = int(starts[-1])
    if mode in LEVELS:
        return unflatten(_dequantize(payload, starts, LEVELS[mode], mode == "int4"), shapes)
    indices, values = np.asarray(payload["indices"]), np.asarray(payload["values"])
    if indices.ndim != 1 or indices.shape != values.shape or not np.issubdtype(
            indices.dtype, np.integer):
        raise CompressionError(f"topk indices {indices.dtype}{indices.shape} do not pair with "
                               f"values {values.shape}")
    if len(indices) and (indices.min() < 0 or indices.max() >= n):
        raise CompressionError(f"topk indices outside [0, {n})")
    if len(np.unique(indices)) != len(indices):
        raise CompressionError("topk indices repeat")
    x = np.zeros(n, np.float32)
    x[indices] = values
    return unflatten(x, shapes)


def _dequantize(payload: dict[str, np.ndarray], starts: np.ndarray, levels: int,
                packed: bool) -> np.ndarray:
    codes, scales = np.asarray(payload["codes"]), np.asarray(payload["scales"])
    n, tensors = int(starts[-1]), len(starts) - 1
    if scales.shape != (tensors,) or not np.issubdtype(scales.dtype, np.floating):
        raise CompressionError(f"scales {scales.dtype}{scales.shape}, expected ({tensors},) "
                               "floats")
    want = ((n + 1) // 2,) if packed else (n,)
    if codes.shape != want or codes.dtype != (np.uint8 if packed else np.int8):
        raise CompressionError(f"codes {codes.dtype}{codes.shape}, expected "
                               f"{'uint8' if packed else 'int8'}{want}")
    if packed:
        nibbles = np.empty(2 * len(codes), np.int16)
        nibbles[0::2], nibbles[1::2] = codes & 0x0F, codes >> 4
        values = nibbles[:n] - levels
        if np.abs(values).max(initial=0) > levels:
            raise CompressionError(f"int4 code outside [-{levels}, {levels}]")
    else:
        values = codes.astype(np.int16)
        if np.abs(values).max(initial=0) > levels:
            raise CompressionError(f"int8 code outside [-{levels}, {levels}]")
    # a NaN/Inf scale decodes to NaN/Inf, which screening rejects with its own reason
    return values.astype(np.float32) * np.repeat(scales.astype(np.float32), np.diff(starts))

